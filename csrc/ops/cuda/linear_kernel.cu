// CUDA kernel of the linear family: the stab_div primitive (one vectorised
// pass).
#include <torch/library.h>

#include "../impl.h"
#include "../rule_math.h"
#include "cuda_utils.cuh"

namespace lrpcpp {
namespace {

template <typename scalar_t, typename out_t>
struct StabDivOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* r;
  const scalar_t* z;
  out_t* out;
  acc_t epsilon, scale;

  template <int N>
  __device__ void apply(int64_t i) const {
    const auto rv = cuda::load<N>(r + i);
    const auto zv = cuda::load<N>(z + i);
    cuda::Pack<out_t, N> o;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      o.v[k] = static_cast<out_t>(math::stab_div<acc_t>(rv.v[k], zv.v[k], epsilon, scale));
    }
    cuda::store<N>(out + i, o);
  }
};

Tensor stab_div_cuda(const Tensor& relevance, const Tensor& z, double epsilon, double scale,
                     std::optional<at::ScalarType> dtype) {
  impl::check_stab_div(relevance, z, epsilon, scale, dtype);
  const c10::cuda::CUDAGuard guard(z.device());
  Tensor out = at::empty(z.sizes(), z.options().dtype(impl::stab_div_dtype(z, dtype)));
  if (out.numel() == 0) return out;
  const Tensor r = relevance.contiguous(), zc = z.contiguous();
  LRPCPP_DISPATCH_FLOATING(z.scalar_type(), "lrpcpp_stab_div_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto* out_ptr) {
      using out_t = std::remove_pointer_t<decltype(out_ptr)>;
      constexpr int N = cuda::pack_size<scalar_t>() < cuda::pack_size<out_t>() ? cuda::pack_size<scalar_t>()
                                                                               : cuda::pack_size<out_t>();
      const StabDivOp<scalar_t, out_t> op{r.const_data_ptr<scalar_t>(), zc.const_data_ptr<scalar_t>(), out_ptr,
                                          static_cast<acc_t>(epsilon), static_cast<acc_t>(scale)};
      const bool vec = cuda::aligned(op.r, N * sizeof(scalar_t)) && cuda::aligned(op.z, N * sizeof(scalar_t)) &&
                       cuda::aligned(out_ptr, N * sizeof(out_t));
      cuda::launch_elementwise<N>(out.numel(), vec, op);
    };
    if (out.scalar_type() == z.scalar_type()) {
      run(out.mutable_data_ptr<scalar_t>());
    } else {
      run(out.mutable_data_ptr<float>());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, CUDA, m) {
  m.impl("stab_div", &stab_div_cuda);
}

}  // namespace lrpcpp
