// Turning one rank's bad arguments into the same clear error on every rank of a collective, instead of a
// hang (the others wait in the collective) or an abort (a message of the wrong size).
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace moeflux {

// The rank-local argument checks, run so that a failure becomes a message instead of an exception: the rank
// must still join the agreement, so that every rank raises together.
template <typename Checks>
std::string local_error(Checks&& checks) {
  try {
    checks();
    return "";
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
}

// The device a group's collectives take tensors of `t`'s device on: CUDA tensors stay, others go to the CPU.
c10::Device exchange_device(const c10::Device& device);

// Every rank sends whether its local checks passed (`error` empty) and `fields` (as many on every rank) to every
// rank; all of them raise if any rank's checks failed (that rank with its own message). Returns every rank's
// fields, [world, fields.size()] int64 on the host. A fixed-size exchange, so that it cannot itself mismatch;
// `op` names the op in errors and in moeflux.comm_stats ("agreement").
at::Tensor exchange_checked(c10d::ProcessGroup& group, const std::vector<int64_t>& fields, const char* op,
                            const c10::Device& device, const std::string& error);

// exchange_checked, then all ranks raise if the fields differ (naming each
// field with `names`; a field named "dtype" is printed as a scalar type). A fixed-size exchange, so that it
// cannot itself mismatch; `op` names the op in errors and in moeflux.comm_stats ("agreement").
void agree(c10d::ProcessGroup& group, const std::vector<int64_t>& fields, const char* op,
           const std::vector<const char*>& names, const c10::Device& device, const std::string& error);

}  // namespace moeflux
