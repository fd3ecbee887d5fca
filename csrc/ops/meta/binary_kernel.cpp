// Meta kernels of the binary family.
#include <torch/library.h>

#include "../impl.h"

namespace lrpcpp {
namespace {

TensorPair add2_relevance_meta(const Tensor& grad, const Tensor& a, const Tensor& b, double epsilon,
                               std::array<bool, 2> output_mask) {
  impl::check_add2_relevance(grad, a, b, epsilon);
  return {output_mask[0] ? at::empty_like(a, at::MemoryFormat::Contiguous) : Tensor(),
          output_mask[1] ? at::empty_like(b, at::MemoryFormat::Contiguous) : Tensor()};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Meta, m) {
  m.impl("add2_relevance", &add2_relevance_meta);
}

}  // namespace lrpcpp
