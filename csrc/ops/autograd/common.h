// Shared pieces of the autograd kernels.
//
// Each forward op's autograd is a torch::autograd::Function whose forward
// redispatches below autograd and whose backward calls the op's registered
// relevance op. The relevance ops themselves get autograd's "not implemented"
// kernel: relevance is not a gradient, so a double backward through them
// raises an error naming the op instead of returning wrong numbers.
#pragma once

#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "../impl.h"

namespace lrpcpp::autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

inline std::optional<Tensor> optional_tensor(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

inline Tensor saved_or_undefined(const OptTensor& t) {
  return t.has_value() ? *t : Tensor();
}

}  // namespace lrpcpp::autograd
