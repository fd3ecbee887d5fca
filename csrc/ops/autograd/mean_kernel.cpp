// Autograd of mean: backward = the mean relevance op.
#include "common.h"

namespace lrpcpp::autograd {
namespace {

class MeanFunction : public torch::autograd::Function<MeanFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, at::OptionalIntArrayRef dim, bool keepdim,
                        double epsilon) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x});
    ctx->saved_data["dim"] = dim.has_value() ? c10::IValue(dim->vec()) : c10::IValue();
    ctx->saved_data["keepdim"] = keepdim;
    ctx->saved_data["epsilon"] = epsilon;
    return lrpcpp::mean(x, dim, keepdim, epsilon);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    std::optional<std::vector<int64_t>> dim;
    if (!d["dim"].isNone()) dim = d["dim"].toIntVector();
    Tensor rx = lrpcpp::mean_relevance(grads[0], s[0], dim.has_value() ? at::OptionalIntArrayRef(*dim) : std::nullopt,
                                       d["keepdim"].toBool(), d["epsilon"].toDouble());
    return {rx, Tensor(), Tensor(), Tensor()};
  }
};

Tensor mean_autograd(const Tensor& x, at::OptionalIntArrayRef dim, bool keepdim, double epsilon) {
  return MeanFunction::apply(x, dim, keepdim, epsilon);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Autograd, m) {
  m.impl("mean", &mean_autograd);
  m.impl("mean_relevance", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace lrpcpp::autograd
