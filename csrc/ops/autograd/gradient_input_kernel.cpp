// Autograd of the gradient-times-input ops. Their backwards return ordinary
// gradients g = R / x of the rule (not relevance), through the registered ops
// gi_scale_backward and gi_layer_norm_backward (from the forward's rstd: no x); y, scale, weight and bias take
// no gradient. gi_identity's and gi_grad_scale's backward g * factor has no graph to x (the factor
// is saved without one), so they refuse create_graph=True (check_no_double_backward), and so does
// gi_layer_norm's (its backward op reads the forward's rstd, saved without a graph, not x).
// gi_identity's and gi_grad_scale's forwards return their input y or x itself: a custom Function
// returns an input as a view of it with the Function's gradient (no copy; modifying that view in
// place is refused, as for any view a custom Function returns).
#include "common.h"

namespace lrpcpp::autograd {
namespace {

class GiIdentityFunction : public torch::autograd::Function<GiIdentityFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& y, double epsilon, bool keep_inputs) {
    at::AutoDispatchBelowADInplaceOrView guard;
    if (keep_inputs) {
      // x and y, which the layers before and after keep as well: the factor is computed in the backward
      ctx->save_for_backward({x, y});
      ctx->saved_data["epsilon"] = epsilon;
    } else {
      // only the factor is kept: it takes the place of the x that a plain gradient of f keeps
      ctx->save_for_backward({lrpcpp::gi_identity_factor(x, y, epsilon)});
    }
    ctx->saved_data["dtype"] = x.scalar_type();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_no_double_backward("lrpcpp.gi_identity");
    const auto s = ctx->get_saved_variables();
    Tensor gx;
    if (ctx->needs_input_grad(0)) {
      // (x read without its graph: no derivative of the factor is wanted) the factor the forward keeps otherwise
      const Tensor factor =
          s.size() == 2 ? lrpcpp::gi_identity_factor(s[0].detach(), s[1], ctx->saved_data["epsilon"].toDouble()) : s[0];
      gx = lrpcpp::gi_scale_backward(grads[0], factor, ctx->saved_data["dtype"].toScalarType());
    }
    return {gx, Tensor(), Tensor(), Tensor()};
  }
};

class GiGradScaleFunction : public torch::autograd::Function<GiGradScaleFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& scale) {
    impl::check_gi_grad_scale(x, scale);
    ctx->save_for_backward({scale});
    ctx->saved_data["dtype"] = x.scalar_type();
    return x;
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
    impl::check_norm(x, normalized_shape, weight, bias, eps, "lrpcpp.gi_layer_norm");
    // the value of at::layer_norm (which computes it so), with the 1 / sigma per row it computes on the
    // way: the backward needs only that, so x is not kept (a plain gradient of a layer norm keeps it)
    auto [y, mean, rstd] = at::native_layer_norm(x, normalized_shape, weight, bias, eps);
    ctx->save_for_backward({rstd, saved_or_undefined(weight)});
    ctx->saved_data["normalized_shape"] = normalized_shape.vec();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // (rstd is saved without a graph to x: the backward's dependence on x would be missed)
    check_no_double_backward("lrpcpp.gi_layer_norm");
    const auto s = ctx->get_saved_variables();
    Tensor gx;
    if (ctx->needs_input_grad(0)) {
      gx = lrpcpp::gi_layer_norm_backward(grads[0], s[0], ctx->saved_data["normalized_shape"].toIntVector(),
                                          optional_tensor(s[1]));
    }
    return {gx, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor gi_identity_autograd(const Tensor& x, const Tensor& y, double epsilon, bool keep_inputs) {
  // checked here too, so that errors name the op that was called rather than its fused forward
  impl::check_gi_identity(x, y, epsilon, "lrpcpp.gi_identity");
  if (!(at::GradMode::is_enabled() && x.requires_grad())) {
    // nothing will flow back to x: y itself, detached (y takes no gradient), without the factor
    return y.detach();
  }
  return GiIdentityFunction::apply(x, y, epsilon, keep_inputs);
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
  m.impl("gi_identity_factor", torch::autograd::autogradNotImplementedFallback());
  m.impl("gi_scale_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("gi_layer_norm_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace lrpcpp::autograd
