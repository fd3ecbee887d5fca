// Autograd of the normalisation layers: identity rule for rms_norm_identity,
// layer_norm_identity and normalize_identity; the epsilon relevance op for
// layer_norm.
#include "identity_rule.h"

namespace lrpcpp::autograd {
namespace {

class LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, at::IntArrayRef normalized_shape,
                        const OptTensor& weight, const OptTensor& bias, double eps, double epsilon) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, saved_or_undefined(weight), saved_or_undefined(bias)});
    ctx->saved_data["normalized_shape"] = normalized_shape.vec();
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["epsilon"] = epsilon;
    return lrpcpp::layer_norm(x, normalized_shape, weight, bias, eps, epsilon);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    Tensor rx;
    if (ctx->needs_input_grad(0)) {
      rx = lrpcpp::layer_norm_relevance(grads[0], s[0], d["normalized_shape"].toIntVector(), optional_tensor(s[1]),
                                        optional_tensor(s[2]), d["eps"].toDouble(), d["epsilon"].toDouble());
    }
    return {rx, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor layer_norm_autograd(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                           const OptTensor& bias, double eps, double epsilon) {
  return LayerNormFunction::apply(x, normalized_shape, weight, bias, eps, epsilon);
}

Tensor rms_norm_identity_autograd(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                                  std::optional<double> eps) {
  return identity_rule(x, "lrpcpp.rms_norm_identity",
                       [&] { return lrpcpp::rms_norm_identity(x, normalized_shape, weight, eps); });
}

Tensor layer_norm_identity_autograd(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                                    const OptTensor& bias, double eps) {
  return identity_rule(x, "lrpcpp.layer_norm_identity",
                       [&] { return lrpcpp::layer_norm_identity(x, normalized_shape, weight, bias, eps); });
}

Tensor normalize_identity_autograd(const Tensor& x, double p, int64_t dim, double eps) {
  return identity_rule(x, "lrpcpp.normalize_identity", [&] { return lrpcpp::normalize_identity(x, p, dim, eps); });
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Autograd, m) {
  m.impl("rms_norm_identity", &rms_norm_identity_autograd);
  m.impl("layer_norm", &layer_norm_autograd);
  m.impl("layer_norm_identity", &layer_norm_identity_autograd);
  m.impl("normalize_identity", &normalize_identity_autograd);
  m.impl("layer_norm_relevance", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace lrpcpp::autograd
