// Meta kernels of the gradient-times-input ops.
#include <torch/library.h>

#include "../impl.h"

namespace lrpcpp {
namespace {

Tensor gi_identity_factor_meta(const Tensor& x, const Tensor& y, double epsilon) {
  impl::check_gi_identity(x, y, epsilon, "lrpcpp.gi_identity_factor");
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}

Tensor gi_scale_backward_meta(const Tensor& grad, const Tensor& factor, at::ScalarType dtype) {
  impl::check_gi_scale_backward(grad, factor, dtype);
  return impl::gi_scale_backward_empty(grad, grad.options().dtype(dtype));
}

Tensor gi_layer_norm_backward_meta(const Tensor& grad, const Tensor& rstd, at::IntArrayRef normalized_shape,
                                   const OptTensor& weight) {
  impl::check_gi_layer_norm_backward(grad, rstd, normalized_shape, weight);
  return at::empty_like(grad, at::MemoryFormat::Contiguous);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Meta, m) {
  m.impl("gi_identity_factor", &gi_identity_factor_meta);
  m.impl("gi_scale_backward", &gi_scale_backward_meta);
  m.impl("gi_layer_norm_backward", &gi_layer_norm_backward_meta);
}

}  // namespace lrpcpp
