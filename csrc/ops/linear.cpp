// epsilon-LRP through affine maps: linear layers and 2-D convolutions.
//   forward:   y = x W^T + b   (torch's own kernel)
//   relevance: Rn = R / stab(y);  R_x = x * (Rn W)      (RULES.md section 1, Eq. 8)
// The per-element step is the stab_div primitive (CPU/CUDA/Meta kernels); the
// product with W goes through ATen (matmul / convolution_backward).
#include "impl.h"
#include "output_shape.h"

namespace lrpcpp {

Tensor stab_div(const Tensor& relevance, const Tensor& z, double epsilon, double scale,
                std::optional<at::ScalarType> dtype) {
  LRPCPP_DISPATCH(stab_div);
  return op.call(relevance, z, epsilon, scale, dtype);
}

Tensor linear_epsilon(const Tensor& x, const Tensor& weight, const OptTensor& bias, double epsilon) {
  LRPCPP_DISPATCH(linear_epsilon);
  return op.call(x, weight, bias, epsilon);
}

Tensor linear_epsilon_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& output,
                                double epsilon) {
  LRPCPP_DISPATCH(linear_epsilon_relevance);
  return op.call(grad, x, weight, output, epsilon);
}

Tensor conv2d_epsilon(const Tensor& x, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double epsilon) {
  LRPCPP_DISPATCH(conv2d_epsilon);
  return op.call(x, weight, bias, stride, padding, dilation, groups, epsilon);
}

Tensor conv2d_epsilon_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& output,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, double epsilon) {
  LRPCPP_DISPATCH(conv2d_epsilon_relevance);
  return op.call(grad, x, weight, output, stride, padding, dilation, groups, epsilon);
}

namespace impl {
using namespace detail;

void check_bias(const OptTensor& bias, const Tensor& x, const Tensor& weight, const char* op) {
  if (!bias.has_value() || !bias->defined()) return;
  check_like(*bias, x, op, "bias", "x");
  TORCH_CHECK(bias->dim() == 1, op, ": expected bias to be 1-D [out_features], got shape ", shape_str(*bias));
  TORCH_SYM_CHECK(bias->sym_size(0).sym_eq(weight.sym_size(0)), op, ": expected bias to have ", weight.sym_size(0),
                  " elements (weight.shape[0]), got ", bias->sym_size(0));
}

void check_linear(const Tensor& x, const Tensor& weight, const OptTensor& bias, double epsilon, const char* op) {
  check_floating(x, op, "x");
  check_like(weight, x, op, "weight", "x");
  TORCH_CHECK(weight.dim() == 2, op, ": expected weight to be 2-D [out_features, in_features], got shape ",
              shape_str(weight));
  TORCH_CHECK(x.dim() >= 1, op, ": expected x to have at least 1 dimension [..., in_features], got a 0-D tensor");
  TORCH_SYM_CHECK(x.sym_size(-1).sym_eq(weight.sym_size(1)), op, ": expected the last dimension of x ", shape_str(x),
                  " to equal in_features = weight.shape[1] = ", weight.sym_size(1));
  check_bias(bias, x, weight, op);
  check_epsilon(epsilon, op);
}

void check_conv2d(const Tensor& x, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double epsilon, const char* op) {
  check_floating(x, op, "x");
  check_like(weight, x, op, "weight", "x");
  TORCH_CHECK(x.dim() == 4, op, ": expected x to be 4-D [batch, channels, height, width], got shape ", shape_str(x));
  TORCH_CHECK(weight.dim() == 4, op,
              ": expected weight to be 4-D [out_channels, in_channels / groups, kH, kW], got shape ",
              shape_str(weight));
  TORCH_CHECK(groups >= 1, op, ": expected groups >= 1, got ", groups);
  TORCH_SYM_CHECK((weight.sym_size(0) % groups).sym_eq(0), op,
                  ": expected out_channels = weight.shape[0] = ", weight.sym_size(0),
                  " to be divisible by groups = ", groups);
  TORCH_SYM_CHECK(x.sym_size(1).sym_eq(weight.sym_size(1) * groups), op, ": expected x to have ",
                  weight.sym_size(1) * groups, " channels (weight.shape[1] * groups), got ", x.sym_size(1));
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": expected stride, padding and dilation to have 2 values each (or 1), got stride=", stride,
              ", padding=", padding, ", dilation=", dilation);
  for (size_t i = 0; i < 2; ++i) {
    TORCH_CHECK(stride[i] >= 1, op, ": expected stride >= 1, got ", stride);
    TORCH_CHECK(padding[i] >= 0, op, ": expected padding >= 0, got ", padding);
    TORCH_CHECK(dilation[i] >= 1, op, ": expected dilation >= 1, got ", dilation);
  }
  // the (dilated) kernel must fit into the padded input: at least one output pixel per dimension
  for (int64_t i = 0; i < 2; ++i) {
    const auto padded = x.sym_size(2 + i) + 2 * padding[i];
    const auto extent = (weight.sym_size(2 + i) - 1) * dilation[i] + 1;
    TORCH_SYM_CHECK(extent.sym_le(padded), op, ": expected the kernel ", shape_str(weight), " (dilated by ", dilation,
                    ") to fit into the padded input ", shape_str(x), " + padding ", padding, ", but kernel extent ",
                    extent, " > padded input size ", padded, " at dimension ", 2 + i);
  }
  check_bias(bias, x, weight, op);
  check_epsilon(epsilon, op);
}

// grad and output of a relevance op: same shape, dtype and device.
void check_grad_output(const Tensor& grad, const Tensor& output, const Tensor& x, const char* op) {
  check_like(output, x, op, "output", "x");
  check_like(grad, output, op, "grad", "output");
  check_same_shape(grad, output, op, "grad", "output");
}

at::ScalarType stab_div_dtype(const Tensor& z, std::optional<at::ScalarType> dtype) {
  return dtype.value_or(z.scalar_type());
}

void check_stab_div(const Tensor& relevance, const Tensor& z, double epsilon, double scale,
                    std::optional<at::ScalarType> dtype) {
  const char* op = "lrpcpp.stab_div";
  check_floating(z, op, "z");
  check_like(relevance, z, op, "relevance", "z");
  check_same_shape(relevance, z, op, "relevance", "z");
  check_epsilon(epsilon, op);
  check_finite(scale, op, "scale");
  auto out = stab_div_dtype(z, dtype);
  TORCH_CHECK(out == z.scalar_type() || out == at::kFloat, op, ": expected dtype to be z's dtype (", z.scalar_type(),
              ") or float32, got ", out);
}

Tensor linear_epsilon(const Tensor& x, const Tensor& weight, const OptTensor& bias, double epsilon) {
  check_linear(x, weight, bias, epsilon, "lrpcpp.linear_epsilon");
  return at::linear(x, weight, bias);
}

Tensor linear_epsilon_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& output,
                                double epsilon) {
  const char* op = "lrpcpp.linear_epsilon_relevance";
  check_linear(x, weight, std::nullopt, epsilon, op);
  check_grad_output(grad, output, x, op);
  check_linear_output_shape(output, x, weight, op);
  const auto cd = compute_dtype(x.scalar_type());
  Tensor rn = lrpcpp::stab_div(grad, output, epsilon, 1.0, cd);
  return times_input(at::matmul(rn, weight.to(cd)), x);
}

Tensor conv2d_epsilon(const Tensor& x, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double epsilon) {
  check_conv2d(x, weight, bias, stride, padding, dilation, groups, epsilon, "lrpcpp.conv2d_epsilon");
  return at::conv2d(x, weight, bias, stride, padding, dilation, groups);
}

Tensor conv2d_epsilon_relevance(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& output,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, double epsilon) {
  const char* op = "lrpcpp.conv2d_epsilon_relevance";
  check_conv2d(x, weight, std::nullopt, stride, padding, dilation, groups, epsilon, op);
  check_grad_output(grad, output, x, op);
  check_conv2d_output_shape(output, x, weight, stride, padding, dilation, op);
  const auto cd = compute_dtype(x.scalar_type());
  Tensor rn = lrpcpp::stab_div(grad, output, epsilon, 1.0, cd);
  const std::array<int64_t, 2> no_output_padding{0, 0};
  auto grads = at::convolution_backward(rn, x.to(cd), weight.to(cd), std::nullopt, stride, padding, dilation,
                                        /*transposed=*/false, no_output_padding, groups, {true, false, false});
  return times_input(std::get<0>(grads), x);
}

}  // namespace impl

// The compositions of dispatcher calls, registered once for every backend (CPU, CUDA, Meta).
TORCH_LIBRARY_IMPL(lrpcpp, CompositeExplicitAutograd, m) {
  m.impl("linear_epsilon", &impl::linear_epsilon);
  m.impl("linear_epsilon_relevance", &impl::linear_epsilon_relevance);
  m.impl("conv2d_epsilon", &impl::conv2d_epsilon);
  m.impl("conv2d_epsilon_relevance", &impl::conv2d_epsilon_relevance);
}

}  // namespace lrpcpp
