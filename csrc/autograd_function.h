// What the C++ autograd functions (autograd.cpp, experts/experts_autograd.cpp) share: the torch::autograd
// names and a typed handle to a moeflux op, so that they call ops through the dispatcher (fake tensors,
// torch.compile and profiling then see ordinary ops).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

namespace moeflux {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

}  // namespace moeflux
