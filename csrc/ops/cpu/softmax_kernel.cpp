// CPU kernel of the softmax Deep Taylor rule: one row sum of R along `dim`,
// then R_x = x' (R - s * sum) element by element.
#include <torch/library.h>

#include "../impl.h"
#include "../rule_math.h"
#include "loops.h"

namespace lrpcpp {
namespace {

// Tensors viewed as [outer, len, inner] around the softmax dimension.
template <typename scalar_t>
void softmax_relevance_loop(const Tensor& grad, const Tensor& x, const Tensor& s, Tensor& out, int64_t outer,
                            int64_t len, int64_t inner, double temperature) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  if (inner == 1) {
    // rows are contiguous: vectorised row sum and update
    at::parallel_for(0, outer, cpu::row_grain(len), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* g = gp + row * len;
        const scalar_t* xr = xp + row * len;
        const scalar_t* sr = sp + row * len;
        scalar_t* o = op + row * len;
        const acc_t sum = cpu::lane_sum<acc_t>(len, [g](int64_t k) { return static_cast<acc_t>(g[k]); });
#pragma omp simd
        for (int64_t k = 0; k < len; ++k) {
          o[k] = static_cast<scalar_t>(
              math::softmax_relevance<acc_t>(math::softmax_input<acc_t>(xr[k], sr[k], inv_t), g[k], sr[k], sum));
        }
      }
    });
    return;
  }
  // one task = one (outer, inner) column of `len` elements, `inner` apart
  at::parallel_for(0, outer * inner, cpu::row_grain(len), [&](int64_t begin, int64_t end) {
    for (int64_t col = begin; col < end; ++col) {
      const int64_t base = (col / inner) * len * inner + col % inner;
      acc_t sum = 0;
      for (int64_t k = 0; k < len; ++k) sum += static_cast<acc_t>(gp[base + k * inner]);
      for (int64_t k = 0; k < len; ++k) {
        const int64_t i = base + k * inner;
        op[i] = static_cast<scalar_t>(
            math::softmax_relevance<acc_t>(math::softmax_input<acc_t>(xp[i], sp[i], inv_t), gp[i], sp[i], sum));
      }
    }
  });
}

Tensor softmax_relevance_cpu(const Tensor& grad, const Tensor& x, const Tensor& output, int64_t dim,
                             double temperature) {
  dim = impl::check_softmax_relevance(grad, x, output, dim, temperature);
  // the rule runs in the softmax's output dtype (x is cast when softmax's dtype= changed it)
  const auto dtype = output.scalar_type();
  const Tensor xs = x.to(dtype).contiguous(), g = grad.contiguous(), s = output.contiguous();
  Tensor out = at::empty(xs.sizes(), xs.options());
  if (out.numel() > 0) {
    const auto sizes = xs.sizes();
    int64_t outer = 1, inner = 1;
    for (int64_t i = 0; i < dim; ++i) outer *= sizes[i];
    for (int64_t i = dim + 1; i < xs.dim(); ++i) inner *= sizes[i];
    const int64_t len = xs.dim() == 0 ? 1 : sizes[dim];
    LRPCPP_DISPATCH_FLOATING(dtype, "lrpcpp_softmax_relevance_cpu",
                             [&] { softmax_relevance_loop<scalar_t>(g, xs, s, out, outer, len, inner, temperature); });
  }
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, CPU, m) {
  m.impl("softmax_relevance", &softmax_relevance_cpu);
}

}  // namespace lrpcpp
