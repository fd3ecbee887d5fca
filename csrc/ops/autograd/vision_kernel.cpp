// Autograd of the vision family: one torch::autograd::Function template, instantiated for each of its
// forward ops (and convolution_epsilon) with a small traits struct that names the op and the relevance
// op its backward calls. Its forward redispatches to the op and keeps every argument of it for the backward;
// weights, biases, weight transforms and the z-box bounds take no relevance.
#include <tuple>
#include <utility>

#include "common.h"

namespace lrpcpp::autograd {
namespace {

// How a forward keeps one argument of its op for the backward: tensors (an absent optional one as
// an undefined tensor) with save_for_backward, after x, weight and the output; scalars and the
// convolution geometry in ctx->saved_data, under the argument's position.
template <class T>
struct Kept {  // double, int64_t, bool
  static void save(AutogradContext* ctx, std::vector<Tensor>& /*tensors*/, const std::string& key, T value) {
    ctx->saved_data[key] = value;
  }
  static T load(AutogradContext* ctx, const variable_list& /*saved*/, size_t& /*slot*/, const std::string& key) {
    return ctx->saved_data[key].to<T>();
  }
};

template <>
struct Kept<at::IntArrayRef> {
  static void save(AutogradContext* ctx, std::vector<Tensor>& /*tensors*/, const std::string& key,
                   at::IntArrayRef value) {
    ctx->saved_data[key] = value.vec();
  }
  static std::vector<int64_t> load(AutogradContext* ctx, const variable_list& /*saved*/, size_t& /*slot*/,
                                   const std::string& key) {
    return ctx->saved_data[key].toIntVector();
  }
};

template <>
struct Kept<Tensor> {
  static void save(AutogradContext* /*ctx*/, std::vector<Tensor>& tensors, const std::string& /*key*/,
                   const Tensor& value) {
    tensors.push_back(value);
  }
  static Tensor load(AutogradContext* /*ctx*/, const variable_list& saved, size_t& slot, const std::string& /*key*/) {
    return saved[slot++];
  }
};

template <>
struct Kept<OptTensor> {
  static void save(AutogradContext* /*ctx*/, std::vector<Tensor>& tensors, const std::string& /*key*/,
                   const OptTensor& value) {
    tensors.push_back(saved_or_undefined(value));
  }
  static OptTensor load(AutogradContext* /*ctx*/, const variable_list& saved, size_t& slot,
                        const std::string& /*key*/) {
    return optional_tensor(saved[slot++]);
  }
};

// The autograd of the forward op Rule::forward(x, weight, args...): its backward calls
// Rule::relevance(grad, x, weight, output, args...), with the arguments the forward op received.
template <class Rule, class Signature = std::remove_pointer_t<std::remove_cv_t<decltype(Rule::forward)>>>
class VisionFunction;

template <class Rule, class... Args>
class VisionFunction<Rule, Tensor(const Tensor&, const Tensor&, Args...)>
    : public torch::autograd::Function<VisionFunction<Rule, Tensor(const Tensor&, const Tensor&, Args...)>> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, Args... args) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor y = Rule::forward(x, weight, args...);
    std::vector<Tensor> tensors{x, weight, y};
    size_t position = 0;
    (Kept<std::decay_t<Args>>::save(ctx, tensors, std::to_string(position++), args), ...);
    ctx->save_for_backward(tensors);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(2 + sizeof...(Args));
    if (!ctx->needs_input_grad(0)) return out;
    const auto saved = ctx->get_saved_variables();
    size_t slot = 3, position = 0;  // x, weight and the output come first
    // a braced list is evaluated left to right: the arguments are loaded in order (the counter is
    // advanced inside a call, which GCC's -Wsequence-point does not mistake for an unsequenced update)
    const auto next_name = [&position] { return std::to_string(position++); };
    const std::tuple<decltype(Kept<std::decay_t<Args>>::load(ctx, saved, slot, ""))...> args{
        Kept<std::decay_t<Args>>::load(ctx, saved, slot, next_name())...};
    out[0] = std::apply([&](const auto&... a) { return Rule::relevance(grads[0], saved[0], saved[1], saved[2], a...); },
                        args);
    return out;
  }

  // the kernel registered at the Autograd key
  static Tensor apply_rule(const Tensor& x, const Tensor& weight, Args... args) {
    return VisionFunction::apply(x, weight, args...);
  }
};

// The autograd of a pooling op Rule::forward(x, args...): its backward calls
// Rule::relevance(grad, x, output, args...).
template <class Rule, class Signature = std::remove_pointer_t<std::remove_cv_t<decltype(Rule::forward)>>>
class PoolFunction;

template <class Rule, class... Args>
class PoolFunction<Rule, Tensor(const Tensor&, Args...)>
    : public torch::autograd::Function<PoolFunction<Rule, Tensor(const Tensor&, Args...)>> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, Args... args) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor y = Rule::forward(x, args...);
    std::vector<Tensor> tensors{x, y};
    size_t position = 0;
    (Kept<std::decay_t<Args>>::save(ctx, tensors, std::to_string(position++), args), ...);
    ctx->save_for_backward(tensors);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(1 + sizeof...(Args));
    if (!ctx->needs_input_grad(0)) return out;
    const auto saved = ctx->get_saved_variables();
    size_t slot = 2, position = 0;  // x and the output come first
    // (in order, as above)
    const auto next_name = [&position] { return std::to_string(position++); };
    const std::tuple<decltype(Kept<std::decay_t<Args>>::load(ctx, saved, slot, ""))...> args{
        Kept<std::decay_t<Args>>::load(ctx, saved, slot, next_name())...};
    out[0] = std::apply([&](const auto&... a) { return Rule::relevance(grads[0], saved[0], saved[1], a...); }, args);
    return out;
  }

  static Tensor apply_rule(const Tensor& x, Args... args) {
    return PoolFunction::apply(x, args...);
  }
};

// The traits of each op: the forward op, and the call of its relevance op from the forward op's
// arguments and output y. alpha-beta, z-plus and w-square pass the bias to their relevance op, which
// counts it in the denominators, only with bias_in_denominator.
struct LinearGamma {
  static constexpr auto forward = &lrpcpp::linear_gamma;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& b,
                          double gamma, double epsilon, const OptTensor& w_abs, bool gi) {
    return lrpcpp::linear_gamma_relevance(g, x, w, b, w_abs, y, gamma, epsilon, gi);
  }
};

struct LinearAlphaBeta {
  static constexpr auto forward = &lrpcpp::linear_alpha_beta;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& b,
                          double alpha, double beta, double epsilon, const OptTensor& w_pos, const OptTensor& w_neg,
                          bool gi, bool in_denominator) {
    return lrpcpp::linear_alpha_beta_relevance(g, x, w, w_pos, w_neg, y, alpha, beta, epsilon, gi,
                                               in_denominator ? b : OptTensor());
  }
};

struct LinearZPlus {
  static constexpr auto forward = &lrpcpp::linear_z_plus;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& b,
                          double epsilon, const OptTensor& w_pos, bool gi, bool in_denominator) {
    return lrpcpp::linear_z_plus_relevance(g, x, w, w_pos, y, epsilon, gi, in_denominator ? b : OptTensor());
  }
};

struct LinearZBox {
  static constexpr auto forward = &lrpcpp::linear_z_box;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& /*b*/,
                          const Tensor& lo, const Tensor& hi, double epsilon, const OptTensor& w_abs, bool gi) {
    return lrpcpp::linear_z_box_relevance(g, x, w, lo, hi, w_abs, y, epsilon, gi);
  }
};

struct LinearFlat {
  static constexpr auto forward = &lrpcpp::linear_flat;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& /*b*/,
                          double epsilon, bool gi) {
    return lrpcpp::linear_flat_relevance(g, x, w, y, epsilon, gi);
  }
};

struct LinearWSquare {
  static constexpr auto forward = &lrpcpp::linear_w_square;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& b,
                          double epsilon, const OptTensor& w_sq, bool gi, bool in_denominator) {
    return lrpcpp::linear_w_square_relevance(g, x, w, w_sq, y, epsilon, gi, in_denominator ? b : OptTensor());
  }
};

struct Conv2dGamma {
  static constexpr auto forward = &lrpcpp::conv2d_gamma;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& b,
                          IntRef st, IntRef pa, IntRef di, int64_t groups, double gamma, double epsilon,
                          const OptTensor& w_abs, bool gi) {
    return lrpcpp::conv2d_gamma_relevance(g, x, w, b, w_abs, y, st, pa, di, groups, gamma, epsilon, gi);
  }
};

struct Conv2dAlphaBeta {
  static constexpr auto forward = &lrpcpp::conv2d_alpha_beta;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& b,
                          IntRef st, IntRef pa, IntRef di, int64_t groups, double alpha, double beta, double epsilon,
                          const OptTensor& w_pos, const OptTensor& w_neg, bool gi, bool in_denominator) {
    return lrpcpp::conv2d_alpha_beta_relevance(g, x, w, w_pos, w_neg, y, st, pa, di, groups, alpha, beta, epsilon, gi,
                                               in_denominator ? b : OptTensor());
  }
};

struct Conv2dZPlus {
  static constexpr auto forward = &lrpcpp::conv2d_z_plus;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& b,
                          IntRef st, IntRef pa, IntRef di, int64_t groups, double epsilon, const OptTensor& w_pos,
                          bool gi, bool in_denominator) {
    return lrpcpp::conv2d_z_plus_relevance(g, x, w, w_pos, y, st, pa, di, groups, epsilon, gi,
                                           in_denominator ? b : OptTensor());
  }
};

struct Conv2dZBox {
  static constexpr auto forward = &lrpcpp::conv2d_z_box;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& /*b*/,
                          const Tensor& lo, const Tensor& hi, IntRef st, IntRef pa, IntRef di, int64_t groups,
                          double epsilon, const OptTensor& w_abs, bool gi) {
    return lrpcpp::conv2d_z_box_relevance(g, x, w, lo, hi, w_abs, y, st, pa, di, groups, epsilon, gi);
  }
};

struct Conv2dFlat {
  static constexpr auto forward = &lrpcpp::conv2d_flat;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& /*b*/,
                          IntRef st, IntRef pa, IntRef di, int64_t groups, double epsilon, bool gi) {
    return lrpcpp::conv2d_flat_relevance(g, x, w, y, st, pa, di, groups, epsilon, gi);
  }
};

struct Conv2dWSquare {
  static constexpr auto forward = &lrpcpp::conv2d_w_square;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& b,
                          IntRef st, IntRef pa, IntRef di, int64_t groups, double epsilon, const OptTensor& w_sq,
                          bool gi, bool in_denominator) {
    return lrpcpp::conv2d_w_square_relevance(g, x, w, w_sq, y, st, pa, di, groups, epsilon, gi,
                                             in_denominator ? b : OptTensor());
  }
};

// any convolution: the geometry (stride, padding, dilation, transposed, output_padding, groups) passes through
#define CONV_ARGS IntRef st, IntRef pa, IntRef di, bool tr, IntRef op, int64_t groups
#define CONV_VALUES st, pa, di, tr, op, groups

struct ConvolutionEpsilon {
  static constexpr auto forward = &lrpcpp::convolution_epsilon;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& /*b*/,
                          CONV_ARGS, double epsilon) {
    return lrpcpp::convolution_epsilon_relevance(g, x, w, y, CONV_VALUES, epsilon);
  }
};

struct ConvolutionGamma {
  static constexpr auto forward = &lrpcpp::convolution_gamma;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& b,
                          CONV_ARGS, double gamma, double epsilon, const OptTensor& w_abs, bool gi) {
    return lrpcpp::convolution_gamma_relevance(g, x, w, b, w_abs, y, CONV_VALUES, gamma, epsilon, gi);
  }
};

struct ConvolutionAlphaBeta {
  static constexpr auto forward = &lrpcpp::convolution_alpha_beta;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& b,
                          CONV_ARGS, double alpha, double beta, double epsilon, const OptTensor& w_pos,
                          const OptTensor& w_neg, bool gi, bool in_denominator) {
    return lrpcpp::convolution_alpha_beta_relevance(g, x, w, w_pos, w_neg, y, CONV_VALUES, alpha, beta, epsilon, gi,
                                                    in_denominator ? b : OptTensor());
  }
};

struct ConvolutionZPlus {
  static constexpr auto forward = &lrpcpp::convolution_z_plus;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& b,
                          CONV_ARGS, double epsilon, const OptTensor& w_pos, bool gi, bool in_denominator) {
    return lrpcpp::convolution_z_plus_relevance(g, x, w, w_pos, y, CONV_VALUES, epsilon, gi,
                                                in_denominator ? b : OptTensor());
  }
};

struct ConvolutionZBox {
  static constexpr auto forward = &lrpcpp::convolution_z_box;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& /*b*/,
                          const Tensor& lo, const Tensor& hi, CONV_ARGS, double epsilon, const OptTensor& w_abs,
                          bool gi) {
    return lrpcpp::convolution_z_box_relevance(g, x, w, lo, hi, w_abs, y, CONV_VALUES, epsilon, gi);
  }
};

struct ConvolutionFlat {
  static constexpr auto forward = &lrpcpp::convolution_flat;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& /*b*/,
                          CONV_ARGS, double epsilon, bool gi) {
    return lrpcpp::convolution_flat_relevance(g, x, w, y, CONV_VALUES, epsilon, gi);
  }
};

struct ConvolutionWSquare {
  static constexpr auto forward = &lrpcpp::convolution_w_square;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& y, const OptTensor& b,
                          CONV_ARGS, double epsilon, const OptTensor& w_sq, bool gi, bool in_denominator) {
    return lrpcpp::convolution_w_square_relevance(g, x, w, w_sq, y, CONV_VALUES, epsilon, gi,
                                                  in_denominator ? b : OptTensor());
  }
};

#undef CONV_ARGS
#undef CONV_VALUES

struct AvgPoolEpsilon {
  static constexpr auto forward = &lrpcpp::avg_pool_epsilon;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& y, IntRef kernel, IntRef stride,
                          IntRef padding, bool ceil_mode, bool count_include_pad, std::optional<int64_t> divisor,
                          double epsilon, bool gi) {
    return lrpcpp::avg_pool_epsilon_relevance(g, x, y, kernel, stride, padding, ceil_mode, count_include_pad, divisor,
                                              epsilon, gi);
  }
};

struct AdaptiveAvgPoolEpsilon {
  static constexpr auto forward = &lrpcpp::adaptive_avg_pool_epsilon;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& y, IntRef output_size, double epsilon,
                          bool gi) {
    return lrpcpp::adaptive_avg_pool_epsilon_relevance(g, x, y, output_size, epsilon, gi);
  }
};

struct MaxPoolWta {
  static constexpr auto forward = &lrpcpp::max_pool_wta;
  static Tensor relevance(const Tensor& g, const Tensor& x, const Tensor& y, IntRef kernel, IntRef stride,
                          IntRef padding, IntRef dilation, bool ceil_mode, bool gi) {
    return lrpcpp::max_pool_wta_relevance(g, x, y, kernel, stride, padding, dilation, ceil_mode, gi);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Autograd, m) {
  m.impl("linear_gamma", &VisionFunction<LinearGamma>::apply_rule);
  m.impl("linear_alpha_beta", &VisionFunction<LinearAlphaBeta>::apply_rule);
  m.impl("linear_z_plus", &VisionFunction<LinearZPlus>::apply_rule);
  m.impl("linear_z_box", &VisionFunction<LinearZBox>::apply_rule);
  m.impl("linear_flat", &VisionFunction<LinearFlat>::apply_rule);
  m.impl("linear_w_square", &VisionFunction<LinearWSquare>::apply_rule);
  m.impl("conv2d_gamma", &VisionFunction<Conv2dGamma>::apply_rule);
  m.impl("conv2d_alpha_beta", &VisionFunction<Conv2dAlphaBeta>::apply_rule);
  m.impl("conv2d_z_plus", &VisionFunction<Conv2dZPlus>::apply_rule);
  m.impl("conv2d_z_box", &VisionFunction<Conv2dZBox>::apply_rule);
  m.impl("conv2d_flat", &VisionFunction<Conv2dFlat>::apply_rule);
  m.impl("conv2d_w_square", &VisionFunction<Conv2dWSquare>::apply_rule);
  m.impl("convolution_epsilon", &VisionFunction<ConvolutionEpsilon>::apply_rule);
  m.impl("convolution_gamma", &VisionFunction<ConvolutionGamma>::apply_rule);
  m.impl("convolution_alpha_beta", &VisionFunction<ConvolutionAlphaBeta>::apply_rule);
  m.impl("convolution_z_plus", &VisionFunction<ConvolutionZPlus>::apply_rule);
  m.impl("convolution_z_box", &VisionFunction<ConvolutionZBox>::apply_rule);
  m.impl("convolution_flat", &VisionFunction<ConvolutionFlat>::apply_rule);
  m.impl("convolution_w_square", &VisionFunction<ConvolutionWSquare>::apply_rule);
  m.impl("avg_pool_epsilon", &PoolFunction<AvgPoolEpsilon>::apply_rule);
  m.impl("adaptive_avg_pool_epsilon", &PoolFunction<AdaptiveAvgPoolEpsilon>::apply_rule);
  m.impl("max_pool_wta", &PoolFunction<MaxPoolWta>::apply_rule);
  for (const char* name : {"linear_gamma_relevance",
                           "linear_alpha_beta_relevance",
                           "linear_z_plus_relevance",
                           "linear_z_box_relevance",
                           "linear_flat_relevance",
                           "linear_w_square_relevance",
                           "conv2d_gamma_relevance",
                           "conv2d_alpha_beta_relevance",
                           "conv2d_z_plus_relevance",
                           "conv2d_z_box_relevance",
                           "conv2d_flat_relevance",
                           "conv2d_w_square_relevance",
                           "gamma_stab_div",
                           "alpha_beta_stab_div",
                           "split_times_input",
                           "convolution_epsilon_relevance",
                           "convolution_gamma_relevance",
                           "convolution_alpha_beta_relevance",
                           "convolution_z_plus_relevance",
                           "convolution_z_box_relevance",
                           "convolution_flat_relevance",
                           "convolution_w_square_relevance",
                           "avg_pool_epsilon_relevance",
                           "adaptive_avg_pool_epsilon_relevance",
                           "max_pool_wta_relevance"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}

}  // namespace lrpcpp::autograd
