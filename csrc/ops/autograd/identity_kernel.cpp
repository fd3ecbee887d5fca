// Autograd of the identity-rule ops (activations and identity norms), whose
// relevance is R itself, and of stop_relevance, whose relevance is zero.
#include "identity_rule.h"

namespace lrpcpp::autograd {

namespace {

class StopRelevanceFunction : public torch::autograd::Function<StopRelevanceFunction> {
 public:
  static Tensor forward(AutogradContext* /*ctx*/, const Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return lrpcpp::stop_relevance(x);
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list grads) {
    check_no_double_backward("lrpcpp.stop_relevance");
    // the cut: no relevance flows back (zeros, so x.grad reads as R_x = 0)
    return {at::zeros_like(grads[0])};
  }
};

Tensor silu_autograd(const Tensor& x) {
  return identity_rule(x, "lrpcpp.silu_identity", [&] { return lrpcpp::silu_identity(x); });
}

Tensor gelu_autograd(const Tensor& x, c10::string_view approximate) {
  return identity_rule(x, "lrpcpp.gelu_identity", [&] { return lrpcpp::gelu_identity(x, approximate); });
}

Tensor tanh_autograd(const Tensor& x) {
  return identity_rule(x, "lrpcpp.tanh_identity", [&] { return lrpcpp::tanh_identity(x); });
}

Tensor relu_autograd(const Tensor& x) {
  return identity_rule(x, "lrpcpp.relu_identity", [&] { return lrpcpp::relu_identity(x); });
}

Tensor sigmoid_autograd(const Tensor& x) {
  return identity_rule(x, "lrpcpp.sigmoid_identity", [&] { return lrpcpp::sigmoid_identity(x); });
}

Tensor stop_relevance_autograd(const Tensor& x) {
  return StopRelevanceFunction::apply(x);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Autograd, m) {
  m.impl("silu_identity", &silu_autograd);
  m.impl("gelu_identity", &gelu_autograd);
  m.impl("tanh_identity", &tanh_autograd);
  m.impl("relu_identity", &relu_autograd);
  m.impl("sigmoid_identity", &sigmoid_autograd);
  m.impl("stop_relevance", &stop_relevance_autograd);
  m.impl("identity_relevance", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace lrpcpp::autograd
