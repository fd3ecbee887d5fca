// Every lrpcpp operator schema, declared exactly once.
//
// Each rule is a pair: the forward op (same output as torch's) and a public
// relevance op that its autograd backward calls through the dispatcher, so the
// rule is dispatchable, opcheck-able and visible in compiled graphs.
#include <torch/library.h>

#include "lrpcpp.h"

#ifdef WITH_CUDA
#include <cuda.h>
#endif

namespace lrpcpp {

int64_t cuda_version() {
#ifdef WITH_CUDA
  return CUDA_VERSION;
#else
  return -1;
#endif
}

TORCH_LIBRARY(lrpcpp, m) {
  m.def("cuda_version() -> int", &cuda_version);

  // epsilon rule through an affine map (RULES.md section 1, Eq. 8)
  m.def("stab_div(Tensor relevance, Tensor z, float epsilon, float scale=1.0, ScalarType? dtype=None) -> Tensor");
  m.def("linear_epsilon(Tensor x, Tensor weight, Tensor? bias=None, float epsilon=1e-6) -> Tensor");
  m.def("linear_epsilon_relevance(Tensor grad, Tensor x, Tensor weight, Tensor output, float epsilon) -> Tensor");
  m.def(
      "conv2d_epsilon(Tensor x, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
      "int[2] dilation=1, int groups=1, float epsilon=1e-6) -> Tensor");
  m.def(
      "conv2d_epsilon_relevance(Tensor grad, Tensor x, Tensor weight, Tensor output, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, float epsilon) -> Tensor");

  // binary ops between two relevance-carrying tensors
  m.def("add2(Tensor a, Tensor b, float epsilon=1e-8) -> Tensor");
  m.def("add2_relevance(Tensor grad, Tensor a, Tensor b, float epsilon, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def("mul2(Tensor a, Tensor b) -> Tensor");
  m.def("mul2_relevance(Tensor grad, Tensor a, Tensor b, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def("matmul(Tensor a, Tensor b, float epsilon=1e-8) -> Tensor");
  m.def(
      "matmul_relevance(Tensor grad, Tensor a, Tensor b, Tensor output, float epsilon, bool[2] output_mask) "
      "-> (Tensor, Tensor)");

  // softmax: Deep Taylor decomposition with bias (Prop. 3.1)
  m.def("softmax(Tensor x, int dim, float temperature=1.0, ScalarType? dtype=None) -> Tensor");
  m.def("softmax_relevance(Tensor grad, Tensor x, Tensor output, int dim, float temperature) -> Tensor");

  // fused scaled dot-product attention: the relevance of matmul -> softmax -> matmul (above), from
  // the row statistics (log-sum-exp) of the forward instead of the [T_q, T_k] intermediates
  m.def(
      "scaled_dot_product_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
      "bool is_causal=False, float? scale=None, bool enable_gqa=False, str method=\"attnlrp\", "
      "float epsilon=1e-8) -> Tensor");
  m.def(
      "scaled_dot_product_attention_forward(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
      "bool is_causal=False, float? scale=None, bool enable_gqa=False) -> (Tensor, Tensor)");
  m.def(
      "scaled_dot_product_attention_relevance(Tensor grad, Tensor query, Tensor key, Tensor value, "
      "Tensor? attn_mask, Tensor output, Tensor logsumexp, bool is_causal, float? scale, bool enable_gqa, "
      "float epsilon, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // normalisation layers
  m.def("rms_norm_identity(Tensor x, int[] normalized_shape, Tensor? weight=None, float? eps=None) -> Tensor");
  m.def(
      "layer_norm(Tensor x, int[] normalized_shape, Tensor? weight=None, Tensor? bias=None, float eps=1e-5, "
      "float epsilon=1e-6) -> Tensor");
  m.def(
      "layer_norm_relevance(Tensor grad, Tensor x, int[] normalized_shape, Tensor? weight, Tensor? bias, "
      "float eps, float epsilon) -> Tensor");
  m.def(
      "layer_norm_identity(Tensor x, int[] normalized_shape, Tensor? weight=None, Tensor? bias=None, "
      "float eps=1e-5) -> Tensor");
  m.def("normalize_identity(Tensor x, float p=2.0, int dim=1, float eps=1e-12) -> Tensor");

  // reductions
  m.def("mean(Tensor x, int[1]? dim=None, bool keepdim=False, float epsilon=1e-6) -> Tensor");
  m.def("mean_relevance(Tensor grad, Tensor x, int[1]? dim, bool keepdim, float epsilon) -> Tensor");

  // identity rule (activations) and the relevance cut
  m.def("silu_identity(Tensor x) -> Tensor");
  m.def("gelu_identity(Tensor x, str approximate=\"none\") -> Tensor");
  m.def("tanh_identity(Tensor x) -> Tensor");
  m.def("relu_identity(Tensor x) -> Tensor");
  m.def("sigmoid_identity(Tensor x) -> Tensor");
  m.def("identity_relevance(Tensor grad, ScalarType dtype) -> Tensor");
  m.def("stop_relevance(Tensor x) -> Tensor");

  // rules for vision and convolution layers (RULES.md section 3). Each forward returns exactly
  // F.linear / F.conv2d; the weight transforms (|W|, W+, W^2) may be passed in, computed once by the
  // caller, else they are computed per call. gi=True: the backward returns the gradient-times-input
  // form g_x (x * g_x is the rule's relevance of x), taking the gradient g_y with R_y = y * g_y.
  // bias_in_denominator=True (alpha-beta, z-plus, w-square): the bias is counted in the denominators as
  // zennit counts it (b+ in the sum of the positive terms, b- in that of the negative ones; b^2 for
  // w-square), else it is left out; their relevance ops count a bias they are given.
  m.def(
      "linear_gamma(Tensor x, Tensor weight, Tensor? bias=None, float gamma=0.25, float epsilon=1e-6, "
      "Tensor? weight_abs=None, bool gi=False) -> Tensor");
  m.def(
      "linear_gamma_relevance(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor? weight_abs, "
      "Tensor output, float gamma, float epsilon, bool gi) -> Tensor");
  m.def(
      "linear_alpha_beta(Tensor x, Tensor weight, Tensor? bias=None, float alpha=2.0, float beta=1.0, "
      "float epsilon=1e-6, Tensor? weight_pos=None, Tensor? weight_neg=None, bool gi=False, bool "
      "bias_in_denominator=False) -> Tensor");
  m.def(
      "linear_alpha_beta_relevance(Tensor grad, Tensor x, Tensor weight, Tensor? weight_pos, Tensor? weight_neg, "
      "Tensor output, float alpha, float beta, float epsilon, bool gi, Tensor? bias=None) -> Tensor");
  m.def(
      "linear_z_plus(Tensor x, Tensor weight, Tensor? bias=None, float epsilon=1e-6, Tensor? weight_pos=None, "
      "bool gi=False, bool bias_in_denominator=False) -> Tensor");
  m.def(
      "linear_z_plus_relevance(Tensor grad, Tensor x, Tensor weight, Tensor? weight_pos, Tensor output, "
      "float epsilon, bool gi, Tensor? bias=None) -> Tensor");
  m.def(
      "linear_z_box(Tensor x, Tensor weight, Tensor? bias, Tensor lower, Tensor upper, float epsilon=1e-6, "
      "Tensor? weight_abs=None, bool gi=False) -> Tensor");
  m.def(
      "linear_z_box_relevance(Tensor grad, Tensor x, Tensor weight, Tensor lower, Tensor upper, "
      "Tensor? weight_abs, Tensor output, float epsilon, bool gi) -> Tensor");
  m.def("linear_flat(Tensor x, Tensor weight, Tensor? bias=None, float epsilon=1e-6, bool gi=False) -> Tensor");
  m.def(
      "linear_flat_relevance(Tensor grad, Tensor x, Tensor weight, Tensor output, float epsilon, bool gi) "
      "-> Tensor");
  m.def(
      "linear_w_square(Tensor x, Tensor weight, Tensor? bias=None, float epsilon=1e-6, Tensor? weight_sq=None, "
      "bool gi=False, bool bias_in_denominator=False) -> Tensor");
  m.def(
      "linear_w_square_relevance(Tensor grad, Tensor x, Tensor weight, Tensor? weight_sq, Tensor output, "
      "float epsilon, bool gi, Tensor? bias=None) -> Tensor");
  m.def(
      "conv2d_gamma(Tensor x, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
      "int[2] dilation=1, int groups=1, float gamma=0.25, float epsilon=1e-6, Tensor? weight_abs=None, "
      "bool gi=False) -> Tensor");
  m.def(
      "conv2d_gamma_relevance(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor? weight_abs, "
      "Tensor output, int[2] stride, int[2] padding, int[2] dilation, int groups, float gamma, float epsilon, "
      "bool gi) -> Tensor");
  m.def(
      "conv2d_alpha_beta(Tensor x, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
      "int[2] dilation=1, int groups=1, float alpha=2.0, float beta=1.0, float epsilon=1e-6, "
      "Tensor? weight_pos=None, Tensor? weight_neg=None, bool gi=False, bool bias_in_denominator=False) -> Tensor");
  m.def(
      "conv2d_alpha_beta_relevance(Tensor grad, Tensor x, Tensor weight, Tensor? weight_pos, Tensor? weight_neg, "
      "Tensor output, int[2] stride, int[2] padding, int[2] dilation, int groups, float alpha, float beta, "
      "float epsilon, bool gi, Tensor? bias=None) -> Tensor");
  m.def(
      "conv2d_z_plus(Tensor x, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
      "int[2] dilation=1, int groups=1, float epsilon=1e-6, Tensor? weight_pos=None, bool gi=False, bool "
      "bias_in_denominator=False) -> Tensor");
  m.def(
      "conv2d_z_plus_relevance(Tensor grad, Tensor x, Tensor weight, Tensor? weight_pos, Tensor output, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, float epsilon, bool gi, Tensor? bias=None) -> "
      "Tensor");
  m.def(
      "conv2d_z_box(Tensor x, Tensor weight, Tensor? bias, Tensor lower, Tensor upper, int[2] stride=1, "
      "int[2] padding=0, int[2] dilation=1, int groups=1, float epsilon=1e-6, Tensor? weight_abs=None, "
      "bool gi=False) -> Tensor");
  m.def(
      "conv2d_z_box_relevance(Tensor grad, Tensor x, Tensor weight, Tensor lower, Tensor upper, "
      "Tensor? weight_abs, Tensor output, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "float epsilon, bool gi) -> Tensor");
  m.def(
      "conv2d_flat(Tensor x, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
      "int[2] dilation=1, int groups=1, float epsilon=1e-6, bool gi=False) -> Tensor");
  m.def(
      "conv2d_flat_relevance(Tensor grad, Tensor x, Tensor weight, Tensor output, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, float epsilon, bool gi) -> Tensor");
  m.def(
      "conv2d_w_square(Tensor x, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
      "int[2] dilation=1, int groups=1, float epsilon=1e-6, Tensor? weight_sq=None, bool gi=False, bool "
      "bias_in_denominator=False) -> Tensor");
  m.def(
      "conv2d_w_square_relevance(Tensor grad, Tensor x, Tensor weight, Tensor? weight_sq, Tensor output, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, float epsilon, bool gi, Tensor? bias=None) -> "
      "Tensor");
  // the same rules, and epsilon, on any convolution (at::convolution's arguments: 1 to 3 spatial
  // dimensions, transposed or not); each forward returns exactly at::convolution
#define CONV_ARGS "int[] stride, int[] padding, int[] dilation, bool transposed, int[] output_padding, int groups"
  m.def("convolution_epsilon(Tensor x, Tensor weight, Tensor? bias, " CONV_ARGS
        ", "
        "float epsilon=1e-6) -> Tensor");
  m.def("convolution_epsilon_relevance(Tensor grad, Tensor x, Tensor weight, Tensor output, " CONV_ARGS
        ", "
        "float epsilon) -> Tensor");
  m.def("convolution_gamma(Tensor x, Tensor weight, Tensor? bias, " CONV_ARGS
        ", "
        "float gamma=0.25, float epsilon=1e-6, Tensor? weight_abs=None, bool gi=False) -> Tensor");
  m.def(
      "convolution_gamma_relevance(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor? weight_abs, "
      "Tensor output, " CONV_ARGS ", float gamma, float epsilon, bool gi) -> Tensor");
  m.def("convolution_alpha_beta(Tensor x, Tensor weight, Tensor? bias, " CONV_ARGS
        ", "
        "float alpha=2.0, float beta=1.0, float epsilon=1e-6, Tensor? weight_pos=None, Tensor? weight_neg=None, "
        "bool gi=False, bool bias_in_denominator=False) -> Tensor");
  m.def(
      "convolution_alpha_beta_relevance(Tensor grad, Tensor x, Tensor weight, Tensor? weight_pos, "
      "Tensor? weight_neg, Tensor output, " CONV_ARGS
      ", float alpha, float beta, float epsilon, bool gi, Tensor? bias=None) -> Tensor");
  m.def("convolution_z_plus(Tensor x, Tensor weight, Tensor? bias, " CONV_ARGS
        ", "
        "float epsilon=1e-6, Tensor? weight_pos=None, bool gi=False, bool bias_in_denominator=False) -> Tensor");
  m.def(
      "convolution_z_plus_relevance(Tensor grad, Tensor x, Tensor weight, Tensor? weight_pos, Tensor output, "
      "" CONV_ARGS ", float epsilon, bool gi, Tensor? bias=None) -> Tensor");
  m.def("convolution_z_box(Tensor x, Tensor weight, Tensor? bias, Tensor lower, Tensor upper, " CONV_ARGS
        ", "
        "float epsilon=1e-6, Tensor? weight_abs=None, bool gi=False) -> Tensor");
  m.def(
      "convolution_z_box_relevance(Tensor grad, Tensor x, Tensor weight, Tensor lower, Tensor upper, "
      "Tensor? weight_abs, Tensor output, " CONV_ARGS ", float epsilon, bool gi) -> Tensor");
  m.def("convolution_flat(Tensor x, Tensor weight, Tensor? bias, " CONV_ARGS
        ", "
        "float epsilon=1e-6, bool gi=False) -> Tensor");
  m.def("convolution_flat_relevance(Tensor grad, Tensor x, Tensor weight, Tensor output, " CONV_ARGS
        ", "
        "float epsilon, bool gi) -> Tensor");
  m.def("convolution_w_square(Tensor x, Tensor weight, Tensor? bias, " CONV_ARGS
        ", "
        "float epsilon=1e-6, Tensor? weight_sq=None, bool gi=False, bool bias_in_denominator=False) -> Tensor");
  m.def(
      "convolution_w_square_relevance(Tensor grad, Tensor x, Tensor weight, Tensor? weight_sq, Tensor output, "
      "" CONV_ARGS ", float epsilon, bool gi, Tensor? bias=None) -> Tensor");
#undef CONV_ARGS
  // pooling, 1 to 3 spatial dimensions with torch's arguments (stride [] is the kernel size): average
  // pooling with the epsilon rule, max pooling winner-takes-all (each window's relevance to its maximum);
  // each forward returns exactly torch's pooling
  m.def(
      "avg_pool_epsilon(Tensor x, int[] kernel_size, int[] stride=[], int[] padding=[0], bool ceil_mode=False, "
      "bool count_include_pad=True, int? divisor_override=None, float epsilon=1e-6, bool gi=False) -> Tensor");
  m.def(
      "avg_pool_epsilon_relevance(Tensor grad, Tensor x, Tensor output, int[] kernel_size, int[] stride, "
      "int[] padding, bool ceil_mode, bool count_include_pad, int? divisor_override, float epsilon, bool gi) "
      "-> Tensor");
  m.def("adaptive_avg_pool_epsilon(Tensor x, int[] output_size, float epsilon=1e-6, bool gi=False) -> Tensor");
  m.def(
      "adaptive_avg_pool_epsilon_relevance(Tensor grad, Tensor x, Tensor output, int[] output_size, float epsilon, "
      "bool gi) -> Tensor");
  m.def(
      "max_pool_wta(Tensor x, int[] kernel_size, int[] stride=[], int[] padding=[0], int[] dilation=[1], "
      "bool ceil_mode=False, bool gi=False) -> Tensor");
  m.def(
      "max_pool_wta_relevance(Tensor grad, Tensor x, Tensor output, int[] kernel_size, int[] stride, int[] padding, "
      "int[] dilation, bool ceil_mode, bool gi) -> Tensor");
  // their per-element primitives: the two normalised relevances of the gamma rule (bias along
  // dimension bias_dim of the output) and of the alpha-beta rule (from the sums of the positive and
  // of the negative terms), and x * a + |x| * b (gi: a + sign(x) * b)
  m.def(
      "gamma_stab_div(Tensor grad, Tensor output, Tensor abs_product, Tensor? bias, int bias_dim, float gamma, "
      "float epsilon, bool gi) -> (Tensor, Tensor)");
  m.def(
      "alpha_beta_stab_div(Tensor grad, Tensor output, Tensor pos_sum, Tensor neg_sum, float alpha, float beta, "
      "float epsilon, bool gi) -> (Tensor, Tensor)");
  m.def("split_times_input(Tensor x, Tensor a, Tensor b, bool gi=False) -> Tensor");

  // gradient-times-input semantics (RULES.md section 2): autograd carries g = R / x
  // (gi_identity returns y and gi_grad_scale x itself, as views: no copies; gi_identity keeps the
  // factor y / stab(x) for its backward, or x and y themselves with keep_inputs)
  m.def("gi_identity(Tensor x, Tensor(a) y, float epsilon=1e-10, bool keep_inputs=False) -> Tensor(a)");
  m.def("gi_identity_factor(Tensor x, Tensor y, float epsilon) -> Tensor");
  m.def("gi_grad_scale(Tensor(a) x, Tensor scale) -> Tensor(a)");
  m.def("gi_scale_backward(Tensor grad, Tensor factor, ScalarType dtype) -> Tensor");
  m.def(
      "gi_layer_norm(Tensor x, int[] normalized_shape, Tensor? weight=None, Tensor? bias=None, float eps=1e-5) "
      "-> Tensor");
  m.def("gi_layer_norm_backward(Tensor grad, Tensor rstd, int[] normalized_shape, Tensor? weight) -> Tensor");
}

}  // namespace lrpcpp
