// Autograd of the vision family: one torch::autograd::Function for the twelve forward ops. Its
// forward redispatches to the op that was called; its backward calls that op's relevance op
// through the dispatcher. Weights, biases, weight transforms and the z-box bounds take no
// relevance; scalars live in ctx->saved_data.
#include "common.h"

namespace lrpcpp::autograd {
namespace {

enum class Rule : int64_t { Gamma, AlphaBeta, ZPlus, ZBox, Flat, WSquare };

// Everything but the tensors: the rule, whether it is a convolution and its geometry, and the
// rule's scalars (gamma, or alpha and beta), epsilon and the gi flag.
struct Spec {
  Rule rule;
  bool conv;
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
  double p0, p1, epsilon;
  bool gi;
};

Tensor call_forward(const Spec& s, const Tensor& x, const Tensor& w, const OptTensor& b, const OptTensor& t,
                    const OptTensor& t2, const Tensor& lo, const Tensor& hi) {
  if (!s.conv) {
    switch (s.rule) {
      case Rule::Gamma: return lrpcpp::linear_gamma(x, w, b, s.p0, s.epsilon, t, s.gi);
      case Rule::AlphaBeta: return lrpcpp::linear_alpha_beta(x, w, b, s.p0, s.p1, s.epsilon, t, t2, s.gi);
      case Rule::ZPlus: return lrpcpp::linear_z_plus(x, w, b, s.epsilon, t, s.gi);
      case Rule::ZBox: return lrpcpp::linear_z_box(x, w, b, lo, hi, s.epsilon, t, s.gi);
      case Rule::Flat: return lrpcpp::linear_flat(x, w, b, s.epsilon, s.gi);
      case Rule::WSquare: return lrpcpp::linear_w_square(x, w, b, s.epsilon, t, s.gi);
    }
  }
  const auto &st = s.stride, &pa = s.padding, &di = s.dilation;
  switch (s.rule) {
    case Rule::Gamma: return lrpcpp::conv2d_gamma(x, w, b, st, pa, di, s.groups, s.p0, s.epsilon, t, s.gi);
    case Rule::AlphaBeta:
      return lrpcpp::conv2d_alpha_beta(x, w, b, st, pa, di, s.groups, s.p0, s.p1, s.epsilon, t, t2, s.gi);
    case Rule::ZPlus: return lrpcpp::conv2d_z_plus(x, w, b, st, pa, di, s.groups, s.epsilon, t, s.gi);
    case Rule::ZBox: return lrpcpp::conv2d_z_box(x, w, b, lo, hi, st, pa, di, s.groups, s.epsilon, t, s.gi);
    case Rule::Flat: return lrpcpp::conv2d_flat(x, w, b, st, pa, di, s.groups, s.epsilon, s.gi);
    case Rule::WSquare: return lrpcpp::conv2d_w_square(x, w, b, st, pa, di, s.groups, s.epsilon, t, s.gi);
  }
  TORCH_INTERNAL_ASSERT(false, "lrpcpp: unknown vision rule");
}

Tensor call_relevance(const Spec& s, const Tensor& g, const Tensor& x, const Tensor& w, const OptTensor& b,
                      const OptTensor& t, const OptTensor& t2, const Tensor& lo, const Tensor& hi, const Tensor& y) {
  if (!s.conv) {
    switch (s.rule) {
      case Rule::Gamma: return lrpcpp::linear_gamma_relevance(g, x, w, b, t, y, s.p0, s.epsilon, s.gi);
      case Rule::AlphaBeta:
        return lrpcpp::linear_alpha_beta_relevance(g, x, w, t, t2, y, s.p0, s.p1, s.epsilon, s.gi);
      case Rule::ZPlus: return lrpcpp::linear_z_plus_relevance(g, x, w, t, y, s.epsilon, s.gi);
      case Rule::ZBox: return lrpcpp::linear_z_box_relevance(g, x, w, lo, hi, t, y, s.epsilon, s.gi);
      case Rule::Flat: return lrpcpp::linear_flat_relevance(g, x, w, y, s.epsilon, s.gi);
      case Rule::WSquare: return lrpcpp::linear_w_square_relevance(g, x, w, t, y, s.epsilon, s.gi);
    }
  }
  const auto &st = s.stride, &pa = s.padding, &di = s.dilation;
  switch (s.rule) {
    case Rule::Gamma:
      return lrpcpp::conv2d_gamma_relevance(g, x, w, b, t, y, st, pa, di, s.groups, s.p0, s.epsilon, s.gi);
    case Rule::AlphaBeta:
      return lrpcpp::conv2d_alpha_beta_relevance(g, x, w, t, t2, y, st, pa, di, s.groups, s.p0, s.p1, s.epsilon,
                                                 s.gi);
    case Rule::ZPlus: return lrpcpp::conv2d_z_plus_relevance(g, x, w, t, y, st, pa, di, s.groups, s.epsilon, s.gi);
    case Rule::ZBox:
      return lrpcpp::conv2d_z_box_relevance(g, x, w, lo, hi, t, y, st, pa, di, s.groups, s.epsilon, s.gi);
    case Rule::Flat: return lrpcpp::conv2d_flat_relevance(g, x, w, y, st, pa, di, s.groups, s.epsilon, s.gi);
    case Rule::WSquare:
      return lrpcpp::conv2d_w_square_relevance(g, x, w, t, y, st, pa, di, s.groups, s.epsilon, s.gi);
  }
  TORCH_INTERNAL_ASSERT(false, "lrpcpp: unknown vision rule");
}

class VisionRuleFunction : public torch::autograd::Function<VisionRuleFunction> {
 public:
  // inputs 0-6 are tensors (x, weight, bias, two weight transforms, lower, upper); the rest take no
  // gradient
  static constexpr int kInputs = 17;

  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                        const OptTensor& transform, const OptTensor& transform2, const OptTensor& lower,
                        const OptTensor& upper, int64_t rule,
                        bool conv, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                        int64_t groups, double p0, double p1, double epsilon, bool gi) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const Spec s{static_cast<Rule>(rule), conv, stride.vec(), padding.vec(), dilation.vec(), groups, p0, p1, epsilon,
                 gi};
    const Tensor lo = saved_or_undefined(lower), hi = saved_or_undefined(upper);
    Tensor y = call_forward(s, x, weight, bias, transform, transform2, lo, hi);
    ctx->save_for_backward({x, weight, saved_or_undefined(bias), saved_or_undefined(transform),
                            saved_or_undefined(transform2), lo, hi, y});
    auto& d = ctx->saved_data;
    d["rule"] = rule;
    d["conv"] = conv;
    d["stride"] = s.stride;
    d["padding"] = s.padding;
    d["dilation"] = s.dilation;
    d["groups"] = groups;
    d["p0"] = p0;
    d["p1"] = p1;
    d["epsilon"] = epsilon;
    d["gi"] = gi;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(kInputs);
    if (!ctx->needs_input_grad(0)) return out;
    const auto v = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    const Spec s{static_cast<Rule>(d["rule"].toInt()), d["conv"].toBool(), d["stride"].toIntVector(),
                 d["padding"].toIntVector(), d["dilation"].toIntVector(), d["groups"].toInt(), d["p0"].toDouble(),
                 d["p1"].toDouble(), d["epsilon"].toDouble(), d["gi"].toBool()};
    out[0] = call_relevance(s, grads[0], v[0], v[1], optional_tensor(v[2]), optional_tensor(v[3]),
                            optional_tensor(v[4]), v[5], v[6], v[7]);
    return out;
  }
};

const std::vector<int64_t> kNone{};

Tensor linear_apply(Rule rule, const Tensor& x, const Tensor& w, const OptTensor& b, const OptTensor& t,
                    const OptTensor& lo, const OptTensor& hi, double p0, double p1, double epsilon, bool gi,
                    const OptTensor& t2 = std::nullopt) {
  return VisionRuleFunction::apply(x, w, b, t, t2, lo, hi, static_cast<int64_t>(rule), false, kNone, kNone, kNone, 1,
                                   p0, p1, epsilon, gi);
}

Tensor conv_apply(Rule rule, const Tensor& x, const Tensor& w, const OptTensor& b, const OptTensor& t,
                  const OptTensor& lo, const OptTensor& hi, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation, int64_t groups, double p0, double p1, double epsilon, bool gi,
                  const OptTensor& t2 = std::nullopt) {
  return VisionRuleFunction::apply(x, w, b, t, t2, lo, hi, static_cast<int64_t>(rule), true, stride, padding,
                                   dilation, groups, p0, p1, epsilon, gi);
}

Tensor linear_gamma_autograd(const Tensor& x, const Tensor& w, const OptTensor& b, double gamma, double epsilon,
                             const OptTensor& t, bool gi) {
  return linear_apply(Rule::Gamma, x, w, b, t, std::nullopt, std::nullopt, gamma, 0.0, epsilon, gi);
}

Tensor linear_alpha_beta_autograd(const Tensor& x, const Tensor& w, const OptTensor& b, double alpha, double beta,
                                  double epsilon, const OptTensor& t, const OptTensor& t2, bool gi) {
  return linear_apply(Rule::AlphaBeta, x, w, b, t, std::nullopt, std::nullopt, alpha, beta, epsilon, gi, t2);
}

Tensor linear_z_plus_autograd(const Tensor& x, const Tensor& w, const OptTensor& b, double epsilon,
                              const OptTensor& t, bool gi) {
  return linear_apply(Rule::ZPlus, x, w, b, t, std::nullopt, std::nullopt, 0.0, 0.0, epsilon, gi);
}

Tensor linear_z_box_autograd(const Tensor& x, const Tensor& w, const OptTensor& b, const Tensor& lo, const Tensor& hi,
                             double epsilon, const OptTensor& t, bool gi) {
  return linear_apply(Rule::ZBox, x, w, b, t, lo, hi, 0.0, 0.0, epsilon, gi);
}

Tensor linear_flat_autograd(const Tensor& x, const Tensor& w, const OptTensor& b, double epsilon, bool gi) {
  return linear_apply(Rule::Flat, x, w, b, std::nullopt, std::nullopt, std::nullopt, 0.0, 0.0, epsilon, gi);
}

Tensor linear_w_square_autograd(const Tensor& x, const Tensor& w, const OptTensor& b, double epsilon,
                                const OptTensor& t, bool gi) {
  return linear_apply(Rule::WSquare, x, w, b, t, std::nullopt, std::nullopt, 0.0, 0.0, epsilon, gi);
}

Tensor conv2d_gamma_autograd(const Tensor& x, const Tensor& w, const OptTensor& b, at::IntArrayRef st,
                             at::IntArrayRef pa, at::IntArrayRef di, int64_t groups, double gamma, double epsilon,
                             const OptTensor& t, bool gi) {
  return conv_apply(Rule::Gamma, x, w, b, t, std::nullopt, std::nullopt, st, pa, di, groups, gamma, 0.0, epsilon, gi);
}

Tensor conv2d_alpha_beta_autograd(const Tensor& x, const Tensor& w, const OptTensor& b, at::IntArrayRef st,
                                  at::IntArrayRef pa, at::IntArrayRef di, int64_t groups, double alpha, double beta,
                                  double epsilon, const OptTensor& t, const OptTensor& t2, bool gi) {
  return conv_apply(Rule::AlphaBeta, x, w, b, t, std::nullopt, std::nullopt, st, pa, di, groups, alpha, beta,
                    epsilon, gi, t2);
}

Tensor conv2d_z_plus_autograd(const Tensor& x, const Tensor& w, const OptTensor& b, at::IntArrayRef st,
                              at::IntArrayRef pa, at::IntArrayRef di, int64_t groups, double epsilon,
                              const OptTensor& t, bool gi) {
  return conv_apply(Rule::ZPlus, x, w, b, t, std::nullopt, std::nullopt, st, pa, di, groups, 0.0, 0.0, epsilon, gi);
}

Tensor conv2d_z_box_autograd(const Tensor& x, const Tensor& w, const OptTensor& b, const Tensor& lo,
                             const Tensor& hi, at::IntArrayRef st, at::IntArrayRef pa, at::IntArrayRef di,
                             int64_t groups, double epsilon, const OptTensor& t, bool gi) {
  return conv_apply(Rule::ZBox, x, w, b, t, lo, hi, st, pa, di, groups, 0.0, 0.0, epsilon, gi);
}

Tensor conv2d_flat_autograd(const Tensor& x, const Tensor& w, const OptTensor& b, at::IntArrayRef st,
                            at::IntArrayRef pa, at::IntArrayRef di, int64_t groups, double epsilon, bool gi) {
  return conv_apply(Rule::Flat, x, w, b, std::nullopt, std::nullopt, std::nullopt, st, pa, di, groups, 0.0, 0.0,
                    epsilon, gi);
}

Tensor conv2d_w_square_autograd(const Tensor& x, const Tensor& w, const OptTensor& b, at::IntArrayRef st,
                                at::IntArrayRef pa, at::IntArrayRef di, int64_t groups, double epsilon,
                                const OptTensor& t, bool gi) {
  return conv_apply(Rule::WSquare, x, w, b, t, std::nullopt, std::nullopt, st, pa, di, groups, 0.0, 0.0, epsilon,
                    gi);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Autograd, m) {
  m.impl("linear_gamma", &linear_gamma_autograd);
  m.impl("linear_alpha_beta", &linear_alpha_beta_autograd);
  m.impl("linear_z_plus", &linear_z_plus_autograd);
  m.impl("linear_z_box", &linear_z_box_autograd);
  m.impl("linear_flat", &linear_flat_autograd);
  m.impl("linear_w_square", &linear_w_square_autograd);
  m.impl("conv2d_gamma", &conv2d_gamma_autograd);
  m.impl("conv2d_alpha_beta", &conv2d_alpha_beta_autograd);
  m.impl("conv2d_z_plus", &conv2d_z_plus_autograd);
  m.impl("conv2d_z_box", &conv2d_z_box_autograd);
  m.impl("conv2d_flat", &conv2d_flat_autograd);
  m.impl("conv2d_w_square", &conv2d_w_square_autograd);
  for (const char* name :
       {"linear_gamma_relevance", "linear_alpha_beta_relevance", "linear_z_plus_relevance", "linear_z_box_relevance",
        "linear_flat_relevance", "linear_w_square_relevance", "conv2d_gamma_relevance",
        "conv2d_alpha_beta_relevance", "conv2d_z_plus_relevance", "conv2d_z_box_relevance", "conv2d_flat_relevance",
        "conv2d_w_square_relevance", "gamma_stab_div", "alpha_beta_stab_div", "split_times_input"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}

}  // namespace lrpcpp::autograd
