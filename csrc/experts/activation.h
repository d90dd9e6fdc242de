// The experts' activations between their two GEMMs, written into
// preallocated outputs: no chunk/cat copies, one pass per output.
//   swiglu:         h = [gate | up] ([N, 2F]) -> silu(gate) * up ([N, F])
//   gelu:           h ([N, F]) -> gelu(h)
//   clamped_swiglu: h = [gate | up] -> (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g),
//                   g = min(gate, limit) (GPT-OSS; named "clamped_swiglu:<limit>:<alpha>")
#pragma once

#include <ATen/core/Tensor.h>

namespace moeflux {

struct Activation {
  enum class Kind { Swiglu, Gelu, ClampedSwiglu };
  Kind kind;
  double limit = 0.0, alpha = 0.0;  // clamped_swiglu only
  bool gated() const { return kind != Kind::Gelu; }  // h holds [gate | up]: w_in is twice as wide
};

// Parses (and checks) the activation's name; `op` names the op in errors.
Activation parse_activation(c10::string_view activation, const char* op);
at::Tensor activation_forward(const at::Tensor& h, const Activation& act);
// grad_a [N, F] -> grad_h (the shape of h).
at::Tensor activation_backward(const at::Tensor& grad_a, const at::Tensor& h, const Activation& act);

}  // namespace moeflux
