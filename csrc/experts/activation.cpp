#include "csrc/experts/activation.h"

#include <cmath>
#include <string>

#include <ATen/ATen.h>

#include "csrc/experts/grouped_gemm.h"

namespace moeflux {
namespace {

constexpr const char* kClamped = "clamped_swiglu:";

// "clamped_swiglu:7.0:1.702" -> limit 7, alpha 1.702; false if it does not parse.
bool parse_clamped(const std::string& name, double& limit, double& alpha) {
  const std::string rest = name.substr(std::string(kClamped).size());
  const size_t colon = rest.find(':');
  if (colon == std::string::npos) return false;
  try {
    size_t used_limit = 0, used_alpha = 0;
    limit = std::stod(rest.substr(0, colon), &used_limit);
    alpha = std::stod(rest.substr(colon + 1), &used_alpha);
    return used_limit == colon && used_alpha == rest.size() - colon - 1;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

Activation parse_activation(c10::string_view activation, const char* op) {
  const std::string name(activation);
  if (name == "swiglu") return {Activation::Kind::Swiglu};
  if (name == "gelu") return {Activation::Kind::Gelu};
  Activation act{Activation::Kind::ClampedSwiglu};
  const bool clamped = name.rfind(kClamped, 0) == 0 && parse_clamped(name, act.limit, act.alpha);
  TORCH_CHECK(clamped && act.limit > 0 && std::isfinite(act.limit) && std::isfinite(act.alpha), "moeflux.", op,
              ": activation must be 'swiglu', 'gelu' or 'clamped_swiglu:<limit>:<alpha>' (limit > 0, finite), got '",
              name, "'");
  return act;
}

at::Tensor activation_forward(const at::Tensor& h, const Activation& act) {
  if (act.kind == Activation::Kind::Gelu) return at::gelu(h);
  const int64_t f = h.size(1) / 2;
  const at::Tensor gate = h.narrow(1, 0, f), up = h.narrow(1, f, f);
  at::Tensor a = new_buffer({h.size(0), f}, h.options());
  if (act.kind == Activation::Kind::Swiglu) {
    at::silu_out(a, gate);
    return a.mul_(up);
  }
  const at::Tensor g = gate.clamp_max(act.limit);
  at::mul_out(a, g, (g * act.alpha).sigmoid_());
  return a.mul_(up.clamp(-act.limit, act.limit).add_(1));
}

at::Tensor activation_backward(const at::Tensor& grad_a, const at::Tensor& h, const Activation& act) {
  if (act.kind == Activation::Kind::Gelu) return at::gelu_backward(grad_a, h);
  const int64_t f = h.size(1) / 2;
  const at::Tensor gate = h.narrow(1, 0, f), up = h.narrow(1, f, f);
  at::Tensor grad_h = new_buffer(h.sizes(), h.options());
  at::Tensor grad_gate = grad_h.narrow(1, 0, f), grad_up = grad_h.narrow(1, f, f);
  if (act.kind == Activation::Kind::Swiglu) {
    at::silu_out(grad_up, gate).mul_(grad_a);                      // d up = silu(gate) * grad
    at::mul_out(grad_gate, grad_a, up);                            // d silu(gate) = up * grad
    at::silu_backward_out(grad_gate, grad_gate, gate);             // d gate
    return grad_h;
  }
  // a = (u + 1) * g * s, g = min(gate, limit), u = clamp(up, -limit, limit), s = sigmoid(alpha * g); the clamps
  // pass the gradient where the input is within them (bounds included), as torch.clamp's backward does.
  const at::Tensor g = gate.clamp_max(act.limit), s = (g * act.alpha).sigmoid();
  const at::Tensor u1 = up.clamp(-act.limit, act.limit).add_(1);
  at::mul_out(grad_up, grad_a, g * s).mul_((up >= -act.limit).logical_and_(up <= act.limit));
  const at::Tensor dglu = s * (1 + act.alpha * g * (1 - s));      // d(g * s) / dg
  at::mul_out(grad_gate, grad_a, u1).mul_(dglu).mul_(gate <= act.limit);
  return grad_h;
}

}  // namespace moeflux
