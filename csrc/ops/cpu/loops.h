// Small helpers for the CPU kernels: a typed element loop for TensorIterator
// (a vectorisable pointer loop when every operand is contiguous), and the
// grain sizes of at::parallel_for.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>

#include <cmath>
#include <utility>

namespace lrpcpp::cpu {

// Elements per task for at::parallel_for on element-wise work.
constexpr int64_t kGrain = 32768;

// Rows per task when each row holds `row_len` elements.
inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(row_len, 1));
}

// Mean and 1 / sqrt(biased variance + eps) of one row of a layer norm's input.
template <typename acc_t>
struct RowStats {
  acc_t mean, rstd;
};

template <typename acc_t, typename scalar_t>
RowStats<acc_t> row_stats(const scalar_t* xr, int64_t len, double eps) {
  acc_t mean = 0;
#pragma omp simd reduction(+ : mean)
  for (int64_t k = 0; k < len; ++k) mean += static_cast<acc_t>(xr[k]);
  mean /= len;
  acc_t var = 0;
#pragma omp simd reduction(+ : var)
  for (int64_t k = 0; k < len; ++k) {
    const acc_t d = static_cast<acc_t>(xr[k]) - mean;
    var += d * d;
  }
  return {mean, acc_t(1) / std::sqrt(var / len + static_cast<acc_t>(eps))};
}

namespace detail {
template <typename... Ts, typename F, size_t... Is>
void typed_loop_impl(char** data, const int64_t* strides, int64_t n, const F& f, std::index_sequence<Is...>) {
  bool contiguous = true;
  ((contiguous = contiguous && strides[Is] == static_cast<int64_t>(sizeof(Ts))), ...);
  if (contiguous) {
    auto ptrs = std::make_tuple(reinterpret_cast<Ts*>(data[Is])...);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) f(std::get<Is>(ptrs)[i]...);
  } else {
    for (int64_t i = 0; i < n; ++i) f(*reinterpret_cast<Ts*>(data[Is] + i * strides[Is])...);
  }
}
}  // namespace detail

// Body of a TensorIterator 1-D loop: f(operand0, operand1, ...) on each element,
// the operands typed Ts... in the iterator's order (outputs first).
template <typename... Ts, typename F>
void typed_loop(char** data, const int64_t* strides, int64_t n, const F& f) {
  detail::typed_loop_impl<Ts...>(data, strides, n, f, std::index_sequence_for<Ts...>{});
}

}  // namespace lrpcpp::cpu
