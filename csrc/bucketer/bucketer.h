// DDP-style gradient bucketing, for models whose parameters are reduced over
// different process groups (dense parameters over the data-parallel group,
// expert parameters over the expert-data-parallel group).
//
// A post hook on each parameter's gradient accumulator copies the gradient,
// scaled by 1 / divisor, into its bucket; the bucket whose last gradient
// arrives is handed to the communication hook (all-reduce by default) at once,
// buckets strictly in their fixed order, so every rank issues the same
// collectives in the same order while backward is still running. At the end of
// backward (an autograd engine callback) the bucketer waits for every bucket
// and writes the reduced values back into the parameters' .grad.
//
// With `priority` (all-to-all priority, Lina ATC'23) the built-in hooks cut a
// ready bucket into all-reduces of at most `micro_op_bytes` and queue them on
// the process's communication scheduler (csrc/distributed/comm_scheduler.h),
// which launches them one at a time and only while no moeflux all-to-all is in
// flight; the end of backward flushes what is still queued. Python hooks are
// not scheduled (the scheduler launches from backend threads, where a Python
// hook would need the GIL): they run as without priority.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>

#include "csrc/bucketer/bucket_assignment.h"

namespace moeflux {

struct BucketerOptions {
  int64_t first_bucket_bytes = int64_t{1} << 20;
  int64_t bucket_bytes = int64_t{25} << 20;
  bool gradient_as_bucket_view = false;  // .grad aliases the bucket: no copy, no second buffer
  bool find_unused_parameters = false;   // treat gradients that never arrive as zeros
  bool priority = false;                 // built-in hooks: all-reduce in scheduled micro-ops
  int64_t micro_op_bytes = int64_t{1} << 20;
};

// What the last synchronised backward launched, for tests and profiling.
struct LaunchRecord {
  int64_t bucket;
  int64_t gradients_pending;  // gradients of the whole model not yet ready when it was launched
};

// The built-in communication hooks: sum over the bucket's group (the buffer is already scaled),
// optionally through bfloat16.
std::unique_ptr<c10d::CommHookInterface> make_builtin_hook(const std::string& name,
                                                           c10::intrusive_ptr<c10d::ProcessGroup> group);

// Sums the contiguous 1-D `flat` over `group` in place, as all-reduces of at most
// `micro_op_bytes` each queued on the communication scheduler; one future per
// micro-op, in order (none for an empty tensor). Every rank of the group must
// call it with the same sizes in the same order.
std::vector<c10::intrusive_ptr<c10::ivalue::Future>> scheduled_all_reduce(
    const at::Tensor& flat, const c10::intrusive_ptr<c10d::ProcessGroup>& group, int64_t micro_op_bytes);

class GradientBucketer {
 public:
  // params[i] is reduced over groups[param_group[i]] and divided by divisors[param_group[i]].
  GradientBucketer(std::vector<at::Tensor> params, std::vector<std::string> names, std::vector<int64_t> param_group,
                   std::vector<std::string> group_names, std::vector<double> divisors, BucketerOptions options);
  ~GradientBucketer();
  GradientBucketer(const GradientBucketer&) = delete;
  GradientBucketer& operator=(const GradientBucketer&) = delete;

  // "allreduce" (the default) or "bf16_compress", for every group.
  void set_builtin_comm_hook(const std::string& name);
  // One hook per group, in the order of group_names.
  void set_comm_hooks(std::vector<std::unique_ptr<c10d::CommHookInterface>> hooks);
  // While false (no_sync), gradients only accumulate locally.
  void set_require_sync(bool require_sync);

  std::vector<std::vector<int64_t>> bucket_indices() const;
  std::vector<int64_t> ready_order() const;
  std::vector<LaunchRecord> launch_log() const;
  bool buckets_rebuilt() const;

 private:
  struct Bucket {
    std::vector<int64_t> params;
    std::vector<int64_t> offsets, lengths;  // in elements of `buffer`
    at::Tensor buffer;
    int64_t group = 0;
    int64_t pending = 0;
    bool launched = false;
    c10::intrusive_ptr<c10::ivalue::Future> future;              // the hook's, without priority
    bool scheduled = false;                                       // with priority: micro-ops instead
    at::Tensor wire;                                              // what they reduce (bf16 copy or buffer)
    std::vector<c10::intrusive_ptr<c10::ivalue::Future>> parts;  // one per micro-op
  };

  void build_buckets(const std::vector<int64_t>& order);
  void on_gradient_ready(int64_t param);
  void mark_ready(int64_t param, const at::Tensor& grad);
  void launch_ready_buckets();
  void finalize_backward();
  void reset_step();
  void wait_for(Bucket& bucket);
  at::Tensor bucket_view(const Bucket& bucket, size_t slot) const;

  std::vector<at::Tensor> params_;
  std::vector<std::string> names_;
  std::vector<int64_t> param_group_;
  std::vector<c10::intrusive_ptr<c10d::ProcessGroup>> groups_;
  std::vector<double> divisors_;
  BucketerOptions options_;
  std::vector<std::unique_ptr<c10d::CommHookInterface>> hooks_;
  std::string builtin_hook_ = "allreduce";  // empty for Python hooks

  std::vector<Bucket> buckets_;
  std::vector<int64_t> bucket_of_;  // parameter -> bucket
  std::vector<int64_t> slot_of_;    // parameter -> position in its bucket
  int64_t next_to_launch_ = 0;
  std::vector<bool> ready_;
  int64_t ready_count_ = 0;
  bool require_sync_ = true;
  bool callback_queued_ = false;
  bool rebuilt_ = false;
  std::vector<int64_t> ready_order_;   // of the first synchronised backward
  std::vector<int64_t> current_order_;
  std::vector<LaunchRecord> launch_log_;

  // The gradient accumulators keep our post hooks; we keep the accumulators alive.
  std::vector<decltype(torch::autograd::impl::grad_accumulator(std::declval<at::Tensor>()))> accumulators_;
  std::vector<uintptr_t> hook_keys_;
  mutable std::mutex mutex_;
};

}  // namespace moeflux
