// Meta (shape and dtype only) kernels of the linear family.
#include <torch/library.h>

#include "../impl.h"

namespace lrpcpp {
namespace {

Tensor stab_div_meta(const Tensor& relevance, const Tensor& z, double epsilon, double scale,
                     std::optional<at::ScalarType> dtype) {
  impl::check_stab_div(relevance, z, epsilon, dtype);
  return at::empty_symint(z.sym_sizes(), z.options().dtype(impl::stab_div_dtype(z, dtype)));
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Meta, m) {
  m.impl("stab_div", &stab_div_meta);
  m.impl("linear_epsilon", &impl::linear_epsilon);
  m.impl("linear_epsilon_relevance", &impl::linear_epsilon_relevance);
  m.impl("conv2d_epsilon", &impl::conv2d_epsilon);
  m.impl("conv2d_epsilon_relevance", &impl::conv2d_epsilon_relevance);
}

}  // namespace lrpcpp
