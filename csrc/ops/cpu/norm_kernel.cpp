// CPU kernel of the layer-norm epsilon rule, one row of the normalised
// dimensions at a time: mean and sigma (recomputed from x, sigma constant),
// h = (w / sigma) R / stab(y), then R_x = x (h - mean(h)).
#include <torch/library.h>

#include "../impl.h"
#include "../rule_math.h"
#include "loops.h"

#include <vector>

namespace lrpcpp {
namespace {

template <typename scalar_t>
void layer_norm_relevance_loop(const Tensor& grad, const Tensor& x, const Tensor& w, const Tensor& b, Tensor& out,
                               int64_t rows, int64_t len, double eps, double epsilon) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* wp = w.const_data_ptr<acc_t>();
  const acc_t* bp = b.const_data_ptr<acc_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const acc_t e = static_cast<acc_t>(epsilon);
  at::parallel_for(0, rows, cpu::row_grain(len), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> h(len);
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* xr = xp + row * len;
      const scalar_t* gr = gp + row * len;
      const auto stats = cpu::row_stats<acc_t>(xr, len, eps);
      const acc_t mean = stats.mean, rstd = stats.rstd;
      acc_t* hp = h.data();
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) {
        const acc_t y = (static_cast<acc_t>(xr[k]) - mean) * rstd * wp[k] + bp[k];
        hp[k] = math::layer_norm_h<acc_t>(gr[k], y, wp[k] * rstd, e);
      }
      const acc_t h_mean = cpu::lane_sum<acc_t>(len, [hp](int64_t k) { return hp[k]; }) / len;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) {
        op[row * len + k] = static_cast<scalar_t>(math::layer_norm_relevance<acc_t>(xr[k], hp[k], h_mean));
      }
    }
  });
}

Tensor layer_norm_relevance_cpu(const Tensor& grad, const Tensor& x, at::IntArrayRef normalized_shape,
                                const OptTensor& weight, const OptTensor& bias, double eps, double epsilon) {
  impl::check_layer_norm_relevance(grad, x, normalized_shape, weight, bias, eps, epsilon);
  const Tensor xc = x.contiguous(), g = grad.contiguous();
  Tensor out = at::empty(xc.sizes(), xc.options());
  if (out.numel() == 0) return out;
  const int64_t len = c10::multiply_integers(normalized_shape);
  Tensor w, b;
  std::tie(w, b) = impl::layer_norm_affine_rows(x, normalized_shape, weight, bias);
  LRPCPP_DISPATCH_FLOATING(x.scalar_type(), "lrpcpp_layer_norm_relevance_cpu", [&] {
    layer_norm_relevance_loop<scalar_t>(g, xc, w, b, out, xc.numel() / len, len, eps, epsilon);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, CPU, m) {
  m.impl("layer_norm_relevance", &layer_norm_relevance_cpu);
}

}  // namespace lrpcpp
