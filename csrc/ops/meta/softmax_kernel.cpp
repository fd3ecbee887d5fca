// Meta kernels of the softmax rule.
#include <torch/library.h>

#include "../impl.h"

namespace lrpcpp {
namespace {

Tensor softmax_relevance_meta(const Tensor& grad, const Tensor& x, const Tensor& output, int64_t dim,
                              double temperature) {
  impl::check_softmax_relevance(grad, x, output, dim, temperature);
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Meta, m) {
  m.impl("softmax_relevance", &softmax_relevance_meta);
}

}  // namespace lrpcpp
