// Meta (shape and dtype only) kernels of the linear family.
#include <torch/library.h>

#include "../impl.h"

namespace lrpcpp {
namespace {

Tensor stab_div_meta(const Tensor& relevance, const Tensor& z, double epsilon, double scale,
                     std::optional<at::ScalarType> dtype) {
  impl::check_stab_div(relevance, z, epsilon, scale, dtype);
  return at::empty_symint(z.sym_sizes(), z.options().dtype(impl::stab_div_dtype(z, dtype)));
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Meta, m) {
  m.impl("stab_div", &stab_div_meta);
}

}  // namespace lrpcpp
