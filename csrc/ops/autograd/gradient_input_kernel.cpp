// Autograd of the gradient-times-input ops. Their backwards return ordinary
// gradients g = R / x of the rule (not relevance), through the registered ops
// gi_scale_backward and gi_layer_norm_backward; y, scale, weight and bias take
// no gradient. gi_identity's and gi_grad_scale's backward g * factor has no graph to x (the factor
// is saved without one), so they refuse create_graph=True (check_no_double_backward); gi_layer_norm's
// backward op takes x and raises on a second backward like the relevance ops.
#include "common.h"

namespace lrpcpp::autograd {
namespace {

class GiIdentityFunction : public torch::autograd::Function<GiIdentityFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& y, double epsilon) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // one pass: the copy of y and the factor y / stab(x); only the factor is kept
    auto [out, factor] = lrpcpp::gi_identity_forward(x, y, epsilon);
    ctx->save_for_backward({factor});
    ctx->saved_data["dtype"] = x.scalar_type();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_no_double_backward("lrpcpp.gi_identity");
    const auto s = ctx->get_saved_variables();
    Tensor gx;
    if (ctx->needs_input_grad(0)) {
      gx = lrpcpp::gi_scale_backward(grads[0], s[0], ctx->saved_data["dtype"].toScalarType());
    }
    return {gx, Tensor(), Tensor()};
  }
};

class GiGradScaleFunction : public torch::autograd::Function<GiGradScaleFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({scale});
    ctx->saved_data["dtype"] = x.scalar_type();
    return lrpcpp::gi_grad_scale(x, scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_no_double_backward("lrpcpp.gi_grad_scale");
    const auto s = ctx->get_saved_variables();
    Tensor gx;
    if (ctx->needs_input_grad(0)) {
      gx = lrpcpp::gi_scale_backward(grads[0], s[0], ctx->saved_data["dtype"].toScalarType());
    }
    return {gx, Tensor()};
  }
};

class GiLayerNormFunction : public torch::autograd::Function<GiLayerNormFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, at::IntArrayRef normalized_shape,
                        const OptTensor& weight, const OptTensor& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, saved_or_undefined(weight)});
    ctx->saved_data["normalized_shape"] = normalized_shape.vec();
    ctx->saved_data["eps"] = eps;
    return lrpcpp::gi_layer_norm(x, normalized_shape, weight, bias, eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    Tensor gx;
    if (ctx->needs_input_grad(0)) {
      gx = lrpcpp::gi_layer_norm_backward(grads[0], s[0], d["normalized_shape"].toIntVector(), optional_tensor(s[1]),
                                          d["eps"].toDouble());
    }
    return {gx, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor gi_identity_autograd(const Tensor& x, const Tensor& y, double epsilon) {
  // checked here too, so that errors name the op that was called rather than its fused forward
  impl::check_gi_identity(x, y, epsilon, "lrpcpp.gi_identity");
  if (!(at::GradMode::is_enabled() && x.requires_grad())) {
    // nothing will flow back to x: the plain copy, without computing the factor
    at::AutoDispatchBelowADInplaceOrView guard;
    return lrpcpp::gi_identity(x, y, epsilon);
  }
  return GiIdentityFunction::apply(x, y, epsilon);
}

Tensor gi_grad_scale_autograd(const Tensor& x, const Tensor& scale) {
  return GiGradScaleFunction::apply(x, scale);
}

Tensor gi_layer_norm_autograd(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                              const OptTensor& bias, double eps) {
  return GiLayerNormFunction::apply(x, normalized_shape, weight, bias, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Autograd, m) {
  m.impl("gi_identity", &gi_identity_autograd);
  m.impl("gi_grad_scale", &gi_grad_scale_autograd);
  m.impl("gi_layer_norm", &gi_layer_norm_autograd);
  m.impl("gi_identity_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("gi_scale_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("gi_layer_norm_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace lrpcpp::autograd
