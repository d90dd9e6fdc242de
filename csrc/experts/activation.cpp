#include "csrc/experts/activation.h"

#include <string>

#include <ATen/ATen.h>

#include "csrc/experts/grouped_gemm.h"

namespace moeflux {

bool is_swiglu(c10::string_view activation, const char* op) {
  TORCH_CHECK(activation == "swiglu" || activation == "gelu", "moeflux.", op, ": activation must be 'swiglu' or ",
              "'gelu', got '", std::string(activation), "'");
  return activation == "swiglu";
}

at::Tensor activation_forward(const at::Tensor& h, bool swiglu) {
  if (!swiglu) return at::gelu(h);
  const int64_t f = h.size(1) / 2;
  at::Tensor a = new_buffer({h.size(0), f}, h.options());
  at::silu_out(a, h.narrow(1, 0, f));
  return a.mul_(h.narrow(1, f, f));
}

at::Tensor activation_backward(const at::Tensor& grad_a, const at::Tensor& h, bool swiglu) {
  if (!swiglu) return at::gelu_backward(grad_a, h);
  const int64_t f = h.size(1) / 2;
  const at::Tensor gate = h.narrow(1, 0, f), up = h.narrow(1, f, f);
  at::Tensor grad_h = new_buffer(h.sizes(), h.options());
  at::Tensor grad_gate = grad_h.narrow(1, 0, f), grad_up = grad_h.narrow(1, f, f);
  at::silu_out(grad_up, gate).mul_(grad_a);                      // d up = silu(gate) * grad
  at::mul_out(grad_gate, grad_a, up);                            // d silu(gate) = up * grad
  at::silu_backward_out(grad_gate, grad_gate, gate);             // d gate
  return grad_h;
}

}  // namespace moeflux
