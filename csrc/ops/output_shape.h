// The output a relevance op of an affine map is given must have the shape its forward gives:
// x.shape[:-1] + [out_features] for a linear layer, [batch, out_channels, height, width] for a
// convolution (checked before any ATen product would fail with a message that names no op).
#pragma once

#include <vector>

#include "common.h"

namespace lrpcpp::impl {

inline void check_output_shape(const at::Tensor& output, c10::SymIntArrayRef expected, const char* op) {
  TORCH_SYM_CHECK(c10::sym_equals(output.sym_sizes(), expected), op, ": expected output to have the shape ", expected,
                  " of the forward, got ", detail::shape_str(output));
}

inline void check_linear_output_shape(const at::Tensor& output, const at::Tensor& x, const at::Tensor& weight,
                                      const char* op) {
  std::vector<c10::SymInt> expected(x.sym_sizes().begin(), x.sym_sizes().end() - 1);
  expected.push_back(weight.sym_size(0));
  check_output_shape(output, expected, op);
}

// x, weight, stride, padding and dilation already checked (check_conv2d): the kernel fits
inline void check_conv2d_output_shape(const at::Tensor& output, const at::Tensor& x, const at::Tensor& weight,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      const char* op) {
  std::vector<c10::SymInt> expected{x.sym_size(0), weight.sym_size(0)};
  for (size_t i = 0; i < 2; ++i) {
    const auto extent = (weight.sym_size(2 + i) - 1) * dilation[i] + 1;
    expected.push_back((x.sym_size(2 + i) + 2 * padding[i] - extent) / stride[i] + 1);
  }
  check_output_shape(output, expected, op);
}

// [batch, out_channels, *spatial] of at::convolution (transposed or not); a spatial size may come out
// < 1 where the kernel does not fit, which the caller checks
inline std::vector<c10::SymInt> convolution_output_sizes(const at::Tensor& x, const at::Tensor& weight,
                                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                                         at::IntArrayRef dilation, bool transposed,
                                                         at::IntArrayRef output_padding, int64_t groups) {
  std::vector<c10::SymInt> sizes{x.sym_size(0), transposed ? weight.sym_size(1) * groups : weight.sym_size(0)};
  for (size_t i = 0; i < stride.size(); ++i) {
    const auto extent = (weight.sym_size(2 + i) - 1) * dilation[i] + 1;
    const auto& in = x.sym_size(2 + i);
    sizes.push_back(transposed ? (in - 1) * stride[i] - 2 * padding[i] + extent + output_padding[i]
                               : (in + 2 * padding[i] - extent) / stride[i] + 1);
  }
  return sizes;
}

}  // namespace lrpcpp::impl
