// CUDA kernels of the binary family: add2's relevance in one vectorised pass
// over R, a and b (broadcast operands are expanded first).
#include <torch/library.h>

#include "../impl.h"
#include "../rule_math.h"
#include "cuda_utils.cuh"

namespace lrpcpp {
namespace {

template <typename scalar_t>
struct Add2RelevanceOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* r;
  const scalar_t* a;
  const scalar_t* b;
  scalar_t* ra;
  scalar_t* rb;
  acc_t epsilon;

  template <int N>
  __device__ void apply(int64_t i) const {
    const auto rv = cuda::load<N>(r + i);
    const auto av = cuda::load<N>(a + i);
    const auto bv = cuda::load<N>(b + i);
    cuda::Pack<scalar_t, N> oa, ob;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const acc_t va = av.v[k], vb = bv.v[k], y = va + vb;
      oa.v[k] = static_cast<scalar_t>(math::add_share<acc_t>(va, rv.v[k], y, epsilon));
      ob.v[k] = static_cast<scalar_t>(math::add_share<acc_t>(vb, rv.v[k], y, epsilon));
    }
    cuda::store<N>(ra + i, oa);
    cuda::store<N>(rb + i, ob);
  }
};

TensorPair add2_relevance_cuda(const Tensor& grad, const Tensor& a, const Tensor& b, double epsilon,
                               std::array<bool, 2> output_mask) {
  impl::check_add2_relevance(grad, a, b, epsilon);
  if (!output_mask[0] && !output_mask[1]) return {};
  const c10::cuda::CUDAGuard guard(grad.device());
  const Tensor g = grad.contiguous();
  const Tensor ae = a.expand(grad.sizes()).contiguous(), be = b.expand(grad.sizes()).contiguous();
  Tensor ra = at::empty(grad.sizes(), grad.options());
  Tensor rb = at::empty(grad.sizes(), grad.options());
  LRPCPP_DISPATCH_FLOATING(grad.scalar_type(), "lrpcpp_add2_relevance_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int N = cuda::pack_size<scalar_t>();
    const Add2RelevanceOp<scalar_t> op{g.const_data_ptr<scalar_t>(),    ae.const_data_ptr<scalar_t>(),
                                       be.const_data_ptr<scalar_t>(),   ra.mutable_data_ptr<scalar_t>(),
                                       rb.mutable_data_ptr<scalar_t>(), static_cast<acc_t>(epsilon)};
    constexpr int bytes = N * sizeof(scalar_t);
    const bool vec = cuda::aligned(op.r, bytes) && cuda::aligned(op.a, bytes) && cuda::aligned(op.b, bytes) &&
                     cuda::aligned(op.ra, bytes) && cuda::aligned(op.rb, bytes);
    cuda::launch_elementwise<N>(g.numel(), vec, op);
  });
  return {output_mask[0] ? at::sum_to(ra, a.sizes()) : Tensor(), output_mask[1] ? at::sum_to(rb, b.sizes()) : Tensor()};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, CUDA, m) {
  m.impl("add2_relevance", &add2_relevance_cuda);
}

}  // namespace lrpcpp
