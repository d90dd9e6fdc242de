// Reads of device data on the host. On a GPU each one is a host synchronisation (the copy waits for the
// kernels that produced the data), so every device->host read in moeflux (C++ and Python: moeflux.ops.to_host)
// goes through to_host, which counts it by site on every device, the CPU included, where it costs nothing:
// tests check which reads a layer's forward and backward make without a GPU (tests/test_host_syncs.py).
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include <ATen/core/Tensor.h>

namespace moeflux {

// `t` on the host (a copy; a synchronisation when it lives on a GPU; `t` itself when it is on the CPU),
// counted under `site`. Sites that read routing counts (the ones a layer step may make) are named
// "counts:<where>": they alone make up host_count_reads.
at::Tensor to_host(const at::Tensor& t, const std::string& site);

std::map<std::string, int64_t> host_reads();  // reads by site since the last reset
int64_t host_count_reads();                   // the "counts:" sites' reads
void reset_host_reads();

}  // namespace moeflux
