// CPU kernel of the mean rule: the sums over `dim` (in fp32/fp64) through
// ATen, then R_x = x R / stab(sum) in one broadcasting pass.
#include <torch/library.h>

#include "../impl.h"
#include "../rule_math.h"
#include "loops.h"

namespace lrpcpp {
namespace {

Tensor mean_relevance_cpu(const Tensor& grad, const Tensor& x, at::OptionalIntArrayRef dim, bool keepdim,
                          double epsilon) {
  impl::check_mean_relevance(grad, x, dim, keepdim, epsilon);
  Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const auto dims = impl::mean_reduce_dims(x, dim, "lrpcpp.mean_relevance");
  const auto acc = at::toOpMathType(x.scalar_type());
  const Tensor sums = at::sum(x, dims, /*keepdim=*/true, acc);
  Tensor r = grad;
  if (!keepdim) {
    for (int64_t d : dims) r = r.unsqueeze(d);  // ascending, so each index is already final
  }
  auto iter = at::TensorIteratorConfig()
                  .add_output(out)
                  .add_const_input(x)
                  .add_const_input(r)
                  .add_const_input(sums)
                  .check_all_same_dtype(false)
                  .build();
  LRPCPP_DISPATCH_FLOATING(x.scalar_type(), "lrpcpp_mean_relevance_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t e = static_cast<acc_t>(epsilon);
    iter.for_each([&](char** data, const int64_t* strides, int64_t n) {
      for (int64_t i = 0; i < n; ++i) {
        cpu::elem<scalar_t>(data, strides, 0, i) = static_cast<scalar_t>(
            math::mean_share<acc_t>(cpu::elem<scalar_t>(data, strides, 1, i), cpu::elem<scalar_t>(data, strides, 2, i),
                                    cpu::elem<acc_t>(data, strides, 3, i), e));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, CPU, m) {
  m.impl("mean", &impl::mean);
  m.impl("mean_relevance", &mean_relevance_cpu);
}

}  // namespace lrpcpp
