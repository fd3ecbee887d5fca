// CUDA kernel of the softmax Deep Taylor rule: one block per row (the softmax
// dimension moved last), a block-wide sum of R, then R_x = x' (R - s * sum).
#include <torch/library.h>

#include "../impl.h"
#include "../rule_math.h"
#include "cuda_utils.cuh"

namespace lrpcpp {
namespace {

template <typename scalar_t>
__launch_bounds__(cuda::kMaxRowThreads) __global__
    void softmax_relevance_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                  const scalar_t* __restrict__ s, scalar_t* __restrict__ out, int64_t len,
                                  at::opmath_type<scalar_t> inv_temperature) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * len;
  acc_t partial = 0;
  for (int64_t k = threadIdx.x; k < len; k += blockDim.x) partial += static_cast<acc_t>(grad[base + k]);
  const acc_t sum = cuda::block_sum(partial, scratch);
  for (int64_t k = threadIdx.x; k < len; k += blockDim.x) {
    const int64_t i = base + k;
    out[i] = static_cast<scalar_t>(
        math::softmax_relevance<acc_t>(math::softmax_input<acc_t>(x[i], s[i], inv_temperature), grad[i], s[i], sum));
  }
}

Tensor softmax_relevance_cuda(const Tensor& grad, const Tensor& x, const Tensor& output, int64_t dim,
                              double temperature) {
  dim = impl::check_softmax_relevance(grad, x, output, dim, temperature);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = output.scalar_type();
  const bool last = x.dim() == 0 || dim == x.dim() - 1;
  // rows along `dim`, contiguous: the softmax dimension is moved last when it is not
  auto rows = [&](const Tensor& t) { return (last ? t : t.movedim(dim, -1)).contiguous(); };
  const Tensor xs = rows(x.to(dtype)), g = rows(grad), s = rows(output);
  Tensor out = at::empty(xs.sizes(), xs.options());
  if (out.numel() > 0) {
    const int64_t len = xs.dim() == 0 ? 1 : xs.size(-1);
    const int64_t nrows = out.numel() / len;
    TORCH_CHECK(nrows <= std::numeric_limits<int32_t>::max(), "lrpcpp.softmax_relevance: too many rows (", nrows,
                ") for one CUDA launch");
    LRPCPP_DISPATCH_FLOATING(dtype, "lrpcpp_softmax_relevance_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      softmax_relevance_kernel<scalar_t><<<static_cast<unsigned>(nrows), cuda::row_threads(len), 0, cuda::stream()>>>(
          g.const_data_ptr<scalar_t>(), xs.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), len, static_cast<acc_t>(1.0 / temperature));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return (last ? out : out.movedim(-1, dim).contiguous()).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, CUDA, m) {
  m.impl("softmax_relevance", &softmax_relevance_cuda);
}

}  // namespace lrpcpp
