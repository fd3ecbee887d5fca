// CPU kernel of the linear family: the stab_div primitive.
#include <torch/library.h>

#include "../impl.h"
#include "../rule_math.h"
#include "loops.h"
#include "vector_clones.h"

namespace lrpcpp {
namespace {

template <typename scalar_t, typename out_t, typename acc_t>
LRPCPP_VECTOR_CLONES void stab_div_range(const scalar_t* rp, const scalar_t* zp, out_t* op, int64_t begin, int64_t end,
                                         acc_t e, acc_t s) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    op[i] = static_cast<out_t>(math::stab_div<acc_t>(rp[i], zp[i], e, s));
  }
}

template <typename scalar_t, typename out_t>
void stab_div_loop(const Tensor& r, const Tensor& z, Tensor& out, double epsilon, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* rp = r.const_data_ptr<scalar_t>();
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  out_t* op = out.mutable_data_ptr<out_t>();
  const acc_t e = static_cast<acc_t>(epsilon), s = static_cast<acc_t>(scale);
  at::parallel_for(0, out.numel(), cpu::kGrain,
                   [&](int64_t begin, int64_t end) { stab_div_range(rp, zp, op, begin, end, e, s); });
}

Tensor stab_div_cpu(const Tensor& relevance, const Tensor& z, double epsilon, double scale,
                    std::optional<at::ScalarType> dtype) {
  impl::check_stab_div(relevance, z, epsilon, scale, dtype);
  Tensor out = at::empty(z.sizes(), z.options().dtype(impl::stab_div_dtype(z, dtype)));
  if (out.numel() == 0) return out;
  const Tensor r = relevance.contiguous(), zc = z.contiguous();
  LRPCPP_DISPATCH_FLOATING(z.scalar_type(), "lrpcpp_stab_div_cpu", [&] {
    if (out.scalar_type() == z.scalar_type()) {
      stab_div_loop<scalar_t, scalar_t>(r, zc, out, epsilon, scale);
    } else {
      stab_div_loop<scalar_t, float>(r, zc, out, epsilon, scale);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, CPU, m) {
  m.impl("stab_div", &stab_div_cpu);
}

}  // namespace lrpcpp
