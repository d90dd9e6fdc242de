// The experts' activations between their two GEMMs, written into
// preallocated outputs: no chunk/cat copies, one pass per output.
//   swiglu: h = [gate | up] ([N, 2F]) -> silu(gate) * up ([N, F])
//   gelu:   h ([N, F]) -> gelu(h)
#pragma once

#include <ATen/core/Tensor.h>

namespace moeflux {

bool is_swiglu(c10::string_view activation, const char* op);  // checks the name
at::Tensor activation_forward(const at::Tensor& h, bool swiglu);
// grad_a [N, F] -> grad_h (the shape of h).
at::Tensor activation_backward(const at::Tensor& grad_a, const at::Tensor& h, bool swiglu);

}  // namespace moeflux
