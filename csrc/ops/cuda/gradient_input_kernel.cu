// CUDA kernels of the gradient-times-input ops: gi_identity's saved factor
// y / stab(x) (one vectorised pass), the shared
// backward g * factor (a factor that repeats along grad, such as a 0-dim scale
// or a vector over the last dimension, is read in place rather than expanded;
// the output keeps a dense grad's strides, the kernel runs in that memory order),
// and the layer-norm backward with sigma detached, one block per row.
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

#include "../impl.h"
#include "../rule_math.h"
#include "cuda_utils.cuh"

namespace lrpcpp {
namespace {

template <typename x_t, typename y_t>
struct GiIdentityFactorOp {
  using acc_t = detail::opmath_pair_t<x_t, y_t>;
  const x_t* x;
  const y_t* y;
  x_t* factor;
  acc_t epsilon, hi;

  template <int N>
  __device__ void apply(int64_t i) const {
    const auto xv = cuda::load<N>(x + i);
    const auto yv = cuda::load<N>(y + i);
    cuda::Pack<x_t, N> fv;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      fv.v[k] = static_cast<x_t>(
          math::gi_identity_factor<acc_t>(static_cast<acc_t>(xv.v[k]), static_cast<acc_t>(yv.v[k]), epsilon, hi));
    }
    cuda::store<N>(factor + i, fv);
  }
};

Tensor gi_identity_factor_cuda(const Tensor& x, const Tensor& y, double epsilon) {
  impl::check_gi_identity(x, y, epsilon, "lrpcpp.gi_identity_factor");
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.contiguous(), yc = y.contiguous();
  Tensor factor = at::empty(xc.sizes(), xc.options());
  if (factor.numel() == 0) return factor;
  LRPCPP_DISPATCH_FLOATING(x.scalar_type(), "lrpcpp_gi_identity_factor_cuda", [&] {
    using x_t = scalar_t;
    LRPCPP_DISPATCH_FLOATING(y.scalar_type(), "lrpcpp_gi_identity_factor_cuda", [&] {
      using y_t = scalar_t;
      using Op = GiIdentityFactorOp<x_t, y_t>;
      using acc_t = typename Op::acc_t;
      constexpr int N =
          cuda::pack_size<x_t>() < cuda::pack_size<y_t>() ? cuda::pack_size<x_t>() : cuda::pack_size<y_t>();
      const Op op{xc.const_data_ptr<x_t>(), yc.const_data_ptr<y_t>(), factor.mutable_data_ptr<x_t>(),
                  static_cast<acc_t>(epsilon), static_cast<acc_t>(std::numeric_limits<x_t>::max())};
      const bool vec = cuda::aligned(op.x, N * sizeof(x_t)) && cuda::aligned(op.factor, N * sizeof(x_t)) &&
                       cuda::aligned(op.y, N * sizeof(y_t));
      cuda::launch_elementwise<N>(factor.numel(), vec, op);
    });
  });
  return factor;
}

// out = grad * factor, in acc_t; with kRepeat the factor holds `period` values that repeat along grad.
template <typename grad_t, typename factor_t, typename out_t, bool kRepeat>
struct GiScaleOp {
  using acc_t = detail::opmath_pair_t<grad_t, factor_t>;
  const grad_t* grad;
  const factor_t* factor;
  out_t* out;
  int64_t period;

  template <int N>
  __device__ void apply(int64_t i) const {
    const auto gv = cuda::load<N>(grad + i);
    cuda::Pack<factor_t, N> fv;
    if constexpr (kRepeat) {
      int64_t j = i % period;  // one division per pack
#pragma unroll
      for (int k = 0; k < N; ++k) {
        fv.v[k] = factor[j];
        j = j + 1 == period ? 0 : j + 1;
      }
    } else {
      fv = cuda::load<N>(factor + i);
    }
    cuda::Pack<out_t, N> ov;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      ov.v[k] = static_cast<out_t>(static_cast<acc_t>(gv.v[k]) * static_cast<acc_t>(fv.v[k]));
    }
    cuda::store<N>(out + i, ov);
  }
};

// The number of values after which a contiguous `factor` repeats along a contiguous `grad` when
// factor's shape is a run of 1s followed by grad's trailing sizes ([], [D] or [1, T, D] for grad
// [B, T, D]); -1 when it broadcasts in any other way.
int64_t repeat_period(const Tensor& grad, const Tensor& factor) {
  const int64_t nf = factor.dim(), ng = grad.dim();
  int64_t lead = 0;
  while (lead < nf && factor.size(lead) == 1) ++lead;
  for (int64_t i = lead; i < nf; ++i) {
    if (factor.size(i) != grad.size(ng - nf + i)) return -1;
  }
  return factor.numel();
}

// The dims of a dense `t` from the largest stride to the smallest: t.permute() of them is contiguous.
std::vector<int64_t> memory_order(const Tensor& t) {
  std::vector<int64_t> order(t.dim());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return t.stride(a) > t.stride(b); });
  return order;
}

template <typename grad_t, typename factor_t, typename out_t>
void launch_gi_scale(const Tensor& g, const Tensor& f, Tensor& out, int64_t period) {
  constexpr int ng = cuda::pack_size<grad_t>(), nf = cuda::pack_size<factor_t>(), no = cuda::pack_size<out_t>();
  constexpr int N = ng < nf ? (ng < no ? ng : no) : (nf < no ? nf : no);
  const grad_t* gp = g.const_data_ptr<grad_t>();
  const factor_t* fp = f.const_data_ptr<factor_t>();
  out_t* op = out.mutable_data_ptr<out_t>();
  const bool vec = cuda::aligned(gp, N * sizeof(grad_t)) && cuda::aligned(op, N * sizeof(out_t));
  if (period == out.numel()) {
    cuda::launch_elementwise<N>(out.numel(), vec && cuda::aligned(fp, N * sizeof(factor_t)),
                                GiScaleOp<grad_t, factor_t, out_t, false>{gp, fp, op, period});
  } else {
    cuda::launch_elementwise<N>(out.numel(), vec, GiScaleOp<grad_t, factor_t, out_t, true>{gp, fp, op, period});
  }
}

Tensor gi_scale_backward_cuda(const Tensor& grad, const Tensor& factor, at::ScalarType dtype) {
  impl::check_gi_scale_backward(grad, factor, dtype);
  const c10::cuda::CUDAGuard guard(grad.device());
  // both operands in their common dtype (a 0-dim factor is not demoted, unlike torch's type promotion);
  // the product, in fp32 for fp16/bf16, is stored in that dtype when it is the one asked for, else in fp32
  const auto common = at::promote_types(grad.scalar_type(), factor.scalar_type());
  const auto stored = dtype == common ? common : at::toOpMathType(common);
  // a float16/bfloat16 gradient with a float32 factor (mixed precision) is read as it is and the
  // product written in the dtype asked for, float32 or the gradient's own: one pass, with the values
  // of the general path (the float32 product, rounded once)
  const bool direct =
      grad.scalar_type() != common && common == at::kFloat && (dtype == at::kFloat || dtype == grad.scalar_type());
  Tensor out = impl::gi_scale_backward_empty(grad, grad.options().dtype(direct ? dtype : stored));
  if (out.numel() == 0) return out.to(dtype);
  // the kernel runs by flat index over out's memory: out, grad and factor (with grad's number of dims)
  // are viewed with their dims in out's memory order, in which out is contiguous
  Tensor factor_nd = factor;
  while (factor_nd.dim() < out.dim()) factor_nd = factor_nd.unsqueeze(0);
  const auto order = memory_order(out);
  Tensor o = out.permute(order);
  TORCH_INTERNAL_ASSERT(o.is_contiguous());
  const Tensor g = (direct ? grad : grad.to(common)).permute(order).contiguous();
  factor_nd = factor_nd.to(common).permute(order);
  int64_t period = repeat_period(g, factor_nd);
  const Tensor f = period > 0 ? factor_nd.contiguous() : factor_nd.expand(g.sizes()).contiguous();
  if (period < 0) period = f.numel();
  if (direct) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(grad.scalar_type(), "lrpcpp_gi_scale_backward_cuda", [&] {
      if (dtype == at::kFloat) {
        launch_gi_scale<scalar_t, float, float>(g, f, o, period);
      } else {
        launch_gi_scale<scalar_t, float, scalar_t>(g, f, o, period);
      }
    });
    return out;
  }
  LRPCPP_DISPATCH_FLOATING(common, "lrpcpp_gi_scale_backward_cuda", [&] {
    if (stored == common) {
      launch_gi_scale<scalar_t, scalar_t, scalar_t>(g, f, o, period);
    } else {
      launch_gi_scale<scalar_t, scalar_t, at::opmath_type<scalar_t>>(g, f, o, period);
    }
  });
  return out.to(dtype);
}

template <typename scalar_t>
__launch_bounds__(cuda::kMaxRowThreads) __global__
    void gi_layer_norm_backward_kernel(const scalar_t* __restrict__ grad,
                                       const at::opmath_type<scalar_t>* __restrict__ rstd_rows,
                                       const at::opmath_type<scalar_t>* __restrict__ w, scalar_t* __restrict__ out,
                                       int64_t len) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * len;
  const scalar_t* gr = grad + base;
  const acc_t rstd = rstd_rows[blockIdx.x];
  acc_t partial = 0;
  for (int64_t k = threadIdx.x; k < len; k += blockDim.x) partial += static_cast<acc_t>(gr[k]) * w[k];
  const acc_t h_mean = cuda::block_sum(partial, scratch) / len;
  for (int64_t k = threadIdx.x; k < len; k += blockDim.x) {
    out[base + k] =
        static_cast<scalar_t>(math::gi_layer_norm_grad<acc_t>(static_cast<acc_t>(gr[k]) * w[k], h_mean, rstd));
  }
}

Tensor gi_layer_norm_backward_cuda(const Tensor& grad, const Tensor& rstd, at::IntArrayRef normalized_shape,
                                   const OptTensor& weight) {
  impl::check_gi_layer_norm_backward(grad, rstd, normalized_shape, weight);
  const c10::cuda::CUDAGuard guard(grad.device());
  const Tensor g = grad.contiguous();
  Tensor out = at::empty(g.sizes(), g.options());
  if (out.numel() == 0) return out;
  const int64_t len = c10::multiply_integers(normalized_shape);
  const Tensor w = impl::layer_norm_affine_row(grad, normalized_shape, weight, 1.0);
  const Tensor s = rstd.to(w.scalar_type()).contiguous();  // one value per row, in the accumulation type
  const int64_t rows = g.numel() / len;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "lrpcpp.gi_layer_norm_backward: too many rows (", rows,
              ") for one CUDA launch");
  LRPCPP_DISPATCH_FLOATING(grad.scalar_type(), "lrpcpp_gi_layer_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gi_layer_norm_backward_kernel<scalar_t><<<static_cast<unsigned>(rows), cuda::row_threads(len), 0, cuda::stream()>>>(
        g.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
        out.mutable_data_ptr<scalar_t>(), len);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, CUDA, m) {
  m.impl("gi_identity_factor", &gi_identity_factor_cuda);
  m.impl("gi_scale_backward", &gi_scale_backward_cuda);
  m.impl("gi_layer_norm_backward", &gi_layer_norm_backward_cuda);
}

}  // namespace lrpcpp
