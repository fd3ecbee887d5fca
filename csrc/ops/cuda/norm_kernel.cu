// CUDA kernel of the layer-norm epsilon rule: one block per row of the
// normalised dimensions; block sums give mean, variance (sigma constant) and
// mean(h), with h = (w / sigma) R / stab(y) recomputed rather than stored.
#include <torch/library.h>

#include "../impl.h"
#include "../rule_math.h"
#include "cuda_utils.cuh"

namespace lrpcpp {
namespace {

template <typename scalar_t>
__launch_bounds__(cuda::kMaxRowThreads) __global__
    void layer_norm_relevance_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                     const at::opmath_type<scalar_t>* __restrict__ w,
                                     const at::opmath_type<scalar_t>* __restrict__ b, scalar_t* __restrict__ out,
                                     int64_t len, at::opmath_type<scalar_t> eps, at::opmath_type<scalar_t> epsilon) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * len;
  const scalar_t* xr = x + base;
  const scalar_t* gr = grad + base;
  const auto stats = cuda::block_row_stats<acc_t>(xr, len, eps, scratch);
  const acc_t mean = stats.mean, rstd = stats.rstd;
  auto h = [&](int64_t k) {
    const acc_t y = (static_cast<acc_t>(xr[k]) - mean) * rstd * w[k] + b[k];
    return math::layer_norm_h<acc_t>(gr[k], y, w[k] * rstd, epsilon);
  };
  acc_t partial = 0;
  for (int64_t k = threadIdx.x; k < len; k += blockDim.x) partial += h(k);
  const acc_t h_mean = cuda::block_sum(partial, scratch) / len;
  for (int64_t k = threadIdx.x; k < len; k += blockDim.x) {
    out[base + k] = static_cast<scalar_t>(math::layer_norm_relevance<acc_t>(xr[k], h(k), h_mean));
  }
}

Tensor layer_norm_relevance_cuda(const Tensor& grad, const Tensor& x, at::IntArrayRef normalized_shape,
                                 const OptTensor& weight, const OptTensor& bias, double eps, double epsilon) {
  impl::check_layer_norm_relevance(grad, x, normalized_shape, weight, bias, eps, epsilon);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.contiguous(), g = grad.contiguous();
  Tensor out = at::empty(xc.sizes(), xc.options());
  if (out.numel() == 0) return out;
  const int64_t len = c10::multiply_integers(normalized_shape);
  Tensor w, b;
  std::tie(w, b) = impl::layer_norm_affine_rows(x, normalized_shape, weight, bias);
  const int64_t rows = xc.numel() / len;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "lrpcpp.layer_norm_relevance: too many rows (", rows,
              ") for one CUDA launch");
  LRPCPP_DISPATCH_FLOATING(x.scalar_type(), "lrpcpp_layer_norm_relevance_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    layer_norm_relevance_kernel<scalar_t><<<static_cast<unsigned>(rows), cuda::row_threads(len), 0, cuda::stream()>>>(
        g.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
        b.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), len, static_cast<acc_t>(eps),
        static_cast<acc_t>(epsilon));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, CUDA, m) {
  m.impl("layer_norm_relevance", &layer_norm_relevance_cuda);
}

}  // namespace lrpcpp
