// Meta kernels of the normalisation layers.
#include <torch/library.h>

#include "../impl.h"

namespace lrpcpp {
namespace {

Tensor layer_norm_relevance_meta(const Tensor& grad, const Tensor& x, at::IntArrayRef normalized_shape,
                                 const OptTensor& weight, const OptTensor& bias, double eps, double epsilon) {
  impl::check_layer_norm_relevance(grad, x, normalized_shape, weight, bias, eps, epsilon);
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Meta, m) {
  m.impl("layer_norm_relevance", &layer_norm_relevance_meta);
}

}  // namespace lrpcpp
