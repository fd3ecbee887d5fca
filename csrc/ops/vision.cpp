// LRP rules for vision and convolution layers (RULES.md section 3) on linear layers, 2-D
// convolutions and any convolution (convolution_<rule>: 1 to 3 spatial dimensions, transposed or not,
// with at::convolution's arguments; epsilon too): gamma, alpha-beta, z-plus, z-box, flat and w-square.
//   forward:   y = x W^T + b, or the convolution (torch's own kernel, bitwise)
//   relevance: composed from ATen products and the per-element primitives of this family.
//
// Every rule is written with W and transforms of it (|W|, max(W, 0), min(W, 0) or W^2), which the
// caller may compute once and pass in. With p = |x| |W|, the sums of the positive and negative
// terms x_i w_ij of an output are A = (xW + p) / 2 and B = (xW - p) / 2, and
//   gamma:              R_x = x (s_w W^T) + |x| (s_abs |W|^T)     (s_w, s_abs: gamma_stab_div)
//   alpha-beta:         R_x = x+ u + x- v, from W+ and W- (see alpha_beta_relevance)
//   z-plus:             alpha-beta with alpha = 1, beta = 0 (x (s W+^T), s = R / stab(x W+), for x >= 0)
//   z-box(l, h):        R_x = (x - m)(s W^T) - d (s |W|^T), s = R / stab((x - m) W - d |W|),
//                       m = (l + h) / 2, d = (l - h) / 2 (so x w - l w+ - h w- = (x - m) w - d |w|)
//   flat, w-square:     R_x = s V^T (V = 1 or W^2),       s = R / stab(1 V)
// where s V^T is the transposed map (s @ V for a linear layer, the input-gradient of the
// convolution for a conv layer). One product |x| |W| then serves both signed sums.
//
// gi = true (gradient-times-input form): the incoming gradient g is turned into the relevance
// R = g * y, and the result is the gradient g_x = R_x / x: for the rules whose relevance is a
// multiple of x or |x| (gamma, alpha-beta, z-plus) the division is exact (x -> 1, |x| -> sign(x));
// for the others (z-box, flat, w-square) it is R_x / stab(x). float16 and bfloat16 inputs are computed
// in float32 (rule_dtype).
#include "impl.h"
#include "output_shape.h"

namespace lrpcpp {

// ----------------------------------------------------------------------------- dispatcher entries
Tensor linear_gamma(const Tensor& x, const Tensor& weight, const OptTensor& bias, double gamma, double epsilon,
                    const OptTensor& weight_abs, bool gi) {
  LRPCPP_DISPATCH(linear_gamma);
  return op.call(x, weight, bias, gamma, epsilon, weight_abs, gi);
}

Tensor linear_gamma_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                              const OptTensor& weight_abs, const Tensor& output, double gamma, double epsilon,
                              bool gi) {
  LRPCPP_DISPATCH(linear_gamma_relevance);
  return op.call(grad, x, weight, bias, weight_abs, output, gamma, epsilon, gi);
}

Tensor linear_alpha_beta(const Tensor& x, const Tensor& weight, const OptTensor& bias, double alpha, double beta,
                         double epsilon, const OptTensor& weight_pos, const OptTensor& weight_neg, bool gi,
                         bool bias_in_denominator) {
  LRPCPP_DISPATCH(linear_alpha_beta);
  return op.call(x, weight, bias, alpha, beta, epsilon, weight_pos, weight_neg, gi, bias_in_denominator);
}

Tensor linear_alpha_beta_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                   const OptTensor& weight_pos, const OptTensor& weight_neg, const Tensor& output,
                                   double alpha, double beta, double epsilon, bool gi, const OptTensor& bias) {
  LRPCPP_DISPATCH(linear_alpha_beta_relevance);
  return op.call(grad, x, weight, weight_pos, weight_neg, output, alpha, beta, epsilon, gi, bias);
}

Tensor linear_z_plus(const Tensor& x, const Tensor& weight, const OptTensor& bias, double epsilon,
                     const OptTensor& weight_pos, bool gi, bool bias_in_denominator) {
  LRPCPP_DISPATCH(linear_z_plus);
  return op.call(x, weight, bias, epsilon, weight_pos, gi, bias_in_denominator);
}

Tensor linear_z_plus_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const OptTensor& weight_pos,
                               const Tensor& output, double epsilon, bool gi, const OptTensor& bias) {
  LRPCPP_DISPATCH(linear_z_plus_relevance);
  return op.call(grad, x, weight, weight_pos, output, epsilon, gi, bias);
}

Tensor linear_z_box(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lower,
                    const Tensor& upper, double epsilon, const OptTensor& weight_abs, bool gi) {
  LRPCPP_DISPATCH(linear_z_box);
  return op.call(x, weight, bias, lower, upper, epsilon, weight_abs, gi);
}

Tensor linear_z_box_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& lower,
                              const Tensor& upper, const OptTensor& weight_abs, const Tensor& output, double epsilon,
                              bool gi) {
  LRPCPP_DISPATCH(linear_z_box_relevance);
  return op.call(grad, x, weight, lower, upper, weight_abs, output, epsilon, gi);
}

Tensor linear_flat(const Tensor& x, const Tensor& weight, const OptTensor& bias, double epsilon, bool gi) {
  LRPCPP_DISPATCH(linear_flat);
  return op.call(x, weight, bias, epsilon, gi);
}

Tensor linear_flat_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& output,
                             double epsilon, bool gi) {
  LRPCPP_DISPATCH(linear_flat_relevance);
  return op.call(grad, x, weight, output, epsilon, gi);
}

Tensor linear_w_square(const Tensor& x, const Tensor& weight, const OptTensor& bias, double epsilon,
                       const OptTensor& weight_sq, bool gi, bool bias_in_denominator) {
  LRPCPP_DISPATCH(linear_w_square);
  return op.call(x, weight, bias, epsilon, weight_sq, gi, bias_in_denominator);
}

Tensor linear_w_square_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const OptTensor& weight_sq,
                                 const Tensor& output, double epsilon, bool gi, const OptTensor& bias) {
  LRPCPP_DISPATCH(linear_w_square_relevance);
  return op.call(grad, x, weight, weight_sq, output, epsilon, gi, bias);
}

Tensor conv2d_gamma(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntRef stride, IntRef padding,
                    IntRef dilation, int64_t groups, double gamma, double epsilon, const OptTensor& weight_abs,
                    bool gi) {
  LRPCPP_DISPATCH(conv2d_gamma);
  return op.call(x, weight, bias, stride, padding, dilation, groups, gamma, epsilon, weight_abs, gi);
}

Tensor conv2d_gamma_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                              const OptTensor& weight_abs, const Tensor& output, IntRef stride, IntRef padding,
                              IntRef dilation, int64_t groups, double gamma, double epsilon, bool gi) {
  LRPCPP_DISPATCH(conv2d_gamma_relevance);
  return op.call(grad, x, weight, bias, weight_abs, output, stride, padding, dilation, groups, gamma, epsilon, gi);
}

Tensor conv2d_alpha_beta(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntRef stride, IntRef padding,
                         IntRef dilation, int64_t groups, double alpha, double beta, double epsilon,
                         const OptTensor& weight_pos, const OptTensor& weight_neg, bool gi, bool bias_in_denominator) {
  LRPCPP_DISPATCH(conv2d_alpha_beta);
  return op.call(x, weight, bias, stride, padding, dilation, groups, alpha, beta, epsilon, weight_pos, weight_neg, gi,
                 bias_in_denominator);
}

Tensor conv2d_alpha_beta_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                   const OptTensor& weight_pos, const OptTensor& weight_neg, const Tensor& output,
                                   IntRef stride, IntRef padding, IntRef dilation, int64_t groups, double alpha,
                                   double beta, double epsilon, bool gi, const OptTensor& bias) {
  LRPCPP_DISPATCH(conv2d_alpha_beta_relevance);
  return op.call(grad, x, weight, weight_pos, weight_neg, output, stride, padding, dilation, groups, alpha, beta,
                 epsilon, gi, bias);
}

Tensor conv2d_z_plus(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntRef stride, IntRef padding,
                     IntRef dilation, int64_t groups, double epsilon, const OptTensor& weight_pos, bool gi,
                     bool bias_in_denominator) {
  LRPCPP_DISPATCH(conv2d_z_plus);
  return op.call(x, weight, bias, stride, padding, dilation, groups, epsilon, weight_pos, gi, bias_in_denominator);
}

Tensor conv2d_z_plus_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const OptTensor& weight_pos,
                               const Tensor& output, IntRef stride, IntRef padding, IntRef dilation, int64_t groups,
                               double epsilon, bool gi, const OptTensor& bias) {
  LRPCPP_DISPATCH(conv2d_z_plus_relevance);
  return op.call(grad, x, weight, weight_pos, output, stride, padding, dilation, groups, epsilon, gi, bias);
}

Tensor conv2d_z_box(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lower,
                    const Tensor& upper, IntRef stride, IntRef padding, IntRef dilation, int64_t groups, double epsilon,
                    const OptTensor& weight_abs, bool gi) {
  LRPCPP_DISPATCH(conv2d_z_box);
  return op.call(x, weight, bias, lower, upper, stride, padding, dilation, groups, epsilon, weight_abs, gi);
}

Tensor conv2d_z_box_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& lower,
                              const Tensor& upper, const OptTensor& weight_abs, const Tensor& output, IntRef stride,
                              IntRef padding, IntRef dilation, int64_t groups, double epsilon, bool gi) {
  LRPCPP_DISPATCH(conv2d_z_box_relevance);
  return op.call(grad, x, weight, lower, upper, weight_abs, output, stride, padding, dilation, groups, epsilon, gi);
}

Tensor conv2d_flat(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntRef stride, IntRef padding,
                   IntRef dilation, int64_t groups, double epsilon, bool gi) {
  LRPCPP_DISPATCH(conv2d_flat);
  return op.call(x, weight, bias, stride, padding, dilation, groups, epsilon, gi);
}

Tensor conv2d_flat_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& output,
                             IntRef stride, IntRef padding, IntRef dilation, int64_t groups, double epsilon, bool gi) {
  LRPCPP_DISPATCH(conv2d_flat_relevance);
  return op.call(grad, x, weight, output, stride, padding, dilation, groups, epsilon, gi);
}

Tensor conv2d_w_square(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntRef stride, IntRef padding,
                       IntRef dilation, int64_t groups, double epsilon, const OptTensor& weight_sq, bool gi,
                       bool bias_in_denominator) {
  LRPCPP_DISPATCH(conv2d_w_square);
  return op.call(x, weight, bias, stride, padding, dilation, groups, epsilon, weight_sq, gi, bias_in_denominator);
}

Tensor conv2d_w_square_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const OptTensor& weight_sq,
                                 const Tensor& output, IntRef stride, IntRef padding, IntRef dilation, int64_t groups,
                                 double epsilon, bool gi, const OptTensor& bias) {
  LRPCPP_DISPATCH(conv2d_w_square_relevance);
  return op.call(grad, x, weight, weight_sq, output, stride, padding, dilation, groups, epsilon, gi, bias);
}

#define CONV_ARGS IntRef stride, IntRef padding, IntRef dilation, bool transposed, IntRef output_padding, int64_t groups
#define CONV_VALUES stride, padding, dilation, transposed, output_padding, groups

Tensor convolution_epsilon(const Tensor& x, const Tensor& weight, const OptTensor& bias, CONV_ARGS, double epsilon) {
  LRPCPP_DISPATCH(convolution_epsilon);
  return op.call(x, weight, bias, CONV_VALUES, epsilon);
}

Tensor convolution_epsilon_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& output,
                                     CONV_ARGS, double epsilon) {
  LRPCPP_DISPATCH(convolution_epsilon_relevance);
  return op.call(grad, x, weight, output, CONV_VALUES, epsilon);
}

Tensor convolution_gamma(const Tensor& x, const Tensor& weight, const OptTensor& bias, CONV_ARGS, double gamma,
                         double epsilon, const OptTensor& weight_abs, bool gi) {
  LRPCPP_DISPATCH(convolution_gamma);
  return op.call(x, weight, bias, CONV_VALUES, gamma, epsilon, weight_abs, gi);
}

Tensor convolution_gamma_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                   const OptTensor& weight_abs, const Tensor& output, CONV_ARGS, double gamma,
                                   double epsilon, bool gi) {
  LRPCPP_DISPATCH(convolution_gamma_relevance);
  return op.call(grad, x, weight, bias, weight_abs, output, CONV_VALUES, gamma, epsilon, gi);
}

Tensor convolution_alpha_beta(const Tensor& x, const Tensor& weight, const OptTensor& bias, CONV_ARGS, double alpha,
                              double beta, double epsilon, const OptTensor& weight_pos, const OptTensor& weight_neg,
                              bool gi, bool bias_in_denominator) {
  LRPCPP_DISPATCH(convolution_alpha_beta);
  return op.call(x, weight, bias, CONV_VALUES, alpha, beta, epsilon, weight_pos, weight_neg, gi, bias_in_denominator);
}

Tensor convolution_alpha_beta_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                        const OptTensor& weight_pos, const OptTensor& weight_neg, const Tensor& output,
                                        CONV_ARGS, double alpha, double beta, double epsilon, bool gi,
                                        const OptTensor& bias) {
  LRPCPP_DISPATCH(convolution_alpha_beta_relevance);
  return op.call(grad, x, weight, weight_pos, weight_neg, output, CONV_VALUES, alpha, beta, epsilon, gi, bias);
}

Tensor convolution_z_plus(const Tensor& x, const Tensor& weight, const OptTensor& bias, CONV_ARGS, double epsilon,
                          const OptTensor& weight_pos, bool gi, bool bias_in_denominator) {
  LRPCPP_DISPATCH(convolution_z_plus);
  return op.call(x, weight, bias, CONV_VALUES, epsilon, weight_pos, gi, bias_in_denominator);
}

Tensor convolution_z_plus_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                    const OptTensor& weight_pos, const Tensor& output, CONV_ARGS, double epsilon,
                                    bool gi, const OptTensor& bias) {
  LRPCPP_DISPATCH(convolution_z_plus_relevance);
  return op.call(grad, x, weight, weight_pos, output, CONV_VALUES, epsilon, gi, bias);
}

Tensor convolution_z_box(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lower,
                         const Tensor& upper, CONV_ARGS, double epsilon, const OptTensor& weight_abs, bool gi) {
  LRPCPP_DISPATCH(convolution_z_box);
  return op.call(x, weight, bias, lower, upper, CONV_VALUES, epsilon, weight_abs, gi);
}

Tensor convolution_z_box_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& lower,
                                   const Tensor& upper, const OptTensor& weight_abs, const Tensor& output, CONV_ARGS,
                                   double epsilon, bool gi) {
  LRPCPP_DISPATCH(convolution_z_box_relevance);
  return op.call(grad, x, weight, lower, upper, weight_abs, output, CONV_VALUES, epsilon, gi);
}

Tensor convolution_flat(const Tensor& x, const Tensor& weight, const OptTensor& bias, CONV_ARGS, double epsilon,
                        bool gi) {
  LRPCPP_DISPATCH(convolution_flat);
  return op.call(x, weight, bias, CONV_VALUES, epsilon, gi);
}

Tensor convolution_flat_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& output,
                                  CONV_ARGS, double epsilon, bool gi) {
  LRPCPP_DISPATCH(convolution_flat_relevance);
  return op.call(grad, x, weight, output, CONV_VALUES, epsilon, gi);
}

Tensor convolution_w_square(const Tensor& x, const Tensor& weight, const OptTensor& bias, CONV_ARGS, double epsilon,
                            const OptTensor& weight_sq, bool gi, bool bias_in_denominator) {
  LRPCPP_DISPATCH(convolution_w_square);
  return op.call(x, weight, bias, CONV_VALUES, epsilon, weight_sq, gi, bias_in_denominator);
}

Tensor convolution_w_square_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                      const OptTensor& weight_sq, const Tensor& output, CONV_ARGS, double epsilon,
                                      bool gi, const OptTensor& bias) {
  LRPCPP_DISPATCH(convolution_w_square_relevance);
  return op.call(grad, x, weight, weight_sq, output, CONV_VALUES, epsilon, gi, bias);
}

TensorPair gamma_stab_div(const Tensor& grad, const Tensor& output, const Tensor& abs_product, const OptTensor& bias,
                          int64_t bias_dim, double gamma, double epsilon, bool gi) {
  LRPCPP_DISPATCH(gamma_stab_div);
  return op.call(grad, output, abs_product, bias, bias_dim, gamma, epsilon, gi);
}

TensorPair alpha_beta_stab_div(const Tensor& grad, const Tensor& output, const Tensor& pos_sum, const Tensor& neg_sum,
                               double alpha, double beta, double epsilon, bool gi) {
  LRPCPP_DISPATCH(alpha_beta_stab_div);
  return op.call(grad, output, pos_sum, neg_sum, alpha, beta, epsilon, gi);
}

Tensor split_times_input(const Tensor& x, const Tensor& a, const Tensor& b, bool gi) {
  LRPCPP_DISPATCH(split_times_input);
  return op.call(x, a, b, gi);
}

namespace impl {
using namespace detail;

// ----------------------------------------------------------------------------- checks
void check_gamma(double gamma, const char* op) {
  TORCH_CHECK(gamma >= 0.0 && std::isfinite(gamma), op, ": expected gamma to be a finite number >= 0, got ", gamma);
}

void check_alpha_beta(double alpha, double beta, const char* op) {
  TORCH_CHECK(std::isfinite(alpha) && std::isfinite(beta) && beta >= 0.0, op,
              ": expected finite alpha and beta with beta >= 0, got alpha=", alpha, ", beta=", beta);
  TORCH_CHECK(std::abs(alpha - beta - 1.0) <= 1e-9, op,
              ": expected alpha - beta = 1 (RULES.md section 3; z-plus is alpha=1, beta=0), got alpha=", alpha,
              ", beta=", beta);
}

int64_t inner_size(const Tensor& output, int64_t d) {
  int64_t n = 1;
  for (int64_t i = d + 1; i < output.dim(); ++i) n *= output.size(i);
  return n;
}

int64_t check_factor_inputs(const Tensor& grad, const Tensor& output, const Tensor& abs_product, const OptTensor& bias,
                            int64_t bias_dim, double epsilon, const char* op) {
  check_floating(output, op, "output");
  check_like(grad, output, op, "grad", "output");
  check_same_shape(grad, output, op, "grad", "output");
  check_like(abs_product, output, op, "abs_product", "output");
  check_same_shape(abs_product, output, op, "abs_product", "output");
  const int64_t n = output.dim();
  TORCH_CHECK(n >= 1, op, ": expected output to have at least 1 dimension, got a 0-D tensor");
  TORCH_CHECK_INDEX(bias_dim >= -n && bias_dim < n, op, ": expected bias_dim in [", -n, ", ", n - 1, "], got ",
                    bias_dim);
  const int64_t d = bias_dim < 0 ? bias_dim + n : bias_dim;
  if (bias.has_value() && bias->defined()) {
    check_like(*bias, output, op, "bias", "output");
    TORCH_CHECK(bias->dim() == 1, op, ": expected bias to be 1-D, got shape ", shape_str(*bias));
    TORCH_SYM_CHECK(bias->sym_size(0).sym_eq(output.sym_size(d)), op, ": expected bias to have ", output.sym_size(d),
                    " elements (output.shape[", d, "]), got ", bias->sym_size(0));
  }
  check_epsilon(epsilon, op);
  return d;
}

void check_alpha_beta_inputs(const Tensor& grad, const Tensor& output, const Tensor& pos_sum, const Tensor& neg_sum,
                             double alpha, double beta, double epsilon) {
  const char* op = "lrpcpp.alpha_beta_stab_div";
  check_floating(output, op, "output");
  for (const auto& [t, arg] :
       {std::pair<const Tensor*, const char*>{&grad, "grad"}, {&pos_sum, "pos_sum"}, {&neg_sum, "neg_sum"}}) {
    check_like(*t, output, op, arg, "output");
    check_same_shape(*t, output, op, arg, "output");
  }
  check_alpha_beta(alpha, beta, op);
  check_epsilon(epsilon, op);
}

void check_split_times_input(const Tensor& x, const Tensor& a, const Tensor& b) {
  const char* op = "lrpcpp.split_times_input";
  check_floating(x, op, "x");
  check_like(a, x, op, "a", "x");
  check_like(b, x, op, "b", "x");
  check_same_shape(a, x, op, "a", "x");
  check_same_shape(b, x, op, "b", "x");
}

namespace {

// A weight transform passed in by the caller: the weight's shape, dtype and device.
void check_transform(const OptTensor& t, const Tensor& weight, const char* op, const char* arg) {
  if (!t.has_value() || !t->defined()) return;
  check_like(*t, weight, op, arg, "weight");
  check_same_shape(*t, weight, op, arg, "weight");
}

// lower and upper bounds of z-box: floating, on x's device, broadcastable to x.
void check_bounds(const Tensor& lower, const Tensor& upper, const Tensor& x, const char* op) {
  const auto check = [&](const Tensor& t, const char* arg) {
    check_floating(t, op, arg);
    check_same_device(t, x, op, arg, "x");
    const auto nt = t.dim(), nx = x.dim();
    TORCH_CHECK(nt <= nx, op, ": expected ", arg, " ", shape_str(t), " to be broadcastable to x ", shape_str(x),
                ", but it has more dimensions");
    for (int64_t i = 1; i <= nt; ++i) {
      const auto& st = t.sym_size(nt - i);
      TORCH_SYM_CHECK(st.sym_eq(1).sym_or(st.sym_eq(x.sym_size(nx - i))), op, ": expected ", arg, " ", shape_str(t),
                      " to be broadcastable to x ", shape_str(x), ", but they differ at dimension ", -i);
    }
  };
  check(lower, "lower");
  check(upper, "upper");
}

void check_linear_output(const Tensor& grad, const Tensor& output, const Tensor& x, const Tensor& weight,
                         const char* op) {
  check_grad_output(grad, output, x, op);
  check_linear_output_shape(output, x, weight, op);
}

void check_conv_output(const Tensor& grad, const Tensor& output, const Tensor& x, const Tensor& weight, IntRef stride,
                       IntRef padding, IntRef dilation, const char* op) {
  check_grad_output(grad, output, x, op);
  check_conv2d_output_shape(output, x, weight, stride, padding, dilation, op);
}

// The arguments of at::convolution: weight [out_channels, in_channels / groups, *kernel] (transposed:
// [in_channels, out_channels / groups, *kernel]) with 1 to 3 spatial dimensions, x batched with as many,
// one value per spatial dimension in stride, padding, dilation and output_padding.
void check_convolution(const Tensor& x, const Tensor& weight, const OptTensor& bias, CONV_ARGS, double epsilon,
                       const char* op) {
  check_floating(x, op, "x");
  check_like(weight, x, op, "weight", "x");
  const int64_t n = weight.dim() - 2;
  TORCH_CHECK(n >= 1 && n <= 3, op, ": expected weight to be 3-D to 5-D [",
              transposed ? "in_channels, out_channels / groups" : "out_channels, in_channels / groups",
              ", *kernel_size] (1 to 3 spatial dimensions), got shape ", shape_str(weight));
  TORCH_CHECK(x.dim() == n + 2, op, ": expected x to be ", n + 2, "-D [batch, channels, *spatial] for weight ",
              shape_str(weight), ", got shape ", shape_str(x));
  for (const auto& [v, arg] : {std::pair<IntRef, const char*>{stride, "stride"},
                               {padding, "padding"},
                               {dilation, "dilation"},
                               {output_padding, "output_padding"}}) {
    TORCH_CHECK(static_cast<int64_t>(v.size()) == n, op, ": expected ", arg, " to have ", n,
                " values (one per spatial dimension), got ", v);
  }
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(stride[i] >= 1, op, ": expected stride >= 1, got ", stride);
    TORCH_CHECK(padding[i] >= 0, op, ": expected padding >= 0, got ", padding);
    TORCH_CHECK(dilation[i] >= 1, op, ": expected dilation >= 1, got ", dilation);
    TORCH_CHECK(output_padding[i] >= 0 && (transposed || output_padding[i] == 0), op,
                ": expected output_padding >= 0 (and 0 for a convolution that is not transposed), got ",
                output_padding);
    TORCH_CHECK(!transposed || output_padding[i] < stride[i] || output_padding[i] < dilation[i], op,
                ": expected output_padding to be smaller than stride or dilation, got output_padding=", output_padding,
                ", stride=", stride, ", dilation=", dilation);
  }
  TORCH_CHECK(groups >= 1, op, ": expected groups >= 1, got ", groups);
  if (transposed) {
    TORCH_SYM_CHECK((weight.sym_size(0) % groups).sym_eq(0), op,
                    ": expected in_channels = weight.shape[0] = ", weight.sym_size(0),
                    " to be divisible by groups = ", groups);
    TORCH_SYM_CHECK(x.sym_size(1).sym_eq(weight.sym_size(0)), op, ": expected x to have ", weight.sym_size(0),
                    " channels (weight.shape[0] of a transposed convolution), got ", x.sym_size(1));
  } else {
    TORCH_SYM_CHECK((weight.sym_size(0) % groups).sym_eq(0), op,
                    ": expected out_channels = weight.shape[0] = ", weight.sym_size(0),
                    " to be divisible by groups = ", groups);
    TORCH_SYM_CHECK(x.sym_size(1).sym_eq(weight.sym_size(1) * groups), op, ": expected x to have ",
                    weight.sym_size(1) * groups, " channels (weight.shape[1] * groups), got ", x.sym_size(1));
  }
  // at least one output element per spatial dimension: the (dilated) kernel fits into the padded input,
  // or the transposed convolution's output is not empty
  const auto out = convolution_output_sizes(x, weight, CONV_VALUES);
  for (int64_t i = 0; i < n; ++i) {
    const auto extent = (weight.sym_size(2 + i) - 1) * dilation[i] + 1;
    const auto fits = transposed ? out[2 + i].sym_ge(1) : extent.sym_le(x.sym_size(2 + i) + 2 * padding[i]);
    TORCH_SYM_CHECK(fits, op, ": expected the kernel ", shape_str(weight), " (dilated by ", dilation, ") with stride ",
                    stride, ", padding ", padding, " and output_padding ", output_padding,
                    " to give an output of size >= 1 from x ", shape_str(x), " at dimension ", 2 + i);
  }
  if (bias.has_value() && bias->defined()) {
    check_like(*bias, x, op, "bias", "x");
    TORCH_CHECK(bias->dim() == 1, op, ": expected bias to be 1-D [out_channels], got shape ", shape_str(*bias));
    TORCH_SYM_CHECK(bias->sym_size(0).sym_eq(out[1]), op, ": expected bias to have ", out[1],
                    " elements (out_channels), got ", bias->sym_size(0));
  }
  check_epsilon(epsilon, op);
}

void check_convolution_output(const Tensor& grad, const Tensor& output, const Tensor& x, const Tensor& weight,
                              CONV_ARGS, const char* op) {
  check_grad_output(grad, output, x, op);
  check_output_shape(output, convolution_output_sizes(x, weight, CONV_VALUES), op);
}

// ----------------------------------------------------------------------------- the two maps
// The affine map of a layer without its bias, applied to any input, and its transpose.
struct LinearMap {
  static constexpr int64_t bias_dim = -1;
  Tensor apply(const Tensor& x, const Tensor& w) const {
    return at::linear(x, w);
  }
  Tensor transpose(const Tensor& s, const Tensor& w, const Tensor& /*x*/) const {
    return at::matmul(s, w);
  }
  // a per-output-feature tensor (the bias) broadcast against the output: along its last dimension
  Tensor along_outputs(const Tensor& b, const Tensor& /*output*/) const {
    return b;
  }
};

struct ConvMap {
  static constexpr int64_t bias_dim = 1;
  IntRef stride, padding, dilation;
  bool transposed;
  IntRef output_padding;
  int64_t groups;
  Tensor apply(const Tensor& x, const Tensor& w) const {
    return at::convolution(x, w, std::nullopt, stride, padding, dilation, transposed, output_padding, groups);
  }
  // the input-gradient of the convolution at s: the convolution's transpose, with x's shape
  Tensor transpose(const Tensor& s, const Tensor& w, const Tensor& x) const {
    return std::get<0>(at::convolution_backward(s, x, w, std::nullopt, stride, padding, dilation, transposed,
                                                output_padding, groups, {true, false, false}));
  }
  // a per-channel tensor (the bias) broadcast against the output [batch, channels, *spatial]
  Tensor along_outputs(const Tensor& b, const Tensor& output) const {
    std::vector<int64_t> shape(output.dim() - 1, 1);
    shape[0] = -1;
    return b.view(shape);
  }
};

// The map of a 2-D convolution (not transposed).
constexpr std::array<int64_t, 2> kNoOutputPadding{0, 0};
ConvMap conv2d_map(IntRef stride, IntRef padding, IntRef dilation, int64_t groups) {
  return ConvMap{stride, padding, dilation, false, kNoOutputPadding, groups};
}

// The dtype of a rule's products and per-element steps: float32 for float16 and bfloat16 (the
// signed sums (xW +- |x||W|) / 2 cancel, and a bfloat16 product cannot resolve a small one), else
// the input's own.
at::ScalarType rule_dtype(at::ScalarType dtype) {
  return (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
}

Tensor in_dtype(const OptTensor& t, at::ScalarType cd) {
  return (t.has_value() && t->defined()) ? t->to(cd) : Tensor();
}

// the relevance arriving at the output in the compute dtype: grad, or grad * output in gi form
Tensor incoming(const Tensor& grad, const Tensor& output, bool gi, at::ScalarType cd) {
  return gi ? grad.to(cd) * output.to(cd) : grad.to(cd);
}

// the result in x's dtype: the relevance, or in gi form the relevance divided by stab(x)
Tensor finish(const Tensor& r, const Tensor& xc, const Tensor& x, double epsilon, bool gi) {
  Tensor out = gi ? lrpcpp::stab_div(r, xc, epsilon, 1.0, std::nullopt) : r;
  return out.to(x.scalar_type());
}

// Whether no element of p[0, n) is negative, in blocks, stopping at the first block with a negative
// element (so that a signed input costs a few elements); NaN counts as negative.
template <typename scalar_t>
bool all_non_negative(const scalar_t* p, int64_t n) {
  constexpr int64_t kBlock = 4096;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    int negative = 0;
#pragma omp simd reduction(| : negative)
    for (int64_t i = start; i < end; ++i) negative |= !(p[i] >= scalar_t(0));
    if (negative) return false;
  }
  return true;
}

// Whether every element of x is >= 0 (a layer after a ReLU: |x| is x itself, and the gamma rule needs no
// copy of it). Read on the CPU only, where it costs no device synchronisation (CUDA graphs need none);
// other devices take the general path.
bool non_negative(const Tensor& x) {
  if (!x.is_cpu() || !x.is_contiguous() || x.numel() == 0) return false;
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lrpcpp_non_negative",
                                    [&] { return all_non_negative(x.const_data_ptr<scalar_t>(), x.numel()); });
}

template <typename Map>
Tensor gamma_relevance(const Map& m, const Tensor& grad, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                       const OptTensor& weight_abs, const Tensor& output, double gamma, double epsilon, bool gi) {
  const auto cd = rule_dtype(x.scalar_type());
  const Tensor xc = x.to(cd), w = weight.to(cd);
  const Tensor v = weight_abs.has_value() && weight_abs->defined() ? weight_abs->to(cd) : w.abs();
  const bool nonneg = non_negative(xc);
  const Tensor p = m.apply(nonneg ? xc : xc.abs(), v);
  auto [s_w, s_abs] =
      lrpcpp::gamma_stab_div(grad.to(cd), output.to(cd), p, in_dtype(bias, cd), Map::bias_dim, gamma, epsilon, gi);
  Tensor a = m.transpose(s_w, w, xc);
  const Tensor b = m.transpose(s_abs, v, xc);
  // gradient form with x >= 0: a + sign(x) b is a + b (sign(0) = +1), summed in place
  return (nonneg && gi ? a.add_(b) : lrpcpp::split_times_input(xc, a, b, gi)).to(x.scalar_type());
}

// The alpha-beta rule in sign-split form, R_x = x+ u + x- v with
//   u = (alpha R / stab(A)) W+^T - (beta R / stab(B)) W-^T,  v = (alpha R / stab(A)) W-^T - (beta R / stab(B)) W+^T,
// A = x+ W+ + x- W-, B = x+ W- + x- W+ (sums of same-signed terms). Where a sum is 0 all its terms
// are, and the large share R / eps multiplies only exact zeros (a form with x W and |x| |W| would
// subtract two large numbers instead). Both signs are computed (for x >= 0, x- = 0 adds exact zeros)
// unless non_negative finds x >= 0 on the CPU (after a ReLU): then the x- products and v, which add
// only zeros, are skipped (z-plus: 3 products instead of 5, alpha-beta: 5 instead of 9). On other
// devices no branch on the values of x, so no device-to-host sync (CUDA graphs, torch.compile).
// beta = 0 (z-plus) needs neither B nor the beta share: R_x = x+ (s W+^T) + x- (s W-^T), s = alpha R / stab(A).
template <typename Map>
Tensor alpha_beta_relevance(const Map& m, const Tensor& grad, const Tensor& x, const Tensor& weight,
                            const OptTensor& weight_pos, const OptTensor& weight_neg, const Tensor& output,
                            double alpha, double beta, double epsilon, bool gi, const OptTensor& bias) {
  const auto cd = rule_dtype(x.scalar_type());
  const Tensor bc = in_dtype(bias, cd);  // counted in the denominators when given: b+ in A, b- in B
  const Tensor xc = x.to(cd), w = weight.to(cd);
  const Tensor wp = weight_pos.has_value() && weight_pos->defined() ? weight_pos->to(cd) : w.clamp_min(0);
  const Tensor wn = weight_neg.has_value() && weight_neg->defined() ? weight_neg->to(cd) : w.clamp_max(0);
  const bool nonneg = non_negative(xc);
  const Tensor xp = xc.clamp_min(0), xn = nonneg ? Tensor() : xc.clamp_max(0);
  const Tensor a = m.apply(xp, wp);
  if (!nonneg) a.add_(m.apply(xn, wn));
  if (bc.defined()) a.add_(m.along_outputs(bc.clamp_min(0), a));
  Tensor u, v;
  if (beta == 0.0) {
    Tensor s = lrpcpp::stab_div(incoming(grad, output, gi, cd), a, epsilon, 1.0, std::nullopt);
    if (alpha != 1.0) s.mul_(alpha);
    u = m.transpose(s, wp, xc);
    if (!nonneg) v = m.transpose(s, wn, xc);
  } else {
    const Tensor b = m.apply(xp, wn);
    if (!nonneg) b.add_(m.apply(xn, wp));
    if (bc.defined()) b.add_(m.along_outputs(bc.clamp_max(0), b));
    auto [s_pos, s_neg] = lrpcpp::alpha_beta_stab_div(grad.to(cd), output.to(cd), a, b, alpha, beta, epsilon, gi);
    u = m.transpose(s_pos, wp, xc).add_(m.transpose(s_neg, wn, xc));
    if (!nonneg) v = m.transpose(s_pos, wn, xc).add_(m.transpose(s_neg, wp, xc));
  }
  if (!nonneg) u = at::where(xc >= 0, u, v);
  // R_x = x * u; its gradient form R_x / x is u itself
  return gi ? u.to(x.scalar_type()) : times_input(u, x);
}

// z-plus is alpha-beta with alpha = 1, beta = 0 (RULES.md section 3): on an input of both signs the
// positive terms (x_i w_ij)+ = x+ w+ + x- w- share the relevance, so it stays bounded (x W+ alone would
// cancel between the signs of x); for x >= 0 it is x (R / stab(x W+)) W+^T.
template <typename Map>
Tensor z_plus_relevance(const Map& m, const Tensor& grad, const Tensor& x, const Tensor& weight,
                        const OptTensor& weight_pos, const Tensor& output, double epsilon, bool gi,
                        const OptTensor& bias) {
  return alpha_beta_relevance(m, grad, x, weight, weight_pos, std::nullopt, output, 1.0, 0.0, epsilon, gi, bias);
}

template <typename Map>
Tensor z_box_relevance(const Map& m, const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& lower,
                       const Tensor& upper, const OptTensor& weight_abs, const Tensor& output, double epsilon,
                       bool gi) {
  const auto cd = rule_dtype(x.scalar_type());
  const Tensor xc = x.to(cd), w = weight.to(cd);
  const Tensor v = weight_abs.has_value() && weight_abs->defined() ? weight_abs->to(cd) : w.abs();
  const Tensor lo = lower.to(cd), hi = upper.to(cd);
  // x w - l w+ - h w- = (x - m) w - d |w|, m = (l + h) / 2, d = (l - h) / 2
  const Tensor xm = xc - (lo + hi) * 0.5;
  const Tensor d = ((lo - hi) * 0.5).expand_symint(xc.sym_sizes()).contiguous();
  const Tensor s =
      lrpcpp::stab_div(incoming(grad, output, gi, cd), m.apply(xm, w) - m.apply(d, v), epsilon, 1.0, std::nullopt);
  Tensor r = xm * m.transpose(s, w, xc);
  r.sub_(d * m.transpose(s, v, xc));
  return finish(r, xc, x, epsilon, gi);
}

// flat (v = ones) and w-square (v = W^2): R_x = (R / stab(1 V)) V^T, independent of x's values; bias_term
// (w-square's b^2 where the bias is counted) joins the denominator
template <typename Map>
Tensor input_free_relevance(const Map& m, const Tensor& grad, const Tensor& x, const Tensor& v, const Tensor& output,
                            double epsilon, bool gi, const Tensor& bias_term = Tensor()) {
  const auto cd = rule_dtype(x.scalar_type());
  const Tensor xc = x.to(cd);
  const Tensor ones = at::ones_like(xc);
  Tensor z = m.apply(ones, v);
  if (bias_term.defined()) z.add_(m.along_outputs(bias_term, z));  // w-square with the bias: b^2
  const Tensor s = lrpcpp::stab_div(incoming(grad, output, gi, cd), z, epsilon, 1.0, std::nullopt);
  return finish(m.transpose(s, v, ones), xc, x, epsilon, gi);
}

// b^2 in the compute dtype, or an undefined tensor without a bias
Tensor square_bias(const OptTensor& bias, at::ScalarType cd) {
  const Tensor b = in_dtype(bias, cd);
  return b.defined() ? b * b : b;
}

Tensor square_weight(const Tensor& weight, const OptTensor& weight_sq, at::ScalarType cd) {
  if (weight_sq.has_value() && weight_sq->defined()) return weight_sq->to(cd);
  const Tensor w = weight.to(cd);
  return w * w;
}

}  // namespace

// ----------------------------------------------------------------------------- linear layers
Tensor linear_gamma(const Tensor& x, const Tensor& weight, const OptTensor& bias, double gamma, double epsilon,
                    const OptTensor& weight_abs, bool /*gi*/) {
  const char* op = "lrpcpp.linear_gamma";
  check_linear(x, weight, bias, epsilon, op);
  check_gamma(gamma, op);
  check_transform(weight_abs, weight, op, "weight_abs");
  return at::linear(x, weight, bias);
}

Tensor linear_gamma_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                              const OptTensor& weight_abs, const Tensor& output, double gamma, double epsilon,
                              bool gi) {
  const char* op = "lrpcpp.linear_gamma_relevance";
  check_linear(x, weight, bias, epsilon, op);
  check_gamma(gamma, op);
  check_transform(weight_abs, weight, op, "weight_abs");
  check_linear_output(grad, output, x, weight, op);
  return gamma_relevance(LinearMap{}, grad, x, weight, bias, weight_abs, output, gamma, epsilon, gi);
}

Tensor linear_alpha_beta(const Tensor& x, const Tensor& weight, const OptTensor& bias, double alpha, double beta,
                         double epsilon, const OptTensor& weight_pos, const OptTensor& weight_neg, bool /*gi*/,
                         bool /*bias_in_denominator*/) {
  const char* op = "lrpcpp.linear_alpha_beta";
  check_linear(x, weight, bias, epsilon, op);
  check_alpha_beta(alpha, beta, op);
  check_transform(weight_pos, weight, op, "weight_pos");
  check_transform(weight_neg, weight, op, "weight_neg");
  return at::linear(x, weight, bias);
}

Tensor linear_alpha_beta_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                   const OptTensor& weight_pos, const OptTensor& weight_neg, const Tensor& output,
                                   double alpha, double beta, double epsilon, bool gi, const OptTensor& bias) {
  const char* op = "lrpcpp.linear_alpha_beta_relevance";
  check_linear(x, weight, bias, epsilon, op);
  check_alpha_beta(alpha, beta, op);
  check_transform(weight_pos, weight, op, "weight_pos");
  check_transform(weight_neg, weight, op, "weight_neg");
  check_linear_output(grad, output, x, weight, op);
  return alpha_beta_relevance(LinearMap{}, grad, x, weight, weight_pos, weight_neg, output, alpha, beta, epsilon, gi,
                              bias);
}

Tensor linear_z_plus(const Tensor& x, const Tensor& weight, const OptTensor& bias, double epsilon,
                     const OptTensor& weight_pos, bool /*gi*/, bool /*bias_in_denominator*/) {
  const char* op = "lrpcpp.linear_z_plus";
  check_linear(x, weight, bias, epsilon, op);
  check_transform(weight_pos, weight, op, "weight_pos");
  return at::linear(x, weight, bias);
}

Tensor linear_z_plus_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const OptTensor& weight_pos,
                               const Tensor& output, double epsilon, bool gi, const OptTensor& bias) {
  const char* op = "lrpcpp.linear_z_plus_relevance";
  check_linear(x, weight, bias, epsilon, op);
  check_transform(weight_pos, weight, op, "weight_pos");
  check_linear_output(grad, output, x, weight, op);
  return z_plus_relevance(LinearMap{}, grad, x, weight, weight_pos, output, epsilon, gi, bias);
}

Tensor linear_z_box(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lower,
                    const Tensor& upper, double epsilon, const OptTensor& weight_abs, bool /*gi*/) {
  const char* op = "lrpcpp.linear_z_box";
  check_linear(x, weight, bias, epsilon, op);
  check_bounds(lower, upper, x, op);
  check_transform(weight_abs, weight, op, "weight_abs");
  return at::linear(x, weight, bias);
}

Tensor linear_z_box_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& lower,
                              const Tensor& upper, const OptTensor& weight_abs, const Tensor& output, double epsilon,
                              bool gi) {
  const char* op = "lrpcpp.linear_z_box_relevance";
  check_linear(x, weight, std::nullopt, epsilon, op);
  check_bounds(lower, upper, x, op);
  check_transform(weight_abs, weight, op, "weight_abs");
  check_linear_output(grad, output, x, weight, op);
  return z_box_relevance(LinearMap{}, grad, x, weight, lower, upper, weight_abs, output, epsilon, gi);
}

Tensor linear_flat(const Tensor& x, const Tensor& weight, const OptTensor& bias, double epsilon, bool /*gi*/) {
  check_linear(x, weight, bias, epsilon, "lrpcpp.linear_flat");
  return at::linear(x, weight, bias);
}

Tensor linear_flat_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& output,
                             double epsilon, bool gi) {
  const char* op = "lrpcpp.linear_flat_relevance";
  check_linear(x, weight, std::nullopt, epsilon, op);
  check_linear_output(grad, output, x, weight, op);
  const auto cd = rule_dtype(x.scalar_type());
  return input_free_relevance(LinearMap{}, grad, x, at::ones_like(weight, weight.options().dtype(cd)), output, epsilon,
                              gi);
}

Tensor linear_w_square(const Tensor& x, const Tensor& weight, const OptTensor& bias, double epsilon,
                       const OptTensor& weight_sq, bool /*gi*/, bool /*bias_in_denominator*/) {
  const char* op = "lrpcpp.linear_w_square";
  check_linear(x, weight, bias, epsilon, op);
  check_transform(weight_sq, weight, op, "weight_sq");
  return at::linear(x, weight, bias);
}

Tensor linear_w_square_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const OptTensor& weight_sq,
                                 const Tensor& output, double epsilon, bool gi, const OptTensor& bias) {
  const char* op = "lrpcpp.linear_w_square_relevance";
  check_linear(x, weight, bias, epsilon, op);
  check_transform(weight_sq, weight, op, "weight_sq");
  check_linear_output(grad, output, x, weight, op);
  const auto cd = rule_dtype(x.scalar_type());
  return input_free_relevance(LinearMap{}, grad, x, square_weight(weight, weight_sq, cd), output, epsilon, gi,
                              square_bias(bias, cd));
}

// ----------------------------------------------------------------------------- convolutions
Tensor conv2d_gamma(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntRef stride, IntRef padding,
                    IntRef dilation, int64_t groups, double gamma, double epsilon, const OptTensor& weight_abs,
                    bool /*gi*/) {
  const char* op = "lrpcpp.conv2d_gamma";
  check_conv2d(x, weight, bias, stride, padding, dilation, groups, epsilon, op);
  check_gamma(gamma, op);
  check_transform(weight_abs, weight, op, "weight_abs");
  return at::conv2d(x, weight, bias, stride, padding, dilation, groups);
}

Tensor conv2d_gamma_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                              const OptTensor& weight_abs, const Tensor& output, IntRef stride, IntRef padding,
                              IntRef dilation, int64_t groups, double gamma, double epsilon, bool gi) {
  const char* op = "lrpcpp.conv2d_gamma_relevance";
  check_conv2d(x, weight, bias, stride, padding, dilation, groups, epsilon, op);
  check_gamma(gamma, op);
  check_transform(weight_abs, weight, op, "weight_abs");
  check_conv_output(grad, output, x, weight, stride, padding, dilation, op);
  return gamma_relevance(conv2d_map(stride, padding, dilation, groups), grad, x, weight, bias, weight_abs, output,
                         gamma, epsilon, gi);
}

Tensor conv2d_alpha_beta(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntRef stride, IntRef padding,
                         IntRef dilation, int64_t groups, double alpha, double beta, double epsilon,
                         const OptTensor& weight_pos, const OptTensor& weight_neg, bool /*gi*/,
                         bool /*bias_in_denominator*/) {
  const char* op = "lrpcpp.conv2d_alpha_beta";
  check_conv2d(x, weight, bias, stride, padding, dilation, groups, epsilon, op);
  check_alpha_beta(alpha, beta, op);
  check_transform(weight_pos, weight, op, "weight_pos");
  check_transform(weight_neg, weight, op, "weight_neg");
  return at::conv2d(x, weight, bias, stride, padding, dilation, groups);
}

Tensor conv2d_alpha_beta_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                   const OptTensor& weight_pos, const OptTensor& weight_neg, const Tensor& output,
                                   IntRef stride, IntRef padding, IntRef dilation, int64_t groups, double alpha,
                                   double beta, double epsilon, bool gi, const OptTensor& bias) {
  const char* op = "lrpcpp.conv2d_alpha_beta_relevance";
  check_conv2d(x, weight, bias, stride, padding, dilation, groups, epsilon, op);
  check_alpha_beta(alpha, beta, op);
  check_transform(weight_pos, weight, op, "weight_pos");
  check_transform(weight_neg, weight, op, "weight_neg");
  check_conv_output(grad, output, x, weight, stride, padding, dilation, op);
  return alpha_beta_relevance(conv2d_map(stride, padding, dilation, groups), grad, x, weight, weight_pos, weight_neg,
                              output, alpha, beta, epsilon, gi, bias);
}

Tensor conv2d_z_plus(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntRef stride, IntRef padding,
                     IntRef dilation, int64_t groups, double epsilon, const OptTensor& weight_pos, bool /*gi*/,
                     bool /*bias_in_denominator*/) {
  const char* op = "lrpcpp.conv2d_z_plus";
  check_conv2d(x, weight, bias, stride, padding, dilation, groups, epsilon, op);
  check_transform(weight_pos, weight, op, "weight_pos");
  return at::conv2d(x, weight, bias, stride, padding, dilation, groups);
}

Tensor conv2d_z_plus_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const OptTensor& weight_pos,
                               const Tensor& output, IntRef stride, IntRef padding, IntRef dilation, int64_t groups,
                               double epsilon, bool gi, const OptTensor& bias) {
  const char* op = "lrpcpp.conv2d_z_plus_relevance";
  check_conv2d(x, weight, bias, stride, padding, dilation, groups, epsilon, op);
  check_transform(weight_pos, weight, op, "weight_pos");
  check_conv_output(grad, output, x, weight, stride, padding, dilation, op);
  return z_plus_relevance(conv2d_map(stride, padding, dilation, groups), grad, x, weight, weight_pos, output, epsilon,
                          gi, bias);
}

Tensor conv2d_z_box(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lower,
                    const Tensor& upper, IntRef stride, IntRef padding, IntRef dilation, int64_t groups, double epsilon,
                    const OptTensor& weight_abs, bool /*gi*/) {
  const char* op = "lrpcpp.conv2d_z_box";
  check_conv2d(x, weight, bias, stride, padding, dilation, groups, epsilon, op);
  check_bounds(lower, upper, x, op);
  check_transform(weight_abs, weight, op, "weight_abs");
  return at::conv2d(x, weight, bias, stride, padding, dilation, groups);
}

Tensor conv2d_z_box_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& lower,
                              const Tensor& upper, const OptTensor& weight_abs, const Tensor& output, IntRef stride,
                              IntRef padding, IntRef dilation, int64_t groups, double epsilon, bool gi) {
  const char* op = "lrpcpp.conv2d_z_box_relevance";
  check_conv2d(x, weight, std::nullopt, stride, padding, dilation, groups, epsilon, op);
  check_bounds(lower, upper, x, op);
  check_transform(weight_abs, weight, op, "weight_abs");
  check_conv_output(grad, output, x, weight, stride, padding, dilation, op);
  return z_box_relevance(conv2d_map(stride, padding, dilation, groups), grad, x, weight, lower, upper, weight_abs,
                         output, epsilon, gi);
}

Tensor conv2d_flat(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntRef stride, IntRef padding,
                   IntRef dilation, int64_t groups, double epsilon, bool /*gi*/) {
  check_conv2d(x, weight, bias, stride, padding, dilation, groups, epsilon, "lrpcpp.conv2d_flat");
  return at::conv2d(x, weight, bias, stride, padding, dilation, groups);
}

Tensor conv2d_flat_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& output,
                             IntRef stride, IntRef padding, IntRef dilation, int64_t groups, double epsilon, bool gi) {
  const char* op = "lrpcpp.conv2d_flat_relevance";
  check_conv2d(x, weight, std::nullopt, stride, padding, dilation, groups, epsilon, op);
  check_conv_output(grad, output, x, weight, stride, padding, dilation, op);
  const auto cd = rule_dtype(x.scalar_type());
  return input_free_relevance(conv2d_map(stride, padding, dilation, groups), grad, x,
                              at::ones_like(weight, weight.options().dtype(cd)), output, epsilon, gi);
}

Tensor conv2d_w_square(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntRef stride, IntRef padding,
                       IntRef dilation, int64_t groups, double epsilon, const OptTensor& weight_sq, bool /*gi*/,
                       bool /*bias_in_denominator*/) {
  const char* op = "lrpcpp.conv2d_w_square";
  check_conv2d(x, weight, bias, stride, padding, dilation, groups, epsilon, op);
  check_transform(weight_sq, weight, op, "weight_sq");
  return at::conv2d(x, weight, bias, stride, padding, dilation, groups);
}

Tensor conv2d_w_square_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const OptTensor& weight_sq,
                                 const Tensor& output, IntRef stride, IntRef padding, IntRef dilation, int64_t groups,
                                 double epsilon, bool gi, const OptTensor& bias) {
  const char* op = "lrpcpp.conv2d_w_square_relevance";
  check_conv2d(x, weight, bias, stride, padding, dilation, groups, epsilon, op);
  check_transform(weight_sq, weight, op, "weight_sq");
  check_conv_output(grad, output, x, weight, stride, padding, dilation, op);
  const auto cd = rule_dtype(x.scalar_type());
  return input_free_relevance(conv2d_map(stride, padding, dilation, groups), grad, x,
                              square_weight(weight, weight_sq, cd), output, epsilon, gi, square_bias(bias, cd));
}

// ----------------------------------------------------------------------------- any convolution
// The forwards return at::convolution; the relevance ops run the rule templates above on ConvMap.
Tensor convolution_epsilon(const Tensor& x, const Tensor& weight, const OptTensor& bias, CONV_ARGS, double epsilon) {
  check_convolution(x, weight, bias, CONV_VALUES, epsilon, "lrpcpp.convolution_epsilon");
  return at::convolution(x, weight, bias, CONV_VALUES);
}

// RULES.md section 1 (as conv2d_epsilon_relevance): R_x = x * (R / stab(y)) W^T
Tensor convolution_epsilon_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& output,
                                     CONV_ARGS, double epsilon) {
  const char* op = "lrpcpp.convolution_epsilon_relevance";
  check_convolution(x, weight, std::nullopt, CONV_VALUES, epsilon, op);
  check_convolution_output(grad, output, x, weight, CONV_VALUES, op);
  const auto cd = compute_dtype(x.scalar_type());
  const Tensor rn = lrpcpp::stab_div(grad, output, epsilon, 1.0, cd);
  return times_input(ConvMap{CONV_VALUES}.transpose(rn, weight.to(cd), x.to(cd)), x);
}

Tensor convolution_gamma(const Tensor& x, const Tensor& weight, const OptTensor& bias, CONV_ARGS, double gamma,
                         double epsilon, const OptTensor& weight_abs, bool /*gi*/) {
  const char* op = "lrpcpp.convolution_gamma";
  check_convolution(x, weight, bias, CONV_VALUES, epsilon, op);
  check_gamma(gamma, op);
  check_transform(weight_abs, weight, op, "weight_abs");
  return at::convolution(x, weight, bias, CONV_VALUES);
}

Tensor convolution_gamma_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                   const OptTensor& weight_abs, const Tensor& output, CONV_ARGS, double gamma,
                                   double epsilon, bool gi) {
  const char* op = "lrpcpp.convolution_gamma_relevance";
  check_convolution(x, weight, bias, CONV_VALUES, epsilon, op);
  check_gamma(gamma, op);
  check_transform(weight_abs, weight, op, "weight_abs");
  check_convolution_output(grad, output, x, weight, CONV_VALUES, op);
  return gamma_relevance(ConvMap{CONV_VALUES}, grad, x, weight, bias, weight_abs, output, gamma, epsilon, gi);
}

Tensor convolution_alpha_beta(const Tensor& x, const Tensor& weight, const OptTensor& bias, CONV_ARGS, double alpha,
                              double beta, double epsilon, const OptTensor& weight_pos, const OptTensor& weight_neg,
                              bool /*gi*/, bool /*bias_in_denominator*/) {
  const char* op = "lrpcpp.convolution_alpha_beta";
  check_convolution(x, weight, bias, CONV_VALUES, epsilon, op);
  check_alpha_beta(alpha, beta, op);
  check_transform(weight_pos, weight, op, "weight_pos");
  check_transform(weight_neg, weight, op, "weight_neg");
  return at::convolution(x, weight, bias, CONV_VALUES);
}

Tensor convolution_alpha_beta_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                        const OptTensor& weight_pos, const OptTensor& weight_neg, const Tensor& output,
                                        CONV_ARGS, double alpha, double beta, double epsilon, bool gi,
                                        const OptTensor& bias) {
  const char* op = "lrpcpp.convolution_alpha_beta_relevance";
  check_convolution(x, weight, bias, CONV_VALUES, epsilon, op);
  check_alpha_beta(alpha, beta, op);
  check_transform(weight_pos, weight, op, "weight_pos");
  check_transform(weight_neg, weight, op, "weight_neg");
  check_convolution_output(grad, output, x, weight, CONV_VALUES, op);
  return alpha_beta_relevance(ConvMap{CONV_VALUES}, grad, x, weight, weight_pos, weight_neg, output, alpha, beta,
                              epsilon, gi, bias);
}

Tensor convolution_z_plus(const Tensor& x, const Tensor& weight, const OptTensor& bias, CONV_ARGS, double epsilon,
                          const OptTensor& weight_pos, bool /*gi*/, bool /*bias_in_denominator*/) {
  const char* op = "lrpcpp.convolution_z_plus";
  check_convolution(x, weight, bias, CONV_VALUES, epsilon, op);
  check_transform(weight_pos, weight, op, "weight_pos");
  return at::convolution(x, weight, bias, CONV_VALUES);
}

Tensor convolution_z_plus_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                    const OptTensor& weight_pos, const Tensor& output, CONV_ARGS, double epsilon,
                                    bool gi, const OptTensor& bias) {
  const char* op = "lrpcpp.convolution_z_plus_relevance";
  check_convolution(x, weight, bias, CONV_VALUES, epsilon, op);
  check_transform(weight_pos, weight, op, "weight_pos");
  check_convolution_output(grad, output, x, weight, CONV_VALUES, op);
  return z_plus_relevance(ConvMap{CONV_VALUES}, grad, x, weight, weight_pos, output, epsilon, gi, bias);
}

Tensor convolution_z_box(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lower,
                         const Tensor& upper, CONV_ARGS, double epsilon, const OptTensor& weight_abs, bool /*gi*/) {
  const char* op = "lrpcpp.convolution_z_box";
  check_convolution(x, weight, bias, CONV_VALUES, epsilon, op);
  check_bounds(lower, upper, x, op);
  check_transform(weight_abs, weight, op, "weight_abs");
  return at::convolution(x, weight, bias, CONV_VALUES);
}

Tensor convolution_z_box_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& lower,
                                   const Tensor& upper, const OptTensor& weight_abs, const Tensor& output, CONV_ARGS,
                                   double epsilon, bool gi) {
  const char* op = "lrpcpp.convolution_z_box_relevance";
  check_convolution(x, weight, std::nullopt, CONV_VALUES, epsilon, op);
  check_bounds(lower, upper, x, op);
  check_transform(weight_abs, weight, op, "weight_abs");
  check_convolution_output(grad, output, x, weight, CONV_VALUES, op);
  return z_box_relevance(ConvMap{CONV_VALUES}, grad, x, weight, lower, upper, weight_abs, output, epsilon, gi);
}

Tensor convolution_flat(const Tensor& x, const Tensor& weight, const OptTensor& bias, CONV_ARGS, double epsilon,
                        bool /*gi*/) {
  check_convolution(x, weight, bias, CONV_VALUES, epsilon, "lrpcpp.convolution_flat");
  return at::convolution(x, weight, bias, CONV_VALUES);
}

Tensor convolution_flat_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& output,
                                  CONV_ARGS, double epsilon, bool gi) {
  const char* op = "lrpcpp.convolution_flat_relevance";
  check_convolution(x, weight, std::nullopt, CONV_VALUES, epsilon, op);
  check_convolution_output(grad, output, x, weight, CONV_VALUES, op);
  const auto cd = rule_dtype(x.scalar_type());
  return input_free_relevance(ConvMap{CONV_VALUES}, grad, x, at::ones_like(weight, weight.options().dtype(cd)), output,
                              epsilon, gi);
}

Tensor convolution_w_square(const Tensor& x, const Tensor& weight, const OptTensor& bias, CONV_ARGS, double epsilon,
                            const OptTensor& weight_sq, bool /*gi*/, bool /*bias_in_denominator*/) {
  const char* op = "lrpcpp.convolution_w_square";
  check_convolution(x, weight, bias, CONV_VALUES, epsilon, op);
  check_transform(weight_sq, weight, op, "weight_sq");
  return at::convolution(x, weight, bias, CONV_VALUES);
}

Tensor convolution_w_square_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                      const OptTensor& weight_sq, const Tensor& output, CONV_ARGS, double epsilon,
                                      bool gi, const OptTensor& bias) {
  const char* op = "lrpcpp.convolution_w_square_relevance";
  check_convolution(x, weight, bias, CONV_VALUES, epsilon, op);
  check_transform(weight_sq, weight, op, "weight_sq");
  check_convolution_output(grad, output, x, weight, CONV_VALUES, op);
  const auto cd = rule_dtype(x.scalar_type());
  return input_free_relevance(ConvMap{CONV_VALUES}, grad, x, square_weight(weight, weight_sq, cd), output, epsilon, gi,
                              square_bias(bias, cd));
}

}  // namespace impl

// The compositions of dispatcher calls, registered once for every backend (CPU, CUDA, Meta).
TORCH_LIBRARY_IMPL(lrpcpp, CompositeExplicitAutograd, m) {
  m.impl("linear_gamma", &impl::linear_gamma);
  m.impl("linear_gamma_relevance", &impl::linear_gamma_relevance);
  m.impl("linear_alpha_beta", &impl::linear_alpha_beta);
  m.impl("linear_alpha_beta_relevance", &impl::linear_alpha_beta_relevance);
  m.impl("linear_z_plus", &impl::linear_z_plus);
  m.impl("linear_z_plus_relevance", &impl::linear_z_plus_relevance);
  m.impl("linear_z_box", &impl::linear_z_box);
  m.impl("linear_z_box_relevance", &impl::linear_z_box_relevance);
  m.impl("linear_flat", &impl::linear_flat);
  m.impl("linear_flat_relevance", &impl::linear_flat_relevance);
  m.impl("linear_w_square", &impl::linear_w_square);
  m.impl("linear_w_square_relevance", &impl::linear_w_square_relevance);
  m.impl("conv2d_gamma", &impl::conv2d_gamma);
  m.impl("conv2d_gamma_relevance", &impl::conv2d_gamma_relevance);
  m.impl("conv2d_alpha_beta", &impl::conv2d_alpha_beta);
  m.impl("conv2d_alpha_beta_relevance", &impl::conv2d_alpha_beta_relevance);
  m.impl("conv2d_z_plus", &impl::conv2d_z_plus);
  m.impl("conv2d_z_plus_relevance", &impl::conv2d_z_plus_relevance);
  m.impl("conv2d_z_box", &impl::conv2d_z_box);
  m.impl("conv2d_z_box_relevance", &impl::conv2d_z_box_relevance);
  m.impl("conv2d_flat", &impl::conv2d_flat);
  m.impl("conv2d_flat_relevance", &impl::conv2d_flat_relevance);
  m.impl("conv2d_w_square", &impl::conv2d_w_square);
  m.impl("conv2d_w_square_relevance", &impl::conv2d_w_square_relevance);
  m.impl("convolution_epsilon", &impl::convolution_epsilon);
  m.impl("convolution_epsilon_relevance", &impl::convolution_epsilon_relevance);
  m.impl("convolution_gamma", &impl::convolution_gamma);
  m.impl("convolution_gamma_relevance", &impl::convolution_gamma_relevance);
  m.impl("convolution_alpha_beta", &impl::convolution_alpha_beta);
  m.impl("convolution_alpha_beta_relevance", &impl::convolution_alpha_beta_relevance);
  m.impl("convolution_z_plus", &impl::convolution_z_plus);
  m.impl("convolution_z_plus_relevance", &impl::convolution_z_plus_relevance);
  m.impl("convolution_z_box", &impl::convolution_z_box);
  m.impl("convolution_z_box_relevance", &impl::convolution_z_box_relevance);
  m.impl("convolution_flat", &impl::convolution_flat);
  m.impl("convolution_flat_relevance", &impl::convolution_flat_relevance);
  m.impl("convolution_w_square", &impl::convolution_w_square);
  m.impl("convolution_w_square_relevance", &impl::convolution_w_square_relevance);
}

#undef CONV_ARGS
#undef CONV_VALUES

}  // namespace lrpcpp
