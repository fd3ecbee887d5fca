// CPU kernels of the vision family: the per-element primitives gamma_stab_div, alpha_beta_stab_div
// and split_times_input (one pass each, vectorisable inner loops).
#include <torch/library.h>

#include "../impl.h"
#include "../rule_math.h"
#include "loops.h"

namespace lrpcpp {
namespace {

// Calls f(i, c) for every element i of a contiguous tensor of `numel` elements whose channel
// (bias index) is c = (i / inner) % channels, in parallel: rows of `channels` elements when
// inner == 1 (a linear layer's output), planes of `inner` elements of one channel otherwise.
template <typename F>
void for_each_channel(int64_t numel, int64_t channels, int64_t inner, const F& f) {
  if (inner == 1) {
    const int64_t rows = numel / channels;
    at::parallel_for(0, rows, cpu::row_grain(channels), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t base = row * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) f(base + c, c);
      }
    });
  } else {
    const int64_t planes = numel / inner;
    at::parallel_for(0, planes, cpu::row_grain(inner), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t base = plane * inner, c = plane % channels;
#pragma omp simd
        for (int64_t k = 0; k < inner; ++k) f(base + k, c);
      }
    });
  }
}

// The two factors of the gamma rule; `Factors` computes them for one element from the incoming
// relevance r, output z, product p and bias b.
template <typename Factors>
TensorPair two_factor_cpu(const Tensor& grad, const Tensor& output, const Tensor& abs_product, const OptTensor& bias,
                          int64_t d, bool gi, const Factors& factors) {
  Tensor s_w = at::empty(output.sizes(), output.options());
  Tensor s_abs = at::empty(output.sizes(), output.options());
  if (output.numel() == 0) return {s_w, s_abs};
  const int64_t channels = output.size(d), inner = impl::inner_size(output, d);
  const Tensor g = grad.contiguous(), z = output.contiguous(), p = abs_product.contiguous();
  const Tensor b = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::zeros({channels}, output.options());
  LRPCPP_DISPATCH_FLOATING(output.scalar_type(), "lrpcpp_two_factor_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* wp = s_w.mutable_data_ptr<scalar_t>();
    scalar_t* ap = s_abs.mutable_data_ptr<scalar_t>();
    auto run = [&](auto gi_tag) {
      constexpr bool kGi = decltype(gi_tag)::value;
      for_each_channel(output.numel(), channels, inner, [&](int64_t i, int64_t c) {
        const acc_t zi = zp[i];
        const acc_t r = kGi ? static_cast<acc_t>(gp[i]) * zi : static_cast<acc_t>(gp[i]);
        acc_t sw, sa;
        factors(r, zi, static_cast<acc_t>(pp[i]), static_cast<acc_t>(bp[c]), sw, sa);
        wp[i] = static_cast<scalar_t>(sw);
        ap[i] = static_cast<scalar_t>(sa);
      });
    };
    if (gi) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  return {s_w, s_abs};
}

TensorPair gamma_stab_div_cpu(const Tensor& grad, const Tensor& output, const Tensor& abs_product,
                              const OptTensor& bias, int64_t bias_dim, double gamma, double epsilon, bool gi) {
  const char* op = "lrpcpp.gamma_stab_div";
  const int64_t d = impl::check_factor_inputs(grad, output, abs_product, bias, bias_dim, epsilon, op);
  impl::check_gamma(gamma, op);
  return two_factor_cpu(grad, output, abs_product, bias, d, gi,
                        [gamma, epsilon](auto r, auto z, auto p, auto b, auto& sw, auto& sa) {
                          using T = std::remove_reference_t<decltype(sw)>;
                          math::gamma_factors<T>(r, z, p, b, static_cast<T>(gamma), static_cast<T>(epsilon), sw, sa);
                        });
}

template <typename scalar_t, bool kGi>
void alpha_beta_loop(const scalar_t* gp, const scalar_t* zp, const scalar_t* ap, const scalar_t* np, scalar_t* pp,
                     scalar_t* qp, int64_t n, double alpha, double beta, double epsilon) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t al = static_cast<acc_t>(alpha), be = static_cast<acc_t>(beta), e = static_cast<acc_t>(epsilon);
  at::parallel_for(0, n, cpu::kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const acc_t g = gp[i];
      const acc_t r = kGi ? g * static_cast<acc_t>(zp[i]) : g;
      acc_t sp, sn;
      math::alpha_beta_factors<acc_t>(r, ap[i], np[i], al, be, e, sp, sn);
      pp[i] = static_cast<scalar_t>(sp);
      qp[i] = static_cast<scalar_t>(sn);
    }
  });
}

TensorPair alpha_beta_stab_div_cpu(const Tensor& grad, const Tensor& output, const Tensor& pos_sum,
                                   const Tensor& neg_sum, double alpha, double beta, double epsilon, bool gi) {
  impl::check_alpha_beta_inputs(grad, output, pos_sum, neg_sum, alpha, beta, epsilon);
  Tensor s_pos = at::empty(output.sizes(), output.options());
  Tensor s_neg = at::empty(output.sizes(), output.options());
  if (output.numel() == 0) return {s_pos, s_neg};
  const Tensor g = grad.contiguous(), z = output.contiguous(), a = pos_sum.contiguous(), n = neg_sum.contiguous();
  LRPCPP_DISPATCH_FLOATING(output.scalar_type(), "lrpcpp_alpha_beta_stab_div_cpu", [&] {
    auto run = [&](auto gi_tag) {
      alpha_beta_loop<scalar_t, decltype(gi_tag)::value>(
          g.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
          n.const_data_ptr<scalar_t>(), s_pos.mutable_data_ptr<scalar_t>(), s_neg.mutable_data_ptr<scalar_t>(),
          output.numel(), alpha, beta, epsilon);
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
void split_loop(const scalar_t* xp, const scalar_t* ap, const scalar_t* bp, scalar_t* op, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, cpu::kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      op[i] = static_cast<scalar_t>(kGi ? math::split_gradient<acc_t>(xp[i], ap[i], bp[i])
                                        : math::split_times_input<acc_t>(xp[i], ap[i], bp[i]));
    }
  });
}

Tensor split_times_input_cpu(const Tensor& x, const Tensor& a, const Tensor& b, bool gi) {
  impl::check_split_times_input(x, a, b);
  Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const Tensor xc = x.contiguous(), ac = a.contiguous(), bc = b.contiguous();
  LRPCPP_DISPATCH_FLOATING(x.scalar_type(), "lrpcpp_split_times_input_cpu", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* ap = ac.const_data_ptr<scalar_t>();
    const scalar_t* bp = bc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    if (gi) {
      split_loop<scalar_t, true>(xp, ap, bp, op, out.numel());
    } else {
      split_loop<scalar_t, false>(xp, ap, bp, op, out.numel());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, CPU, m) {
  m.impl("gamma_stab_div", &gamma_stab_div_cpu);
  m.impl("alpha_beta_stab_div", &alpha_beta_stab_div_cpu);
  m.impl("split_times_input", &split_times_input_cpu);
}

}  // namespace lrpcpp
