// torch.autocast for every lrpcpp op: a cast policy per op, as torch registers for its own ops.
//
// Each kernel casts the floating tensor arguments as its policy says (torch's own autocast wrappers,
// at::autocast::WrapFunction, with at::autocast::cached_cast), excludes the autocast key and
// redispatches, so the op's autograd, checks and kernels see the tensors it was given in one
// consistent set of dtypes and no ATen call inside the op is cast again. The policies:
//   lower_precision_fp  the matmul-like forwards (linear, conv2d, matmul, attention): inputs in the
//                       autocast dtype, as F.linear / F.conv2d / torch.matmul / F.scaled_dot_product_attention
//                       (the attention accumulates in float32); they save those for backward;
//   promoted            add2 and mul2: both operands in the dtype a + b and a * b give (torch's type
//                       promotion, which autocast leaves alone for those): a bfloat16 branch and a float32
//                       residual meet in float32 under any autocast dtype (torch's own "promote" policy
//                       would refuse a bfloat16 operand under float16 autocast);
//   fp32 (CUDA)         layer norms and normalize_identity, as F.layer_norm / F.normalize on CUDA;
//   fp32_set_opt_dtype  softmax on CUDA: output in float32 unless a dtype is given, as torch.softmax;
//   no cast             every other op: the relevance ops (the backward may run inside the autocast
//                       region; their products must stay in the dtype the rule chose), the
//                       element-wise forwards, and on CPU softmax and the norms (torch's CPU
//                       autocast keeps their input's dtype).
// Every op has a kernel at AutocastCPU and AutocastCUDA (tests check it).
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "../lrpcpp.h"

namespace lrpcpp {
namespace {

using at::autocast::CastPolicy;

// The autocast kernel of op `name` with `policy` on `device`.
#define LRPCPP_AUTOCAST(device, name, policy)                                                                      \
  m.impl(#name, &at::autocast::WrapFunction<CastPolicy::policy, c10::DeviceType::device, decltype(::lrpcpp::name), \
                                            decltype(::lrpcpp::name), &::lrpcpp::name>::type::call)

// No cast: the op as called, with autocast off inside it (one boxed kernel for all such ops).
template <c10::DeviceType device>
void without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  op.callBoxed(stack);
}

#define LRPCPP_NO_CAST(device, name) \
  m.impl(#name, torch::CppFunction::makeFromBoxedFunction<&without_autocast<c10::DeviceType::device>>())

// add2 / mul2 (a, b, ...): a and b in at::result_type(a, b) where both are floating, then as called.
template <c10::DeviceType device>
void promoted(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const auto first = stack->end() - static_cast<std::ptrdiff_t>(op.schema().arguments().size());
  auto& a = first[0];
  auto& b = first[1];
  if (a.isTensor() && b.isTensor() && a.toTensor().is_floating_point() && b.toTensor().is_floating_point()) {
    const auto common = at::result_type(a.toTensor(), b.toTensor());
    a = a.toTensor().to(common);
    b = b.toTensor().to(common);
  }
  op.callBoxed(stack);
}

#define LRPCPP_PROMOTED(device, name) \
  m.impl(#name, torch::CppFunction::makeFromBoxedFunction<&promoted<c10::DeviceType::device>>())

// The policies shared by both devices.
#define LRPCPP_AUTOCAST_COMMON(device)                                               \
  LRPCPP_AUTOCAST(device, linear_epsilon, lower_precision_fp);                       \
  LRPCPP_AUTOCAST(device, conv2d_epsilon, lower_precision_fp);                       \
  LRPCPP_AUTOCAST(device, matmul, lower_precision_fp);                               \
  LRPCPP_AUTOCAST(device, linear_gamma, lower_precision_fp);                         \
  LRPCPP_AUTOCAST(device, linear_alpha_beta, lower_precision_fp);                    \
  LRPCPP_AUTOCAST(device, linear_z_plus, lower_precision_fp);                        \
  LRPCPP_AUTOCAST(device, linear_z_box, lower_precision_fp);                         \
  LRPCPP_AUTOCAST(device, linear_flat, lower_precision_fp);                          \
  LRPCPP_AUTOCAST(device, linear_w_square, lower_precision_fp);                      \
  LRPCPP_AUTOCAST(device, conv2d_gamma, lower_precision_fp);                         \
  LRPCPP_AUTOCAST(device, conv2d_alpha_beta, lower_precision_fp);                    \
  LRPCPP_AUTOCAST(device, conv2d_z_plus, lower_precision_fp);                        \
  LRPCPP_AUTOCAST(device, conv2d_z_box, lower_precision_fp);                         \
  LRPCPP_AUTOCAST(device, conv2d_flat, lower_precision_fp);                          \
  LRPCPP_AUTOCAST(device, conv2d_w_square, lower_precision_fp);                      \
  LRPCPP_PROMOTED(device, add2);                                                     \
  LRPCPP_PROMOTED(device, mul2);                                                     \
  LRPCPP_AUTOCAST(device, scaled_dot_product_attention, lower_precision_fp);         \
  LRPCPP_AUTOCAST(device, scaled_dot_product_attention_forward, lower_precision_fp); \
  LRPCPP_NO_CAST(device, scaled_dot_product_attention_relevance);                    \
  LRPCPP_NO_CAST(device, stab_div);                                                  \
  LRPCPP_NO_CAST(device, linear_epsilon_relevance);                                  \
  LRPCPP_NO_CAST(device, conv2d_epsilon_relevance);                                  \
  LRPCPP_NO_CAST(device, add2_relevance);                                            \
  LRPCPP_NO_CAST(device, mul2_relevance);                                            \
  LRPCPP_NO_CAST(device, matmul_relevance);                                          \
  LRPCPP_NO_CAST(device, softmax_relevance);                                         \
  LRPCPP_NO_CAST(device, rms_norm_identity);                                         \
  LRPCPP_NO_CAST(device, layer_norm_relevance);                                      \
  LRPCPP_NO_CAST(device, mean);                                                      \
  LRPCPP_NO_CAST(device, mean_relevance);                                            \
  LRPCPP_NO_CAST(device, silu_identity);                                             \
  LRPCPP_NO_CAST(device, gelu_identity);                                             \
  LRPCPP_NO_CAST(device, tanh_identity);                                             \
  LRPCPP_NO_CAST(device, relu_identity);                                             \
  LRPCPP_NO_CAST(device, sigmoid_identity);                                          \
  LRPCPP_NO_CAST(device, identity_relevance);                                        \
  LRPCPP_NO_CAST(device, stop_relevance);                                            \
  LRPCPP_NO_CAST(device, linear_gamma_relevance);                                    \
  LRPCPP_NO_CAST(device, linear_alpha_beta_relevance);                               \
  LRPCPP_NO_CAST(device, linear_z_plus_relevance);                                   \
  LRPCPP_NO_CAST(device, linear_z_box_relevance);                                    \
  LRPCPP_NO_CAST(device, linear_flat_relevance);                                     \
  LRPCPP_NO_CAST(device, linear_w_square_relevance);                                 \
  LRPCPP_NO_CAST(device, conv2d_gamma_relevance);                                    \
  LRPCPP_NO_CAST(device, conv2d_alpha_beta_relevance);                               \
  LRPCPP_NO_CAST(device, conv2d_z_plus_relevance);                                   \
  LRPCPP_NO_CAST(device, conv2d_z_box_relevance);                                    \
  LRPCPP_NO_CAST(device, conv2d_flat_relevance);                                     \
  LRPCPP_NO_CAST(device, conv2d_w_square_relevance);                                 \
  LRPCPP_NO_CAST(device, gamma_stab_div);                                            \
  LRPCPP_NO_CAST(device, alpha_beta_stab_div);                                       \
  LRPCPP_NO_CAST(device, split_times_input);                                         \
  LRPCPP_NO_CAST(device, gi_identity);                                               \
  LRPCPP_NO_CAST(device, gi_identity_factor);                                        \
  LRPCPP_NO_CAST(device, gi_grad_scale);                                             \
  LRPCPP_NO_CAST(device, gi_scale_backward);                                         \
  LRPCPP_NO_CAST(device, gi_layer_norm_backward)

// The convolution ops (any dimension, transposed or not), as conv2d's; the pooling ops keep their input's
// dtype, as torch's autocast leaves pooling alone.
#define LRPCPP_AUTOCAST_CONVOLUTION(device)                            \
  LRPCPP_AUTOCAST(device, convolution_epsilon, lower_precision_fp);    \
  LRPCPP_AUTOCAST(device, convolution_gamma, lower_precision_fp);      \
  LRPCPP_AUTOCAST(device, convolution_alpha_beta, lower_precision_fp); \
  LRPCPP_AUTOCAST(device, convolution_z_plus, lower_precision_fp);     \
  LRPCPP_AUTOCAST(device, convolution_z_box, lower_precision_fp);      \
  LRPCPP_AUTOCAST(device, convolution_flat, lower_precision_fp);       \
  LRPCPP_AUTOCAST(device, convolution_w_square, lower_precision_fp);   \
  LRPCPP_NO_CAST(device, convolution_epsilon_relevance);               \
  LRPCPP_NO_CAST(device, convolution_gamma_relevance);                 \
  LRPCPP_NO_CAST(device, convolution_alpha_beta_relevance);            \
  LRPCPP_NO_CAST(device, convolution_z_plus_relevance);                \
  LRPCPP_NO_CAST(device, convolution_z_box_relevance);                 \
  LRPCPP_NO_CAST(device, convolution_flat_relevance);                  \
  LRPCPP_NO_CAST(device, convolution_w_square_relevance);              \
  LRPCPP_NO_CAST(device, avg_pool_epsilon);                            \
  LRPCPP_NO_CAST(device, avg_pool_epsilon_relevance);                  \
  LRPCPP_NO_CAST(device, adaptive_avg_pool_epsilon);                   \
  LRPCPP_NO_CAST(device, adaptive_avg_pool_epsilon_relevance);         \
  LRPCPP_NO_CAST(device, max_pool_wta);                                \
  LRPCPP_NO_CAST(device, max_pool_wta_relevance)

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, AutocastCPU, m) {
  LRPCPP_AUTOCAST_COMMON(CPU);
  LRPCPP_AUTOCAST_CONVOLUTION(CPU);
  LRPCPP_NO_CAST(CPU, softmax);
  LRPCPP_NO_CAST(CPU, layer_norm);
  LRPCPP_NO_CAST(CPU, layer_norm_identity);
  LRPCPP_NO_CAST(CPU, gi_layer_norm);
  LRPCPP_NO_CAST(CPU, normalize_identity);
}

TORCH_LIBRARY_IMPL(lrpcpp, AutocastCUDA, m) {
  LRPCPP_AUTOCAST_COMMON(CUDA);
  LRPCPP_AUTOCAST_CONVOLUTION(CUDA);
  LRPCPP_AUTOCAST(CUDA, softmax, fp32_set_opt_dtype);
  LRPCPP_AUTOCAST(CUDA, layer_norm, fp32);
  LRPCPP_AUTOCAST(CUDA, layer_norm_identity, fp32);
  LRPCPP_AUTOCAST(CUDA, gi_layer_norm, fp32);
  LRPCPP_AUTOCAST(CUDA, normalize_identity, fp32);
}

}  // namespace lrpcpp
