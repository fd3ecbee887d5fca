// Autograd of the linear family: backward = the epsilon-rule relevance ops.
#include "common.h"

namespace lrpcpp::autograd {
namespace {

class LinearEpsilonFunction : public torch::autograd::Function<LinearEpsilonFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                        double epsilon) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor y = lrpcpp::linear_epsilon(x, weight, bias, epsilon);
    ctx->save_for_backward({x, weight, y});
    ctx->saved_data["epsilon"] = epsilon;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    Tensor rx;
    if (ctx->needs_input_grad(0)) {
      rx = lrpcpp::linear_epsilon_relevance(grads[0], s[0], s[1], s[2], ctx->saved_data["epsilon"].toDouble());
    }
    return {rx, Tensor(), Tensor(), Tensor()};
  }
};

class Conv2dEpsilonFunction : public torch::autograd::Function<Conv2dEpsilonFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        double epsilon) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor y = lrpcpp::conv2d_epsilon(x, weight, bias, stride, padding, dilation, groups, epsilon);
    ctx->save_for_backward({x, weight, y});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["epsilon"] = epsilon;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    Tensor rx;
    if (ctx->needs_input_grad(0)) {
      rx = lrpcpp::conv2d_epsilon_relevance(grads[0], s[0], s[1], s[2], d["stride"].toIntVector(),
                                            d["padding"].toIntVector(), d["dilation"].toIntVector(),
                                            d["groups"].toInt(), d["epsilon"].toDouble());
    }
    return {rx, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor linear_epsilon_autograd(const Tensor& x, const Tensor& weight, const OptTensor& bias, double epsilon) {
  return LinearEpsilonFunction::apply(x, weight, bias, epsilon);
}

Tensor conv2d_epsilon_autograd(const Tensor& x, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double epsilon) {
  return Conv2dEpsilonFunction::apply(x, weight, bias, stride, padding, dilation, groups, epsilon);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Autograd, m) {
  m.impl("linear_epsilon", &linear_epsilon_autograd);
  m.impl("conv2d_epsilon", &conv2d_epsilon_autograd);
  m.impl("stab_div", torch::autograd::autogradNotImplementedFallback());
  m.impl("linear_epsilon_relevance", torch::autograd::autogradNotImplementedFallback());
  m.impl("conv2d_epsilon_relevance", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace lrpcpp::autograd
