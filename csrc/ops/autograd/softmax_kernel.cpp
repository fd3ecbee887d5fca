// Autograd of softmax: backward = the Deep Taylor relevance op.
#include "common.h"

namespace lrpcpp::autograd {
namespace {

class SoftmaxFunction : public torch::autograd::Function<SoftmaxFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, int64_t dim, double temperature,
                        std::optional<at::ScalarType> dtype) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor s = lrpcpp::softmax(x, dim, temperature, dtype);
    ctx->save_for_backward({x, s});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["temperature"] = temperature;
    return s;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    Tensor rx = lrpcpp::softmax_relevance(grads[0], s[0], s[1], ctx->saved_data["dim"].toInt(),
                                          ctx->saved_data["temperature"].toDouble());
    return {rx, Tensor(), Tensor(), Tensor()};
  }
};

Tensor softmax_autograd(const Tensor& x, int64_t dim, double temperature, std::optional<at::ScalarType> dtype) {
  return SoftmaxFunction::apply(x, dim, temperature, dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Autograd, m) {
  m.impl("softmax", &softmax_autograd);
  m.impl("softmax_relevance", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace lrpcpp::autograd
