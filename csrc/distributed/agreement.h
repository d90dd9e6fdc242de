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

// The most bytes of a failing rank's error that reach the other ranks: a longer one is cut (at a character
// boundary, marked "...") so that the exchange keeps one size.
constexpr int64_t kMaxErrorBytes = 512;

// What exchange_checks tells this rank.
struct CheckedFields {
  at::Tensor fields;  // every rank's fields, [world, fields.size()] int64 on the host
  std::string error;  // empty if every rank's checks passed; else this rank's own error or, if its checks
                      // passed, "moeflux.<op>: rank r of the process group failed its check: <r's error>"
};

// Every rank sends whether its local checks passed (`error` empty), its error (its first kMaxErrorBytes, less
// a leading "moeflux.<op>: ") and `fields` (as many on every rank) to every rank. A fixed-size exchange, so
// that it cannot itself mismatch; `op` names the op in errors and in moeflux.comm_stats ("agreement"). It
// does not raise for a failed check: the caller does, with `error` (Python raises a ValueError).
CheckedFields exchange_checks(c10d::ProcessGroup& group, const std::vector<int64_t>& fields, const char* op,
                              const c10::Device& device, const std::string& error);

// exchange_checks, then every rank raises if any rank's checks failed. Returns every rank's fields.
at::Tensor exchange_checked(c10d::ProcessGroup& group, const std::vector<int64_t>& fields, const char* op,
                            const c10::Device& device, const std::string& error);

// exchange_checked, then all ranks raise if the fields differ (naming each field with `names`; a field named
// "dtype" is printed as a scalar type).
void agree(c10d::ProcessGroup& group, const std::vector<int64_t>& fields, const char* op,
           const std::vector<const char*>& names, const c10::Device& device, const std::string& error);

}  // namespace moeflux
