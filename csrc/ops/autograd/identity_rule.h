// The identity rule as one autograd Function: the forward is any lrpcpp op
// of x (its other arguments, weights included, take no relevance), and the
// backward is identity_relevance, R cast to x's dtype. R_x does not depend on x, so a backward with
// create_graph=True is refused (check_no_double_backward) rather than returning a graph-less result.
#pragma once

#include <functional>

#include "common.h"

namespace lrpcpp::autograd {

class IdentityRuleFunction : public torch::autograd::Function<IdentityRuleFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const char* name, const std::function<Tensor()>& op) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["dtype"] = x.scalar_type();
    ctx->saved_data["op"] = std::string(name);
    return op();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_no_double_backward(ctx->saved_data["op"].toStringRef());
    return {lrpcpp::identity_relevance(grads[0], ctx->saved_data["dtype"].toScalarType()), Tensor(), Tensor()};
  }
};

// `name`: the op, as errors name it ("lrpcpp.silu_identity")
inline Tensor identity_rule(const Tensor& x, const char* name, const std::function<Tensor()>& op) {
  return IdentityRuleFunction::apply(x, name, op);
}

}  // namespace lrpcpp::autograd
