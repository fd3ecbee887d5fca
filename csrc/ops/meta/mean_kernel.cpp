// Meta kernels of the mean rule.
#include <torch/library.h>

#include "../impl.h"

namespace lrpcpp {
namespace {

Tensor mean_relevance_meta(const Tensor& grad, const Tensor& x, at::OptionalIntArrayRef dim, bool keepdim,
                           double epsilon) {
  impl::check_mean_relevance(grad, x, dim, keepdim, epsilon);
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Meta, m) {
  m.impl("mean", &impl::mean);
  m.impl("mean_relevance", &mean_relevance_meta);
}

}  // namespace lrpcpp
