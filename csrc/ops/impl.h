// Backend-independent pieces of the ops, shared by the per-backend files:
// - forwards that are torch's own ATen calls (registered once, under
//   CompositeExplicitAutograd, so the forward is bitwise torch's on every backend);
// - relevance ops that compose ATen products with lrpcpp primitives (registered
//   the same way, next to their definitions in ops/<op>.cpp);
// - the argument checks every backend runs before its kernel.
#pragma once

#include "../lrpcpp.h"
#include "common.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

// A typed handle to a registered lrpcpp op, found once.
#define LRPCPP_DISPATCH(name) \
  static auto op =            \
      c10::Dispatcher::singleton().findSchemaOrThrow("lrpcpp::" #name, "").typed<decltype(::lrpcpp::name)>()

namespace lrpcpp::impl {

// linear family
void check_stab_div(const Tensor& relevance, const Tensor& z, double epsilon, double scale,
                    std::optional<at::ScalarType> dtype);
at::ScalarType stab_div_dtype(const Tensor& z, std::optional<at::ScalarType> dtype);
Tensor linear_epsilon(const Tensor& x, const Tensor& weight, const OptTensor& bias, double epsilon);
Tensor linear_epsilon_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& output,
                                double epsilon);
Tensor conv2d_epsilon(const Tensor& x, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double epsilon);
Tensor conv2d_epsilon_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& output,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, double epsilon);

// argument checks of the affine maps, shared with the vision family
void check_bias(const OptTensor& bias, const Tensor& x, const Tensor& weight, const char* op);
void check_linear(const Tensor& x, const Tensor& weight, const OptTensor& bias, double epsilon, const char* op);
void check_conv2d(const Tensor& x, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double epsilon, const char* op);
// grad and output of a relevance op: same shape, dtype and device
void check_grad_output(const Tensor& grad, const Tensor& output, const Tensor& x, const char* op);

// binary family
void check_add2_relevance(const Tensor& grad, const Tensor& a, const Tensor& b, double epsilon);
Tensor add2(const Tensor& a, const Tensor& b, double epsilon);
Tensor mul2(const Tensor& a, const Tensor& b);
TensorPair mul2_relevance(const Tensor& grad, const Tensor& a, const Tensor& b, std::array<bool, 2> output_mask);
Tensor matmul(const Tensor& a, const Tensor& b, double epsilon);
TensorPair matmul_relevance(const Tensor& grad, const Tensor& a, const Tensor& b, const Tensor& output, double epsilon,
                            std::array<bool, 2> output_mask);

// softmax
Tensor softmax(const Tensor& x, int64_t dim, double temperature, std::optional<at::ScalarType> dtype);
// returns the wrapped dim
int64_t check_softmax_relevance(const Tensor& grad, const Tensor& x, const Tensor& output, int64_t dim,
                                double temperature);

// attention
void check_attention(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& attn_mask, bool is_causal,
                     std::optional<double> scale, bool enable_gqa, const char* op);
void check_attention_relevance(const Tensor& grad, const Tensor& q, const Tensor& k, const Tensor& v,
                               const OptTensor& attn_mask, const Tensor& output, const Tensor& logsumexp,
                               bool is_causal, std::optional<double> scale, bool enable_gqa, double epsilon);
void check_attention_method(c10::string_view method, const char* op);
// the dtype of the forward's log-sum-exp: float64 for float64, else float32
at::ScalarType attention_stat_dtype(at::ScalarType dtype);
// The forward's output, of shape [..., H, T_q, E_v], laid out as [..., T_q, H, E_v] in memory (as torch's
// SDPA lays out its CPU output): merging the heads, transpose(-3, -2) then a reshape, is a view. With
// fewer than 3 dimensions, contiguous. The same strides on every backend (the Meta kernel's included).
Tensor empty_attention_output(c10::SymIntArrayRef shape, const at::TensorOptions& options);
// Whether q, k or v (x) is laid out by position: [..., T, H, E] in memory, as the heads of a projection
// split by view and transpose.
bool attention_laid_out_by_position(const Tensor& x);
// The relevance of x, in x's layout: as the forward's output where x is laid out by position, else
// contiguous. The gradient that the heads' view passes back is then a view too, not a copy. Every backend.
Tensor empty_attention_relevance(const Tensor& x);

// norms
// x ends with normalized_shape; weight and bias (when given) have that shape, on x's device (and,
// with same_dtype, x's dtype or float32 for a float16 / bfloat16 x); eps >= 0. Errors call x `x_name`.
void check_norm(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight, const OptTensor& bias,
                std::optional<double> eps, const char* op, bool same_dtype = true, const char* x_name = "x");
Tensor rms_norm_identity(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                         std::optional<double> eps);
Tensor layer_norm(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight, const OptTensor& bias,
                  double eps, double epsilon);
void check_layer_norm_relevance(const Tensor& grad, const Tensor& x, at::IntArrayRef normalized_shape,
                                const OptTensor& weight, const OptTensor& bias, double eps, double epsilon);
Tensor layer_norm_identity(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                           const OptTensor& bias, double eps);
// weight and bias as flat rows in x's accumulation type (fp32/fp64), ones and zeros where absent,
// so the relevance kernels run one branch-free loop
TensorPair layer_norm_affine_rows(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                                  const OptTensor& bias);
// one such row: `t` flattened in x's accumulation type, or `fill` repeated where t is absent
Tensor layer_norm_affine_row(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& t, double fill);
Tensor normalize_identity(const Tensor& x, double p, int64_t dim, double eps);

// mean
Tensor mean(const Tensor& x, at::OptionalIntArrayRef dim, bool keepdim, double epsilon);
Tensor mean_relevance(const Tensor& grad, const Tensor& x, at::OptionalIntArrayRef dim, bool keepdim, double epsilon);

// identity rule
Tensor silu_identity(const Tensor& x);
Tensor gelu_identity(const Tensor& x, c10::string_view approximate);
Tensor tanh_identity(const Tensor& x);
Tensor relu_identity(const Tensor& x);
Tensor sigmoid_identity(const Tensor& x);
Tensor identity_relevance(const Tensor& grad, at::ScalarType dtype);
Tensor stop_relevance(const Tensor& x);

// gradient-times-input family
void check_gi_identity(const Tensor& x, const Tensor& y, double epsilon, const char* op);
void check_gi_grad_scale(const Tensor& x, const Tensor& scale);
void check_gi_scale_backward(const Tensor& grad, const Tensor& factor, at::ScalarType dtype);
// gi_scale_backward's output, in `options`: with grad's strides when grad is dense (a transposed or
// permuted gradient keeps its memory order), else contiguous; the same on every backend
Tensor gi_scale_backward_empty(const Tensor& grad, const at::TensorOptions& options);
void check_gi_layer_norm_backward(const Tensor& grad, const Tensor& rstd, at::IntArrayRef normalized_shape,
                                  const OptTensor& weight);
Tensor gi_identity(const Tensor& x, const Tensor& y, double epsilon, bool keep_inputs);
Tensor gi_grad_scale(const Tensor& x, const Tensor& scale);
Tensor gi_layer_norm(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight, const OptTensor& bias,
                     double eps);

// vision family (rules of RULES.md section 3)
// checks of gamma_stab_div / alpha_beta_stab_div; returns bias_dim wrapped into [0, output.dim())
int64_t check_factor_inputs(const Tensor& grad, const Tensor& output, const Tensor& abs_product, const OptTensor& bias,
                            int64_t bias_dim, double epsilon, const char* op);
void check_gamma(double gamma, const char* op);
void check_alpha_beta(double alpha, double beta, const char* op);
void check_alpha_beta_inputs(const Tensor& grad, const Tensor& output, const Tensor& pos_sum, const Tensor& neg_sum,
                             double alpha, double beta, double epsilon);
void check_split_times_input(const Tensor& x, const Tensor& a, const Tensor& b);
// product of output's sizes after dimension d (the run of elements sharing one bias value)
int64_t inner_size(const Tensor& output, int64_t d);
}  // namespace lrpcpp::impl
