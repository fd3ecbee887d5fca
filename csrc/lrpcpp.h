// Public C++ API of lrpcpp: one function per operator, each a call through the
// PyTorch dispatcher (so autograd, CPU/CUDA/Meta kernels and tracing all apply).
//
// Link liblrpcpp (CMake target lrpcpp::lrpcpp) and call, for example,
//   at::Tensor y = lrpcpp::linear_epsilon(x, w, b, 1e-6);
//   y.backward(y);           // x.grad() is now the epsilon-LRP relevance of x
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#if defined(_WIN32)
#define LRPCPP_API __declspec(dllexport)
#else
#define LRPCPP_API __attribute__((visibility("default")))
#endif

namespace lrpcpp {

using at::Tensor;
using TensorPair = std::tuple<Tensor, Tensor>;
using TensorTriple = std::tuple<Tensor, Tensor, Tensor>;
using OptTensor = std::optional<Tensor>;

// -1 for a CPU-only build, else the CUDA version the library was built with.
LRPCPP_API int64_t cuda_version();

// R / stab(scale * z), computed in fp32 or fp64, returned in `dtype` (default: z's dtype).
LRPCPP_API Tensor stab_div(const Tensor& relevance, const Tensor& z, double epsilon, double scale,
                           std::optional<at::ScalarType> dtype);

LRPCPP_API Tensor linear_epsilon(const Tensor& x, const Tensor& weight, const OptTensor& bias, double epsilon);
LRPCPP_API Tensor linear_epsilon_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                           const Tensor& output, double epsilon);
LRPCPP_API Tensor conv2d_epsilon(const Tensor& x, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double epsilon);
LRPCPP_API Tensor conv2d_epsilon_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                           const Tensor& output, at::IntArrayRef stride, at::IntArrayRef padding,
                                           at::IntArrayRef dilation, int64_t groups, double epsilon);

LRPCPP_API Tensor add2(const Tensor& a, const Tensor& b, double epsilon);
LRPCPP_API TensorPair add2_relevance(const Tensor& grad, const Tensor& a, const Tensor& b, double epsilon,
                                     std::array<bool, 2> output_mask);
LRPCPP_API Tensor mul2(const Tensor& a, const Tensor& b);
LRPCPP_API TensorPair mul2_relevance(const Tensor& grad, const Tensor& a, const Tensor& b,
                                     std::array<bool, 2> output_mask);
LRPCPP_API Tensor matmul(const Tensor& a, const Tensor& b, double epsilon);
LRPCPP_API TensorPair matmul_relevance(const Tensor& grad, const Tensor& a, const Tensor& b, const Tensor& output,
                                       double epsilon, std::array<bool, 2> output_mask);

LRPCPP_API Tensor softmax(const Tensor& x, int64_t dim, double temperature, std::optional<at::ScalarType> dtype);
LRPCPP_API Tensor softmax_relevance(const Tensor& grad, const Tensor& x, const Tensor& output, int64_t dim,
                                    double temperature);

// Fused scaled dot-product attention (shapes as F.scaled_dot_product_attention: [..., H, T, E]; a bool
// attn_mask is True where a position is attended, a float one is added to the scaled scores; scale
// defaults to 1 / sqrt(E)) whose backward is the explicit relevance of matmul -> softmax -> matmul.
// method "cp-lrp" holds the attention weights constant (q and k get no relevance).
LRPCPP_API Tensor scaled_dot_product_attention(const Tensor& query, const Tensor& key, const Tensor& value,
                                               const OptTensor& attn_mask, bool is_causal, std::optional<double> scale,
                                               bool enable_gqa, c10::string_view method, double epsilon);
// The output and the log-sum-exp of each softmax row (float32, float64 for a float64 query; -inf for
// a row with no attended position, whose output is 0).
LRPCPP_API TensorPair scaled_dot_product_attention_forward(const Tensor& query, const Tensor& key, const Tensor& value,
                                                           const OptTensor& attn_mask, bool is_causal,
                                                           std::optional<double> scale, bool enable_gqa);
// The relevance of query, key and value (those selected by output_mask) from the relevance `grad` of
// the output, recomputing the scores tile by tile from the saved log-sum-exp.
LRPCPP_API TensorTriple scaled_dot_product_attention_relevance(const Tensor& grad, const Tensor& query,
                                                               const Tensor& key, const Tensor& value,
                                                               const OptTensor& attn_mask, const Tensor& output,
                                                               const Tensor& logsumexp, bool is_causal,
                                                               std::optional<double> scale, bool enable_gqa,
                                                               double epsilon, std::array<bool, 3> output_mask);

LRPCPP_API Tensor rms_norm_identity(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                                    std::optional<double> eps);
LRPCPP_API Tensor layer_norm(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                             const OptTensor& bias, double eps, double epsilon);
LRPCPP_API Tensor layer_norm_relevance(const Tensor& grad, const Tensor& x, at::IntArrayRef normalized_shape,
                                       const OptTensor& weight, const OptTensor& bias, double eps, double epsilon);
LRPCPP_API Tensor layer_norm_identity(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                                      const OptTensor& bias, double eps);
LRPCPP_API Tensor normalize_identity(const Tensor& x, double p, int64_t dim, double eps);

LRPCPP_API Tensor mean(const Tensor& x, at::OptionalIntArrayRef dim, bool keepdim, double epsilon);
LRPCPP_API Tensor mean_relevance(const Tensor& grad, const Tensor& x, at::OptionalIntArrayRef dim, bool keepdim,
                                 double epsilon);

LRPCPP_API Tensor silu_identity(const Tensor& x);
LRPCPP_API Tensor gelu_identity(const Tensor& x, c10::string_view approximate);
LRPCPP_API Tensor tanh_identity(const Tensor& x);
LRPCPP_API Tensor relu_identity(const Tensor& x);
LRPCPP_API Tensor sigmoid_identity(const Tensor& x);
LRPCPP_API Tensor identity_relevance(const Tensor& grad, at::ScalarType dtype);
LRPCPP_API Tensor stop_relevance(const Tensor& x);

// Gradient-times-input semantics: autograd carries g = R / x (seed with 1), relevance is x * x.grad.
// gi_identity: y = f(x) (computed by the caller) itself, a view; backward g_x = g_y * y / stab(x).
// It keeps the factor y / stab(x) for the backward; keep_inputs: x and y instead (no new tensor where
// other layers keep them too, as rule layers on both sides of an activation do).
LRPCPP_API Tensor gi_identity(const Tensor& x, const Tensor& y, double epsilon, bool keep_inputs = false);
// gi_identity's saved factor y / stab(x), in x's dtype, clamped to its finite range.
LRPCPP_API Tensor gi_identity_factor(const Tensor& x, const Tensor& y, double epsilon);
// x itself, a view; backward g_x = g * scale (scale broadcastable to x; zeros detach).
LRPCPP_API Tensor gi_grad_scale(const Tensor& x, const Tensor& scale);
// grad * factor at grad's shape, computed in fp32 for fp16/bf16, returned in `dtype`.
LRPCPP_API Tensor gi_scale_backward(const Tensor& grad, const Tensor& factor, at::ScalarType dtype);
// at::layer_norm; backward with sigma detached: g_x = rstd * (h - mean(h)), h = g * w.
LRPCPP_API Tensor gi_layer_norm(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                                const OptTensor& bias, double eps);
// its backward: rstd is the forward's 1 / sigma per row (as at::native_layer_norm returns it: grad's
// leading dims, then a 1 for each normalised dim), so the backward reads no x.
LRPCPP_API Tensor gi_layer_norm_backward(const Tensor& grad, const Tensor& rstd, at::IntArrayRef normalized_shape,
                                         const OptTensor& weight);

// Rules for vision and convolution layers (RULES.md section 3): gamma, alpha-beta, z-plus, z-box,
// flat and w-square on linear layers and 2-D convolutions. Each forward returns exactly at::linear /
// at::conv2d; its backward calls the rule's *_relevance op. weight_abs (|W|), weight_pos (max(W, 0)),
// weight_neg (min(W, 0)) and weight_sq (W^2) are the weight transforms a rule multiplies by: pass them in, computed
// once while the weight is unchanged, or leave them empty to have them computed per call. gi = true: the backward
// returns the gradient-times-input form g_x, with x * g_x the rule's relevance of x, from the incoming gradient g_y
// with R_y = y * g_y. bias_in_denominator = true (alpha-beta, z-plus, w-square): the bias is counted in the
// denominators as zennit counts it (b+ in the positive sum, b- in the negative sum, b^2 for w-square); false leaves
// it out (RULES.md section 3). Their relevance ops count a bias they are given.
using IntRef = at::IntArrayRef;
LRPCPP_API Tensor linear_gamma(const Tensor& x, const Tensor& weight, const OptTensor& bias, double gamma,
                               double epsilon, const OptTensor& weight_abs, bool gi);
LRPCPP_API Tensor linear_gamma_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                         const OptTensor& bias, const OptTensor& weight_abs, const Tensor& output,
                                         double gamma, double epsilon, bool gi);
LRPCPP_API Tensor linear_alpha_beta(const Tensor& x, const Tensor& weight, const OptTensor& bias, double alpha,
                                    double beta, double epsilon, const OptTensor& weight_pos,
                                    const OptTensor& weight_neg, bool gi, bool bias_in_denominator = false);
LRPCPP_API Tensor linear_alpha_beta_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                              const OptTensor& weight_pos, const OptTensor& weight_neg,
                                              const Tensor& output, double alpha, double beta, double epsilon, bool gi,
                                              const OptTensor& bias = std::nullopt);
LRPCPP_API Tensor linear_z_plus(const Tensor& x, const Tensor& weight, const OptTensor& bias, double epsilon,
                                const OptTensor& weight_pos, bool gi, bool bias_in_denominator = false);
LRPCPP_API Tensor linear_z_plus_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                          const OptTensor& weight_pos, const Tensor& output, double epsilon, bool gi,
                                          const OptTensor& bias = std::nullopt);
LRPCPP_API Tensor linear_z_box(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lower,
                               const Tensor& upper, double epsilon, const OptTensor& weight_abs, bool gi);
LRPCPP_API Tensor linear_z_box_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& lower,
                                         const Tensor& upper, const OptTensor& weight_abs, const Tensor& output,
                                         double epsilon, bool gi);
LRPCPP_API Tensor linear_flat(const Tensor& x, const Tensor& weight, const OptTensor& bias, double epsilon, bool gi);
LRPCPP_API Tensor linear_flat_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& output,
                                        double epsilon, bool gi);
LRPCPP_API Tensor linear_w_square(const Tensor& x, const Tensor& weight, const OptTensor& bias, double epsilon,
                                  const OptTensor& weight_sq, bool gi, bool bias_in_denominator = false);
LRPCPP_API Tensor linear_w_square_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                            const OptTensor& weight_sq, const Tensor& output, double epsilon, bool gi,
                                            const OptTensor& bias = std::nullopt);
LRPCPP_API Tensor conv2d_gamma(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntRef stride,
                               IntRef padding, IntRef dilation, int64_t groups, double gamma, double epsilon,
                               const OptTensor& weight_abs, bool gi);
LRPCPP_API Tensor conv2d_gamma_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                         const OptTensor& bias, const OptTensor& weight_abs, const Tensor& output,
                                         IntRef stride, IntRef padding, IntRef dilation, int64_t groups, double gamma,
                                         double epsilon, bool gi);
LRPCPP_API Tensor conv2d_alpha_beta(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntRef stride,
                                    IntRef padding, IntRef dilation, int64_t groups, double alpha, double beta,
                                    double epsilon, const OptTensor& weight_pos, const OptTensor& weight_neg, bool gi,
                                    bool bias_in_denominator = false);
LRPCPP_API Tensor conv2d_alpha_beta_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                              const OptTensor& weight_pos, const OptTensor& weight_neg,
                                              const Tensor& output, IntRef stride, IntRef padding, IntRef dilation,
                                              int64_t groups, double alpha, double beta, double epsilon, bool gi,
                                              const OptTensor& bias = std::nullopt);
LRPCPP_API Tensor conv2d_z_plus(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntRef stride,
                                IntRef padding, IntRef dilation, int64_t groups, double epsilon,
                                const OptTensor& weight_pos, bool gi, bool bias_in_denominator = false);
LRPCPP_API Tensor conv2d_z_plus_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                          const OptTensor& weight_pos, const Tensor& output, IntRef stride,
                                          IntRef padding, IntRef dilation, int64_t groups, double epsilon, bool gi,
                                          const OptTensor& bias = std::nullopt);
LRPCPP_API Tensor conv2d_z_box(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lower,
                               const Tensor& upper, IntRef stride, IntRef padding, IntRef dilation, int64_t groups,
                               double epsilon, const OptTensor& weight_abs, bool gi);
LRPCPP_API Tensor conv2d_z_box_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& lower,
                                         const Tensor& upper, const OptTensor& weight_abs, const Tensor& output,
                                         IntRef stride, IntRef padding, IntRef dilation, int64_t groups, double epsilon,
                                         bool gi);
LRPCPP_API Tensor conv2d_flat(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntRef stride,
                              IntRef padding, IntRef dilation, int64_t groups, double epsilon, bool gi);
LRPCPP_API Tensor conv2d_flat_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& output,
                                        IntRef stride, IntRef padding, IntRef dilation, int64_t groups, double epsilon,
                                        bool gi);
LRPCPP_API Tensor conv2d_w_square(const Tensor& x, const Tensor& weight, const OptTensor& bias, IntRef stride,
                                  IntRef padding, IntRef dilation, int64_t groups, double epsilon,
                                  const OptTensor& weight_sq, bool gi, bool bias_in_denominator = false);
LRPCPP_API Tensor conv2d_w_square_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                            const OptTensor& weight_sq, const Tensor& output, IntRef stride,
                                            IntRef padding, IntRef dilation, int64_t groups, double epsilon, bool gi,
                                            const OptTensor& bias = std::nullopt);
// The same rules (and epsilon) on any convolution: 1 to 3 spatial dimensions, transposed or not, with
// torch's at::convolution arguments (stride, padding, dilation and output_padding with one value per
// spatial dimension). Each forward returns exactly at::convolution; the relevance maps back through the
// input-gradient of the convolution.
#define LRPCPP_CONV_ARGS \
  IntRef stride, IntRef padding, IntRef dilation, bool transposed, IntRef output_padding, int64_t groups
LRPCPP_API Tensor convolution_epsilon(const Tensor& x, const Tensor& weight, const OptTensor& bias, LRPCPP_CONV_ARGS,
                                      double epsilon);
LRPCPP_API Tensor convolution_epsilon_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                                const Tensor& output, LRPCPP_CONV_ARGS, double epsilon);
LRPCPP_API Tensor convolution_gamma(const Tensor& x, const Tensor& weight, const OptTensor& bias, LRPCPP_CONV_ARGS,
                                    double gamma, double epsilon, const OptTensor& weight_abs, bool gi);
LRPCPP_API Tensor convolution_gamma_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                              const OptTensor& bias, const OptTensor& weight_abs, const Tensor& output,
                                              LRPCPP_CONV_ARGS, double gamma, double epsilon, bool gi);
LRPCPP_API Tensor convolution_alpha_beta(const Tensor& x, const Tensor& weight, const OptTensor& bias, LRPCPP_CONV_ARGS,
                                         double alpha, double beta, double epsilon, const OptTensor& weight_pos,
                                         const OptTensor& weight_neg, bool gi, bool bias_in_denominator = false);
LRPCPP_API Tensor convolution_alpha_beta_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                                   const OptTensor& weight_pos, const OptTensor& weight_neg,
                                                   const Tensor& output, LRPCPP_CONV_ARGS, double alpha, double beta,
                                                   double epsilon, bool gi, const OptTensor& bias = std::nullopt);
LRPCPP_API Tensor convolution_z_plus(const Tensor& x, const Tensor& weight, const OptTensor& bias, LRPCPP_CONV_ARGS,
                                     double epsilon, const OptTensor& weight_pos, bool gi,
                                     bool bias_in_denominator = false);
LRPCPP_API Tensor convolution_z_plus_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                               const OptTensor& weight_pos, const Tensor& output, LRPCPP_CONV_ARGS,
                                               double epsilon, bool gi, const OptTensor& bias = std::nullopt);
LRPCPP_API Tensor convolution_z_box(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lower,
                                    const Tensor& upper, LRPCPP_CONV_ARGS, double epsilon, const OptTensor& weight_abs,
                                    bool gi);
LRPCPP_API Tensor convolution_z_box_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                              const Tensor& lower, const Tensor& upper, const OptTensor& weight_abs,
                                              const Tensor& output, LRPCPP_CONV_ARGS, double epsilon, bool gi);
LRPCPP_API Tensor convolution_flat(const Tensor& x, const Tensor& weight, const OptTensor& bias, LRPCPP_CONV_ARGS,
                                   double epsilon, bool gi);
LRPCPP_API Tensor convolution_flat_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                             const Tensor& output, LRPCPP_CONV_ARGS, double epsilon, bool gi);
LRPCPP_API Tensor convolution_w_square(const Tensor& x, const Tensor& weight, const OptTensor& bias, LRPCPP_CONV_ARGS,
                                       double epsilon, const OptTensor& weight_sq, bool gi,
                                       bool bias_in_denominator = false);
LRPCPP_API Tensor convolution_w_square_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                                 const OptTensor& weight_sq, const Tensor& output, LRPCPP_CONV_ARGS,
                                                 double epsilon, bool gi, const OptTensor& bias = std::nullopt);
#undef LRPCPP_CONV_ARGS
// Pooling with 1 to 3 spatial dimensions and torch's arguments (stride {} is the kernel size): average pooling with
// the epsilon rule (R_x = x * P^T (R / stab(y)), P^T the pooling's input-gradient), adaptive average pooling the
// same, max pooling winner-takes-all (R_x = P^T R: each window's relevance to its maximum). Each forward returns
// exactly torch's pooling; gi = true: the backward takes and returns gradients (x * g_x = R_x, exactly).
LRPCPP_API Tensor avg_pool_epsilon(const Tensor& x, IntRef kernel_size, IntRef stride, IntRef padding, bool ceil_mode,
                                   bool count_include_pad, std::optional<int64_t> divisor_override, double epsilon,
                                   bool gi);
LRPCPP_API Tensor avg_pool_epsilon_relevance(const Tensor& grad, const Tensor& x, const Tensor& output,
                                             IntRef kernel_size, IntRef stride, IntRef padding, bool ceil_mode,
                                             bool count_include_pad, std::optional<int64_t> divisor_override,
                                             double epsilon, bool gi);
LRPCPP_API Tensor adaptive_avg_pool_epsilon(const Tensor& x, IntRef output_size, double epsilon, bool gi);
LRPCPP_API Tensor adaptive_avg_pool_epsilon_relevance(const Tensor& grad, const Tensor& x, const Tensor& output,
                                                      IntRef output_size, double epsilon, bool gi);
LRPCPP_API Tensor max_pool_wta(const Tensor& x, IntRef kernel_size, IntRef stride, IntRef padding, IntRef dilation,
                               bool ceil_mode, bool gi);
LRPCPP_API Tensor max_pool_wta_relevance(const Tensor& grad, const Tensor& x, const Tensor& output, IntRef kernel_size,
                                         IntRef stride, IntRef padding, IntRef dilation, bool ceil_mode, bool gi);
// The per-element primitives of these rules. gamma_stab_div: the factors (s_w, s_abs) of the gamma
// rule's R_x = x * (s_w W) + |x| * (s_abs |W|) from the incoming relevance (gi: gradient), the
// output, the product |x| |W| and the bias along dimension bias_dim of the output.
// alpha_beta_stab_div: (alpha R / stab(A), -beta R / stab(B)) from the sums A >= 0 and B <= 0 of the
// positive and of the negative terms x_i w_ij of each output.
LRPCPP_API TensorPair gamma_stab_div(const Tensor& grad, const Tensor& output, const Tensor& abs_product,
                                     const OptTensor& bias, int64_t bias_dim, double gamma, double epsilon, bool gi);
LRPCPP_API TensorPair alpha_beta_stab_div(const Tensor& grad, const Tensor& output, const Tensor& pos_sum,
                                          const Tensor& neg_sum, double alpha, double beta, double epsilon, bool gi);
// x * a + |x| * b; gi: a + sign(x) * b (sign(0) = +1). All three of one shape and dtype.
LRPCPP_API Tensor split_times_input(const Tensor& x, const Tensor& a, const Tensor& b, bool gi);

}  // namespace lrpcpp
