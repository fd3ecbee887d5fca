// CPU kernels of the gradient-times-input ops: gi_identity's saved factor
// y / stab(x), the shared backward
// g * factor (torch's own mul, or a TensorIterator loop for an fp16/bf16 product kept
// in fp32; the output keeps a dense grad's strides), and the layer-norm backward
// with sigma detached, one row of the normalised dimensions at a time.
#include <torch/library.h>

#include "../impl.h"
#include "../rule_math.h"
#include "loops.h"
#include "vector_clones.h"

#include <limits>

namespace lrpcpp {
namespace {

// the factor over n contiguous elements
template <typename x_t, typename y_t, typename acc_t>
LRPCPP_VECTOR_CLONES void gi_identity_factor_range(x_t* factor, const x_t* x, const y_t* y, int64_t n, acc_t e,
                                                   acc_t hi) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    factor[i] =
        static_cast<x_t>(math::gi_identity_factor<acc_t>(static_cast<acc_t>(x[i]), static_cast<acc_t>(y[i]), e, hi));
  }
}

Tensor gi_identity_factor_cpu(const Tensor& x, const Tensor& y, double epsilon) {
  impl::check_gi_identity(x, y, epsilon, "lrpcpp.gi_identity_factor");
  Tensor factor = at::empty(x.sizes(), x.options());
  if (factor.numel() == 0) return factor;
  auto iter = at::TensorIteratorConfig()
                  .check_all_same_dtype(false)
                  .add_output(factor)
                  .add_const_input(x)
                  .add_const_input(y)
                  .build();
  LRPCPP_DISPATCH_FLOATING(x.scalar_type(), "lrpcpp_gi_identity_factor_cpu", [&] {
    using x_t = scalar_t;
    LRPCPP_DISPATCH_FLOATING(y.scalar_type(), "lrpcpp_gi_identity_factor_cpu", [&] {
      using y_t = scalar_t;
      using acc_t = detail::opmath_pair_t<x_t, y_t>;
      const acc_t e = static_cast<acc_t>(epsilon);
      const acc_t hi = static_cast<acc_t>(std::numeric_limits<x_t>::max());
      iter.for_each([&](char** data, const int64_t* strides, int64_t n) {
        if (strides[0] == sizeof(x_t) && strides[1] == sizeof(x_t) && strides[2] == sizeof(y_t)) {
          gi_identity_factor_range(reinterpret_cast<x_t*>(data[0]), reinterpret_cast<const x_t*>(data[1]),
                                   reinterpret_cast<const y_t*>(data[2]), n, e, hi);
          return;
        }
        cpu::typed_loop<x_t, const x_t, const y_t>(
            data, strides, n, [e, hi](x_t& factor_i, const x_t& x_i, const y_t& y_i) {
              factor_i = static_cast<x_t>(
                  math::gi_identity_factor<acc_t>(static_cast<acc_t>(x_i), static_cast<acc_t>(y_i), e, hi));
            });
      });
    });
  });
  return factor;
}

// fp16/bf16 operands and their product kept in fp32 (the exact product of the two)
template <typename scalar_t>
void gi_scale_to_opmath_loop(at::TensorIterator& iter) {
  using acc_t = at::opmath_type<scalar_t>;
  iter.for_each([](char** data, const int64_t* strides, int64_t n) {
    cpu::typed_loop<acc_t, const scalar_t, const scalar_t>(data, strides, n,
                                                           [](acc_t& out_i, const scalar_t& g_i, const scalar_t& f_i) {
                                                             out_i = static_cast<acc_t>(g_i) * static_cast<acc_t>(f_i);
                                                           });
  });
}

// a one-element factor (a 0-dim scale) as a constant: the loop stays contiguous, hence vectorised
template <typename scalar_t>
void gi_scale_to_opmath_by_constant_loop(at::TensorIterator& iter, at::opmath_type<scalar_t> f) {
  using acc_t = at::opmath_type<scalar_t>;
  iter.for_each([f](char** data, const int64_t* strides, int64_t n) {
    cpu::typed_loop<acc_t, const scalar_t>(
        data, strides, n, [f](acc_t& out_i, const scalar_t& g_i) { out_i = static_cast<acc_t>(g_i) * f; });
  });
}

Tensor gi_scale_backward_cpu(const Tensor& grad, const Tensor& factor, at::ScalarType dtype) {
  impl::check_gi_scale_backward(grad, factor, dtype);
  // both operands in their common dtype (a 0-dim factor is not demoted, unlike torch's type promotion);
  // the product, in fp32 for fp16/bf16, is stored in that dtype when it is the one asked for, else in fp32
  const auto common = at::promote_types(grad.scalar_type(), factor.scalar_type());
  const auto stored = dtype == common ? common : at::toOpMathType(common);
  const Tensor g = grad.to(common), f = factor.to(common);
  Tensor out = impl::gi_scale_backward_empty(grad, grad.options().dtype(stored));
  if (out.numel() == 0) return out.to(dtype);
  if (stored == common) {
    // torch's own product (vectorised for the CPU it runs on): for fp16/bf16 too the product of the
    // two values in fp32, rounded once to the stored dtype, as the fp32 path below keeps it
    at::mul_out(out, g, f);
    return out.to(dtype);
  }
  const bool constant = f.numel() == 1;
  at::TensorIteratorConfig config;
  config.check_all_same_dtype(false).add_output(out).add_const_input(g);
  if (!constant) config.add_const_input(f);
  auto iter = config.build();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(common, "lrpcpp_gi_scale_backward_cpu", [&] {
    if (constant) {
      gi_scale_to_opmath_by_constant_loop<scalar_t>(iter, static_cast<float>(*f.const_data_ptr<scalar_t>()));
    } else {
      gi_scale_to_opmath_loop<scalar_t>(iter);
    }
  });
  return out.to(dtype);
}

template <typename scalar_t>
void gi_layer_norm_backward_loop(const Tensor& grad, const Tensor& rstd, const Tensor& w, Tensor& out, int64_t rows,
                                 int64_t len) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const acc_t* sp = rstd.const_data_ptr<acc_t>();
  const acc_t* wp = w.const_data_ptr<acc_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, rows, cpu::row_grain(len), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* gr = gp + row * len;
      const acc_t rstd = sp[row];
      const acc_t h_mean =
          cpu::lane_sum<acc_t>(len, [gr, wp](int64_t k) { return static_cast<acc_t>(gr[k]) * wp[k]; }) / len;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) {
        op[row * len + k] =
            static_cast<scalar_t>(math::gi_layer_norm_grad<acc_t>(static_cast<acc_t>(gr[k]) * wp[k], h_mean, rstd));
      }
    }
  });
}

Tensor gi_layer_norm_backward_cpu(const Tensor& grad, const Tensor& rstd, at::IntArrayRef normalized_shape,
                                  const OptTensor& weight) {
  impl::check_gi_layer_norm_backward(grad, rstd, normalized_shape, weight);
  const Tensor g = grad.contiguous();
  Tensor out = at::empty(g.sizes(), g.options());
  if (out.numel() == 0) return out;
  const int64_t len = c10::multiply_integers(normalized_shape);
  const Tensor w = impl::layer_norm_affine_row(grad, normalized_shape, weight, 1.0);
  // one value per row, in the accumulation type (the forward's is float32 for float16 on some backends)
  const Tensor s = rstd.to(w.scalar_type()).contiguous();
  LRPCPP_DISPATCH_FLOATING(grad.scalar_type(), "lrpcpp_gi_layer_norm_backward_cpu",
                           [&] { gi_layer_norm_backward_loop<scalar_t>(g, s, w, out, g.numel() / len, len); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, CPU, m) {
  m.impl("gi_identity_factor", &gi_identity_factor_cpu);
  m.impl("gi_scale_backward", &gi_scale_backward_cpu);
  m.impl("gi_layer_norm_backward", &gi_layer_norm_backward_cpu);
}

}  // namespace lrpcpp
