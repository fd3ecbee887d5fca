// The identity rule as one autograd Function: the forward is any lrpcpp op
// of x (its other arguments, weights included, take no relevance), and the
// backward is identity_relevance, R cast to x's dtype.
#pragma once

#include <functional>

#include "common.h"

namespace lrpcpp::autograd {

class IdentityRuleFunction : public torch::autograd::Function<IdentityRuleFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::function<Tensor()>& op) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["dtype"] = x.scalar_type();
    return op();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {lrpcpp::identity_relevance(grads[0], ctx->saved_data["dtype"].toScalarType()), Tensor()};
  }
};

inline Tensor identity_rule(const Tensor& x, const std::function<Tensor()>& op) {
  return IdentityRuleFunction::apply(x, op);
}

}  // namespace lrpcpp::autograd
