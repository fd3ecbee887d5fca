// Shared pieces of the autograd kernels.
//
// Each forward op's autograd is a torch::autograd::Function whose forward
// redispatches below autograd and whose backward calls the op's registered
// relevance op. The relevance ops themselves get autograd's "not implemented"
// kernel: relevance is not a gradient, so a double backward through them
// raises an error naming the op instead of returning wrong numbers.
//
// That error needs a graph: it comes when the relevance op has an input that requires grad
// (a saved x, or the incoming relevance). A backward whose result depends on no such input (the
// identity rule: R_x = R; the gradient-times-input scalings: g * factor) would instead return a
// result with no graph under create_graph=True, and a second backward would silently miss the
// rule's dependence on x. Those backwards refuse create_graph=True up front with
// check_no_double_backward.
#pragma once

#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "../impl.h"

namespace lrpcpp::autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Inside a backward, grad mode is on exactly when the backward was called with create_graph=True.
inline void check_no_double_backward(const std::string& op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), op,
              ": double backward is not supported: the backward of this LRP rule returns relevance, not a "
              "gradient, and has no derivative of its own; call backward / torch.autograd.grad without "
              "create_graph=True");
}

inline std::optional<Tensor> optional_tensor(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

inline Tensor saved_or_undefined(const OptTensor& t) {
  return t.has_value() ? *t : Tensor();
}

}  // namespace lrpcpp::autograd
