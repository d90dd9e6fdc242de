#include "csrc/bucketer/bucketer.h"

#include <algorithm>
#include <sstream>

#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>

#include "csrc/distributed/all_to_all.h"
#include "csrc/distributed/comm_scheduler.h"
#include "csrc/host_sync.h"
#include "csrc/profiling/comm_stats.h"

namespace moeflux {
namespace {

using HookState = c10::intrusive_ptr<c10d::ProcessGroup>;

// Sum over the group; the buffer was scaled when gradients were copied in.
class AllReduceHook : public c10d::CppCommHookInterface<HookState> {
 public:
  using CppCommHookInterface::CppCommHookInterface;
  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket& bucket) override {
    std::vector<at::Tensor> tensors{bucket.getBufferRef()};
    return state_->allreduce(tensors)->getFuture();
  }
};

// Sum over the group in bfloat16 (half the bytes), then back into the bucket's dtype.
class BF16CompressHook : public c10d::CppCommHookInterface<HookState> {
 public:
  using CppCommHookInterface::CppCommHookInterface;
  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket& bucket) override {
    at::Tensor buffer = bucket.getBufferRef();
    std::vector<at::Tensor> tensors{buffer.to(at::kBFloat16)};
    return state_->allreduce(tensors)->getFuture()->then(
        [buffer](c10::ivalue::Future& reduced) {
          buffer.copy_(c10d::detail::parseCppCommHookResult(reduced.value()));
          return c10::IValue(buffer);
        },
        c10::TensorType::get());
  }
};

}  // namespace

std::unique_ptr<c10d::CommHookInterface> make_builtin_hook(const std::string& name, HookState group) {
  if (name == "allreduce") return std::make_unique<AllReduceHook>(std::move(group));
  if (name == "bf16_compress") return std::make_unique<BF16CompressHook>(std::move(group));
  TORCH_CHECK(false, "moeflux bucketer: comm_hook must be 'allreduce', 'bf16_compress' or a callable, got '", name,
              "'");
}

std::vector<c10::intrusive_ptr<c10::ivalue::Future>> scheduled_all_reduce(
    const at::Tensor& flat, const c10::intrusive_ptr<c10d::ProcessGroup>& group, int64_t micro_op_bytes) {
  TORCH_CHECK(flat.dim() == 1 && flat.is_contiguous(), "moeflux scheduled_all_reduce: expected a contiguous 1-D tensor");
  TORCH_CHECK(micro_op_bytes > 0, "moeflux scheduled_all_reduce: micro_op_bytes must be > 0, got ", micro_op_bytes);
  const int64_t step = std::max<int64_t>(1, micro_op_bytes / static_cast<int64_t>(flat.element_size()));
  std::vector<c10::Device> devices;
  if (!flat.is_cpu()) devices.push_back(flat.device());
  std::vector<c10::intrusive_ptr<c10::ivalue::Future>> parts;
  for (int64_t offset = 0; offset < flat.numel(); offset += step) {
    at::Tensor chunk = flat.narrow(0, offset, std::min(step, flat.numel() - offset));  // a view: reduced in place
    parts.push_back(comm_scheduler::instance().submit(
        [group, chunk] {
          std::vector<at::Tensor> tensors{chunk};
          return group->allreduce(tensors)->getFuture();
        },
        devices));
  }
  return parts;
}

GradientBucketer::GradientBucketer(std::vector<at::Tensor> params, std::vector<std::string> names,
                                   std::vector<int64_t> param_group, std::vector<std::string> group_names,
                                   std::vector<double> divisors, BucketerOptions options)
    : params_(std::move(params)),
      names_(std::move(names)),
      param_group_(std::move(param_group)),
      divisors_(std::move(divisors)),
      options_(options) {
  const size_t n = params_.size();
  TORCH_CHECK(n > 0, "moeflux bucketer: no parameters to synchronise");
  TORCH_CHECK(names_.size() == n && param_group_.size() == n, "moeflux bucketer: got ", n, " parameters, ",
              names_.size(), " names and ", param_group_.size(), " group indices");
  TORCH_CHECK(!group_names.empty() && divisors_.size() == group_names.size(), "moeflux bucketer: got ",
              group_names.size(), " groups and ", divisors_.size(), " divisors");
  for (const auto& name : group_names) groups_.push_back(resolve_group(name, "bucketer"));
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(params_[i].requires_grad(), "moeflux bucketer: parameter ", names_[i], " does not require grad");
    TORCH_CHECK(params_[i].layout() == at::kStrided, "moeflux bucketer: parameter ", names_[i], " is not dense");
    TORCH_CHECK(param_group_[i] >= 0 && param_group_[i] < static_cast<int64_t>(groups_.size()),
                "moeflux bucketer: parameter ", names_[i], " names group ", param_group_[i], " of ", groups_.size());
  }
  for (size_t g = 0; g < groups_.size(); ++g) hooks_.push_back(make_builtin_hook("allreduce", groups_[g]));
  build_buckets(reverse_order(static_cast<int64_t>(n)));
  reset_step();
  for (size_t i = 0; i < n; ++i) {
    auto accumulator = torch::autograd::impl::grad_accumulator(params_[i]);
    const int64_t index = static_cast<int64_t>(i);
    hook_keys_.push_back(accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
        [this, index](const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) {
          on_gradient_ready(index);
          return outputs;
        })));
    accumulators_.push_back(std::move(accumulator));
  }
}

GradientBucketer::~GradientBucketer() {
  for (size_t i = 0; i < accumulators_.size(); ++i) accumulators_[i]->del_post_hook(hook_keys_[i]);
}

void GradientBucketer::set_builtin_comm_hook(const std::string& name) {
  std::vector<std::unique_ptr<c10d::CommHookInterface>> hooks;
  for (const auto& group : groups_) hooks.push_back(make_builtin_hook(name, group));
  set_comm_hooks(std::move(hooks));
  std::lock_guard<std::mutex> lock(mutex_);
  builtin_hook_ = name;
}

void GradientBucketer::set_comm_hooks(std::vector<std::unique_ptr<c10d::CommHookInterface>> hooks) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(hooks.size() == groups_.size(), "moeflux bucketer: expected one comm hook per group (",
              groups_.size(), "), got ", hooks.size());
  hooks_ = std::move(hooks);
  builtin_hook_.clear();
}

void GradientBucketer::set_require_sync(bool require_sync) {
  std::lock_guard<std::mutex> lock(mutex_);
  require_sync_ = require_sync;
}

void GradientBucketer::build_buckets(const std::vector<int64_t>& order) {
  std::vector<ParamSpec> specs;
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& p = params_[i];
    specs.push_back({p.numel() * static_cast<int64_t>(p.element_size()), p.scalar_type(), p.device(),
                     param_group_[i]});
  }
  const auto assignment = assign_buckets(specs, order, options_.first_bucket_bytes, options_.bucket_bytes);
  buckets_.clear();
  bucket_of_.assign(params_.size(), -1);
  slot_of_.assign(params_.size(), -1);
  for (const auto& members : assignment) {
    Bucket bucket;
    bucket.params = members;
    bucket.group = param_group_[members.front()];
    int64_t total = 0;
    for (size_t s = 0; s < members.size(); ++s) {
      bucket_of_[members[s]] = static_cast<int64_t>(buckets_.size());
      slot_of_[members[s]] = static_cast<int64_t>(s);
      bucket.offsets.push_back(total);
      bucket.lengths.push_back(params_[members[s]].numel());
      total += params_[members[s]].numel();
    }
    bucket.buffer = at::zeros({total}, params_[members.front()].options().requires_grad(false));
    buckets_.push_back(std::move(bucket));
  }
  if (options_.gradient_as_bucket_view) {
    for (const Bucket& bucket : buckets_) {
      for (size_t s = 0; s < bucket.params.size(); ++s) {
        at::Tensor& grad = params_[bucket.params[s]].mutable_grad();
        at::Tensor view = bucket_view(bucket, s);
        if (grad.defined()) view.copy_(grad);
        grad = view;
      }
    }
  }
}

at::Tensor GradientBucketer::bucket_view(const Bucket& bucket, size_t slot) const {
  const at::Tensor& param = params_[bucket.params[slot]];
  return bucket.buffer.narrow(0, bucket.offsets[slot], bucket.lengths[slot]).view(param.sizes());
}

void GradientBucketer::on_gradient_ready(int64_t param) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!require_sync_ || ready_[param]) return;
  if (!callback_queued_) {  // the first gradient of a synchronised backward
    callback_queued_ = true;
    launch_log_.clear();
    torch::autograd::Engine::get_default_engine().queue_callback([this] { finalize_backward(); });
  }
  mark_ready(param, params_[param].grad());
  launch_ready_buckets();
}

// Copies the gradient into the bucket scaled by 1 / divisor (in place when
// .grad already is the bucket's view); a missing gradient counts as zeros.
void GradientBucketer::mark_ready(int64_t param, const at::Tensor& grad) {
  Bucket& bucket = buckets_[bucket_of_[param]];
  at::Tensor view = bucket_view(bucket, slot_of_[param]);
  const double scale = 1.0 / divisors_[bucket.group];
  if (!grad.defined()) {
    view.zero_();
  } else if (grad.data_ptr() == view.data_ptr() && grad.sizes() == view.sizes()) {
    view.mul_(scale);
  } else {
    at::mul_out(view, grad, at::scalar_tensor(scale, grad.options().device(at::kCPU).dtype(at::kDouble)));
  }
  ready_[param] = true;
  ++ready_count_;
  current_order_.push_back(param);
  --bucket.pending;
}

void GradientBucketer::launch_ready_buckets() {
  while (next_to_launch_ < static_cast<int64_t>(buckets_.size()) && buckets_[next_to_launch_].pending == 0) {
    Bucket& bucket = buckets_[next_to_launch_];
    if (options_.priority && !builtin_hook_.empty()) {
      // The same sum as the built-in hook, cut into micro-ops that yield to all-to-alls.
      bucket.wire = builtin_hook_ == "bf16_compress" ? bucket.buffer.to(at::kBFloat16) : bucket.buffer;
      bucket.parts = scheduled_all_reduce(bucket.wire, groups_[bucket.group], options_.micro_op_bytes);
      bucket.scheduled = true;
      bucket.launched = true;
      launch_log_.push_back({next_to_launch_, static_cast<int64_t>(params_.size()) - ready_count_});
      ++next_to_launch_;
      continue;
    }
    std::vector<size_t> offsets(bucket.offsets.begin(), bucket.offsets.end());
    std::vector<size_t> lengths(bucket.lengths.begin(), bucket.lengths.end());
    std::vector<c10::IntArrayRef> sizes;
    std::vector<at::Tensor> params;
    for (const int64_t p : bucket.params) {
      sizes.push_back(params_[p].sizes());
      params.push_back(params_[p]);
    }
    c10d::GradBucket grad_bucket(static_cast<size_t>(next_to_launch_), buckets_.size(), bucket.buffer,
                                 std::move(offsets), std::move(lengths), std::move(sizes), std::move(params),
                                 std::nullopt);
    bucket.future = hooks_[bucket.group]->runHook(grad_bucket);
    comm_scheduler::instance().trace_unscheduled(bucket.future);  // what priority would have held back
    bucket.launched = true;
    launch_log_.push_back({next_to_launch_, static_cast<int64_t>(params_.size()) - ready_count_});
    ++next_to_launch_;
  }
}

// Waits for a launched bucket and leaves the sum in its buffer.
void GradientBucketer::wait_for(Bucket& bucket) {
  if (bucket.scheduled) {
    for (const auto& part : bucket.parts) part->waitAndThrow();
    if (!bucket.wire.is_same(bucket.buffer)) bucket.buffer.copy_(bucket.wire);
    return;
  }
  bucket.future->wait();
  const at::Tensor reduced = hooks_[bucket.group]->parseHookResult(bucket.future->value());
  if (!reduced.is_same(bucket.buffer)) bucket.buffer.copy_(reduced);
}

void GradientBucketer::finalize_backward() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (options_.find_unused_parameters) {
    for (size_t i = 0; i < params_.size(); ++i) {
      if (!ready_[i]) mark_ready(static_cast<int64_t>(i), at::Tensor());
    }
    launch_ready_buckets();
  }
  // Backward is over: what is still queued goes out now, even past an
  // all-to-all (whose peers may be waiting here for these very micro-ops).
  if (options_.priority) comm_scheduler::instance().flush();
  if (next_to_launch_ < static_cast<int64_t>(buckets_.size())) {
    std::ostringstream missing;
    for (size_t i = 0; i < params_.size(); ++i) {
      if (!ready_[i]) missing << (missing.tellp() > 0 ? ", " : "") << names_[i];
    }
    for (Bucket& bucket : buckets_) {  // let the launched collectives finish before giving up
      if (!bucket.launched) continue;
      if (bucket.scheduled) {
        for (const auto& part : bucket.parts) part->wait();
      } else {
        bucket.future->wait();
      }
    }
    reset_step();
    TORCH_CHECK(false, "moeflux bucketer: these parameters got no gradient in this backward: ", missing.str(),
                ". Pass find_unused_parameters=True if some parameters are not used in every step "
                "(every rank must then still run backward).");
  }
  for (Bucket& bucket : buckets_) {
    // What backward could not hide: the time spent here waiting for the all-reduce (moeflux.comm_stats).
    const auto& group = groups_[bucket.group];
    comm_stats::CollectiveTimer timer("grad_allreduce_wait", group->getGroupName(), group->getRank(), bucket.buffer,
                                      {});
    timer.waiting();
    wait_for(bucket);
    timer.done();
    for (size_t s = 0; s < bucket.params.size(); ++s) {
      at::Tensor& grad = params_[bucket.params[s]].mutable_grad();
      const at::Tensor view = bucket_view(bucket, s);
      if (options_.gradient_as_bucket_view && grad.defined() && grad.data_ptr() == view.data_ptr()) continue;
      if (grad.defined()) {
        grad.copy_(view);
      } else {
        grad = options_.gradient_as_bucket_view ? view : view.clone();
      }
    }
  }
  if (!rebuilt_) {
    // Rebuild once, in the order gradients became ready; rank 0's order, so every rank agrees.
    ready_order_ = current_order_;
    at::Tensor order = at::empty({static_cast<int64_t>(ready_order_.size())}, at::kLong);
    std::copy(ready_order_.begin(), ready_order_.end(), order.mutable_data_ptr<int64_t>());
    at::Tensor on_device = order.to(buckets_.front().buffer.device());
    std::vector<at::Tensor> tensors{on_device};
    groups_.front()->broadcast(tensors)->wait();
    order = to_host(on_device, "bucket_order");
    ready_order_.assign(order.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>() + order.numel());
    build_buckets(ready_order_);
    rebuilt_ = true;
  }
  reset_step();
}

void GradientBucketer::reset_step() {
  for (Bucket& bucket : buckets_) {
    bucket.pending = static_cast<int64_t>(bucket.params.size());
    bucket.launched = false;
    bucket.future.reset();
    bucket.scheduled = false;
    bucket.wire = at::Tensor();
    bucket.parts.clear();
  }
  ready_.assign(params_.size(), false);
  ready_count_ = 0;
  next_to_launch_ = 0;
  callback_queued_ = false;
  current_order_.clear();
}

std::vector<std::vector<int64_t>> GradientBucketer::bucket_indices() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::vector<int64_t>> out;
  for (const Bucket& bucket : buckets_) out.push_back(bucket.params);
  return out;
}

std::vector<int64_t> GradientBucketer::ready_order() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return ready_order_;
}

std::vector<LaunchRecord> GradientBucketer::launch_log() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return launch_log_;
}

bool GradientBucketer::buckets_rebuilt() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return rebuilt_;
}

}  // namespace moeflux
