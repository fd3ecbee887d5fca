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

// Partial sums of lane_sum: element k goes to lane k % kLanes.
constexpr int64_t kLanes = 16;

// The sum of term(k) over k in [0, len), in one association whatever the compiler makes of the loop:
// kLanes partial sums, element k added to lane k % kLanes in index order, then the lanes added
// pairwise (lane l + w into lane l, for w = kLanes / 2, ..., 1). So the result does not depend on the
// vector width the loop runs at (SSE2, AVX2, AVX-512), and the kLanes independent sums do not wait
// on each other as a single accumulator's additions do.
template <typename acc_t, typename F>
acc_t lane_sum(int64_t len, const F& term) {
  acc_t part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) part[l] += term(k + l);
  }
  for (int64_t l = 0; k + l < len; ++l) part[l] += term(k + l);
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t l = 0; l < w; ++l) part[l] += part[l + w];
  }
  return part[0];
}

// Mean and 1 / sqrt(biased variance + eps) of one row of a layer norm's input.
template <typename acc_t>
struct RowStats {
  acc_t mean, rstd;
};

template <typename acc_t, typename scalar_t>
RowStats<acc_t> row_stats(const scalar_t* xr, int64_t len, double eps) {
  const acc_t mean = lane_sum<acc_t>(len, [xr](int64_t k) { return static_cast<acc_t>(xr[k]); }) / len;
  const acc_t var = lane_sum<acc_t>(len, [xr, mean](int64_t k) {
    const acc_t d = static_cast<acc_t>(xr[k]) - mean;
    return d * d;
  });
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
