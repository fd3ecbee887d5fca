// CUDA kernels of the vision family: gamma_stab_div (one vectorised pass over grad, output and the
// |x| |W| product, the bias read per element's channel), alpha_beta_stab_div and split_times_input.
#include <torch/library.h>

#include "../impl.h"
#include "../rule_math.h"
#include "cuda_utils.cuh"

namespace lrpcpp {
namespace {

template <typename acc_t>
struct GammaFactors {
  acc_t gamma, epsilon;
  __device__ void operator()(acc_t r, acc_t z, acc_t p, acc_t b, acc_t& sw, acc_t& sa) const {
    math::gamma_factors<acc_t>(r, z, p, b, gamma, epsilon, sw, sa);
  }
};

template <typename scalar_t, typename Factors, bool kGi>
struct TwoFactorOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g;
  const scalar_t* z;
  const scalar_t* p;
  const scalar_t* b;
  scalar_t* sw;
  scalar_t* sa;
  int64_t channels, inner;
  Factors factors;

  template <int N>
  __device__ void apply(int64_t i) const {
    const auto gv = cuda::load<N>(g + i);
    const auto zv = cuda::load<N>(z + i);
    const auto pv = cuda::load<N>(p + i);
    cuda::Pack<scalar_t, N> ow, oa;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const acc_t zi = zv.v[k];
      const acc_t r = kGi ? static_cast<acc_t>(gv.v[k]) * zi : static_cast<acc_t>(gv.v[k]);
      const acc_t bias = b[((i + k) / inner) % channels];
      acc_t w, a;
      factors(r, zi, static_cast<acc_t>(pv.v[k]), bias, w, a);
      ow.v[k] = static_cast<scalar_t>(w);
      oa.v[k] = static_cast<scalar_t>(a);
    }
    cuda::store<N>(sw + i, ow);
    cuda::store<N>(sa + i, oa);
  }
};

template <template <typename> class FactorsT, typename... Params>
TensorPair two_factor_cuda(const Tensor& grad, const Tensor& output, const Tensor& abs_product, const OptTensor& bias,
                           int64_t d, bool gi, Params... params) {
  const c10::cuda::CUDAGuard guard(output.device());
  Tensor s_w = at::empty(output.sizes(), output.options());
  Tensor s_abs = at::empty(output.sizes(), output.options());
  if (output.numel() == 0) return {s_w, s_abs};
  const int64_t channels = output.size(d), inner = impl::inner_size(output, d);
  const Tensor gc = grad.contiguous(), zc = output.contiguous(), pc = abs_product.contiguous();
  const Tensor bc =
      (bias.has_value() && bias->defined()) ? bias->contiguous() : at::zeros({channels}, output.options());
  LRPCPP_DISPATCH_FLOATING(output.scalar_type(), "lrpcpp_two_factor_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int N = cuda::pack_size<scalar_t>();
    const FactorsT<acc_t> factors{static_cast<acc_t>(params)...};
    auto run = [&](auto gi_tag) {
      constexpr bool kGi = decltype(gi_tag)::value;
      const TwoFactorOp<scalar_t, FactorsT<acc_t>, kGi> op{gc.const_data_ptr<scalar_t>(),
                                                           zc.const_data_ptr<scalar_t>(),
                                                           pc.const_data_ptr<scalar_t>(),
                                                           bc.const_data_ptr<scalar_t>(),
                                                           s_w.mutable_data_ptr<scalar_t>(),
                                                           s_abs.mutable_data_ptr<scalar_t>(),
                                                           channels,
                                                           inner,
                                                           factors};
      constexpr int bytes = N * sizeof(scalar_t);
      const bool vec = cuda::aligned(op.g, bytes) && cuda::aligned(op.z, bytes) && cuda::aligned(op.p, bytes) &&
                       cuda::aligned(op.sw, bytes) && cuda::aligned(op.sa, bytes);
      cuda::launch_elementwise<N>(output.numel(), vec, op);
    };
    if (gi) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  return {s_w, s_abs};
}

TensorPair gamma_stab_div_cuda(const Tensor& grad, const Tensor& output, const Tensor& abs_product,
                               const OptTensor& bias, int64_t bias_dim, double gamma, double epsilon, bool gi) {
  const char* op = "lrpcpp.gamma_stab_div";
  const int64_t d = impl::check_factor_inputs(grad, output, abs_product, bias, bias_dim, epsilon, op);
  impl::check_gamma(gamma, op);
  return two_factor_cuda<GammaFactors>(grad, output, abs_product, bias, d, gi, gamma, epsilon);
}

template <typename scalar_t, bool kGi>
struct AlphaBetaOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g;
  const scalar_t* z;
  const scalar_t* a;
  const scalar_t* n;
  scalar_t* sp;
  scalar_t* sn;
  acc_t alpha, beta, epsilon;

  template <int N>
  __device__ void apply(int64_t i) const {
    const auto gv = cuda::load<N>(g + i);
    const auto zv = cuda::load<N>(z + i);
    const auto av = cuda::load<N>(a + i);
    const auto nv = cuda::load<N>(n + i);
    cuda::Pack<scalar_t, N> op, on;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const acc_t gk = gv.v[k];
      const acc_t r = kGi ? gk * static_cast<acc_t>(zv.v[k]) : gk;
      acc_t p, q;
      math::alpha_beta_factors<acc_t>(r, av.v[k], nv.v[k], alpha, beta, epsilon, p, q);
      op.v[k] = static_cast<scalar_t>(p);
      on.v[k] = static_cast<scalar_t>(q);
    }
    cuda::store<N>(sp + i, op);
    cuda::store<N>(sn + i, on);
  }
};

TensorPair alpha_beta_stab_div_cuda(const Tensor& grad, const Tensor& output, const Tensor& pos_sum,
                                    const Tensor& neg_sum, double alpha, double beta, double epsilon, bool gi) {
  impl::check_alpha_beta_inputs(grad, output, pos_sum, neg_sum, alpha, beta, epsilon);
  const c10::cuda::CUDAGuard guard(output.device());
  Tensor s_pos = at::empty(output.sizes(), output.options());
  Tensor s_neg = at::empty(output.sizes(), output.options());
  if (output.numel() == 0) return {s_pos, s_neg};
  const Tensor gc = grad.contiguous(), zc = output.contiguous(), ac = pos_sum.contiguous(), nc = neg_sum.contiguous();
  LRPCPP_DISPATCH_FLOATING(output.scalar_type(), "lrpcpp_alpha_beta_stab_div_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int N = cuda::pack_size<scalar_t>();
    auto run = [&](auto gi_tag) {
      constexpr bool kGi = decltype(gi_tag)::value;
      const AlphaBetaOp<scalar_t, kGi> op{
          gc.const_data_ptr<scalar_t>(), zc.const_data_ptr<scalar_t>(),      ac.const_data_ptr<scalar_t>(),
          nc.const_data_ptr<scalar_t>(), s_pos.mutable_data_ptr<scalar_t>(), s_neg.mutable_data_ptr<scalar_t>(),
          static_cast<acc_t>(alpha),     static_cast<acc_t>(beta),           static_cast<acc_t>(epsilon)};
      constexpr int bytes = N * sizeof(scalar_t);
      const bool vec = cuda::aligned(op.g, bytes) && cuda::aligned(op.z, bytes) && cuda::aligned(op.a, bytes) &&
                       cuda::aligned(op.n, bytes) && cuda::aligned(op.sp, bytes) && cuda::aligned(op.sn, bytes);
      cuda::launch_elementwise<N>(output.numel(), vec, op);
    };
    if (gi) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  return {s_pos, s_neg};
}

template <typename scalar_t, bool kGi>
struct SplitOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* a;
  const scalar_t* b;
  scalar_t* out;

  template <int N>
  __device__ void apply(int64_t i) const {
    const auto xv = cuda::load<N>(x + i);
    const auto av = cuda::load<N>(a + i);
    const auto bv = cuda::load<N>(b + i);
    cuda::Pack<scalar_t, N> o;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const acc_t xi = xv.v[k], ai = av.v[k], bi = bv.v[k];
      o.v[k] = static_cast<scalar_t>(kGi ? math::split_gradient<acc_t>(xi, ai, bi)
                                         : math::split_times_input<acc_t>(xi, ai, bi));
    }
    cuda::store<N>(out + i, o);
  }
};

Tensor split_times_input_cuda(const Tensor& x, const Tensor& a, const Tensor& b, bool gi) {
  impl::check_split_times_input(x, a, b);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const Tensor xc = x.contiguous(), ac = a.contiguous(), bc = b.contiguous();
  LRPCPP_DISPATCH_FLOATING(x.scalar_type(), "lrpcpp_split_times_input_cuda", [&] {
    constexpr int N = cuda::pack_size<scalar_t>();
    auto run = [&](auto gi_tag) {
      constexpr bool kGi = decltype(gi_tag)::value;
      const SplitOp<scalar_t, kGi> op{xc.const_data_ptr<scalar_t>(), ac.const_data_ptr<scalar_t>(),
                                      bc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>()};
      constexpr int bytes = N * sizeof(scalar_t);
      const bool vec = cuda::aligned(op.x, bytes) && cuda::aligned(op.a, bytes) && cuda::aligned(op.b, bytes) &&
                       cuda::aligned(op.out, bytes);
      cuda::launch_elementwise<N>(out.numel(), vec, op);
    };
    if (gi) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, CUDA, m) {
  m.impl("gamma_stab_div", &gamma_stab_div_cuda);
  m.impl("alpha_beta_stab_div", &alpha_beta_stab_div_cuda);
  m.impl("split_times_input", &split_times_input_cuda);
}

}  // namespace lrpcpp
