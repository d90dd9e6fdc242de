// Front-ends of permute (scatter tokens into rows grouped by expert) and
// unpermute (gather the rows back into tokens, weighted): argument checks,
// allocation, then one device's kernels. Both directions share two kernels,
// scatter_rows and gather_rows; each op's backward is the other direction.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "csrc/checks.h"
#include "csrc/kernels.h"
#include "csrc/ops.h"

namespace moeflux {
namespace {

void check_rows(const at::Tensor& t, const char* op, const char* name, const char* layout) {
  check_dim(t, 2, op, name, layout);
  check_float(t, op, name);
}

void check_index(const at::Tensor& t, const at::Tensor& ref, int64_t num_tokens, const char* op, const char* name,
                 const char* ref_name) {
  check_dim(t, 2, op, name, "[num_tokens, k]");
  check_dtype(t, at::kInt, op, name);
  check_same_device(t, ref, op, name, ref_name);
  check_size(t, 0, num_tokens, op, name, "the number of tokens");
}

// Weights travel to the kernels in the accumulation type of the rows.
at::Tensor checked_weights(const std::optional<at::Tensor>& weights, const at::Tensor& row_map,
                           const at::Tensor& rows, const char* op) {
  if (!weights.has_value() || !weights->defined()) return at::Tensor();
  const at::Tensor& w = *weights;
  check_float(w, op, "weights");
  check_same_device(w, row_map, op, "weights", "row_map");
  TORCH_CHECK(w.sizes() == row_map.sizes(), "moeflux.", op, ": weights must have the shape of row_map ",
              row_map.sizes(), ", got ", w.sizes());
  return w.to(accumulate_type(rows.scalar_type())).contiguous();
}

}  // namespace

void check_permute_args(const at::Tensor& tokens, const at::Tensor& expert_ids, int64_t num_experts,
                        std::optional<int64_t> capacity, const char* op) {
  check_rows(tokens, op, "tokens", "[num_tokens, hidden]");
  check_index(expert_ids, tokens, tokens.size(0), op, "expert_ids", "tokens");
  check_num_experts(num_experts, op);
  TORCH_CHECK(!capacity.has_value() || *capacity >= 0, "moeflux.", op, ": capacity must be >= 0 or None, got ",
              capacity.value_or(0));
}

const DeviceKernels& kernels_for(const at::Tensor& t) {
#ifdef MOEFLUX_WITH_CUDA
  if (t.is_cuda()) return cuda::kernels;
#endif
  TORCH_CHECK(t.device().is_cpu(), "moeflux: no kernels for tensors on ", t.device());
  return cpu::kernels;
}

at::Tensor scatter_rows(const DeviceKernels& kernels, const at::Tensor& x, const at::Tensor& row_map,
                        int64_t num_rows) {
  at::Tensor out = at::empty({num_rows, x.size(1)}, x.options());
  at::Tensor no_dot;
  kernels.scatter_rows(x.contiguous(), row_map.contiguous(), at::Tensor(), out, at::Tensor(), no_dot);
  return out;
}

at::Tensor gather_rows(const DeviceKernels& kernels, const at::Tensor& rows, const at::Tensor& row_map,
                       const at::Tensor& weights) {
  at::Tensor out = at::empty({row_map.size(0), rows.size(1)}, rows.options());
  kernels.gather_rows(rows.contiguous(), row_map.contiguous(), weights, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute(const DeviceKernels& kernels, const at::Tensor& tokens,
                                                       const at::Tensor& expert_ids, int64_t num_experts,
                                                       std::optional<int64_t> capacity) {
  check_permute_args(tokens, expert_ids, num_experts, capacity, "permute");
  const int64_t num_slots = expert_ids.numel();
  const int64_t num_rows = capacity.has_value() ? num_experts * *capacity : num_slots;
  check_fits_int32(num_slots, "permute", "num_tokens * k");
  check_fits_int32(num_rows, "permute", "the number of rows");

  const at::Tensor ids = expert_ids.contiguous();
  at::Tensor row_map = at::empty_like(ids);
  at::Tensor tokens_per_expert = at::empty({num_experts}, ids.options());
  kernels.build_row_map(ids, num_experts, capacity.value_or(-1), row_map, tokens_per_expert);

  return {scatter_rows(kernels, tokens, row_map, num_rows), tokens_per_expert, row_map};
}

at::Tensor unpermute(const DeviceKernels& kernels, const at::Tensor& rows, const at::Tensor& row_map,
                     const std::optional<at::Tensor>& weights) {
  check_rows(rows, "unpermute", "rows", "[num_rows, hidden]");
  check_dim(row_map, 2, "unpermute", "row_map", "[num_tokens, k]");
  check_index(row_map, rows, row_map.size(0), "unpermute", "row_map", "rows");
  return gather_rows(kernels, rows, row_map, checked_weights(weights, row_map, rows, "unpermute"));
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward(const DeviceKernels& kernels, const at::Tensor& grad_output,
                                                      const at::Tensor& rows, const at::Tensor& row_map,
                                                      const std::optional<at::Tensor>& weights) {
  check_rows(rows, "unpermute_backward", "rows", "[num_rows, hidden]");
  check_dim(row_map, 2, "unpermute_backward", "row_map", "[num_tokens, k]");
  check_index(row_map, rows, row_map.size(0), "unpermute_backward", "row_map", "rows");
  check_rows(grad_output, "unpermute_backward", "grad_output", "[num_tokens, hidden]");
  check_same_device(grad_output, rows, "unpermute_backward", "grad_output", "rows");
  check_size(grad_output, 0, row_map.size(0), "unpermute_backward", "grad_output", "row_map.size(0)");
  check_size(grad_output, 1, rows.size(1), "unpermute_backward", "grad_output", "rows.size(1)");
  const at::Tensor w = checked_weights(weights, row_map, rows, "unpermute_backward");

  at::Tensor grad_rows = at::empty_like(rows, at::MemoryFormat::Contiguous);
  at::Tensor grad_weights = w.defined() ? at::empty_like(w) : at::empty({0}, rows.options());
  at::Tensor no_dot;
  kernels.scatter_rows(grad_output.to(rows.scalar_type()).contiguous(), row_map.contiguous(), w, grad_rows,
                       w.defined() ? rows.contiguous() : at::Tensor(), w.defined() ? grad_weights : no_dot);
  if (w.defined()) grad_weights = grad_weights.to(weights->scalar_type());
  return {grad_rows, grad_weights};
}

}  // namespace moeflux
