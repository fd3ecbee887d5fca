// The per-element arithmetic of the LRP rules, written once.
//
// Every function here is C10_HOST_DEVICE so that the CPU loops and the CUDA
// kernels call the very same code: the CPU tests then cover the math the GPU
// runs. `T` is the accumulation type (float for fp16/bf16 storage).
#pragma once

#include <c10/macros/Macros.h>

#include <limits>

namespace lrpcpp::math {

// Sign-aware stabiliser: stab(z) = z + eps * sign(z), with sign(0) = +1, so the
// magnitude only grows and a zero denominator becomes eps (never 0 or -0).
// Written as arithmetic on the comparison (no select, no branch), so loops
// over it compile to vector code.
template <typename T>
C10_HOST_DEVICE inline T stab(T z, T eps) {
  const T sign = T(2) * static_cast<T>(z >= T(0)) - T(1);
  return z + eps * sign;
}

// R / stab(scale * z): the normalised relevance of the epsilon rule.
template <typename T>
C10_HOST_DEVICE inline T stab_div(T r, T z, T eps, T scale) {
  return r / stab(scale * z, eps);
}

// Share of one summand `v` of y = a + b in the relevance r of y.
template <typename T>
C10_HOST_DEVICE inline T add_share(T v, T r, T y, T eps) {
  return v * (r / stab(y, eps));
}

// Input of the Deep Taylor softmax rule: x / T, with -inf (masked) set to 0.
template <typename T>
C10_HOST_DEVICE inline T softmax_input(T x, T inv_temperature) {
  // -inf marks masked logits: they carry no relevance.
  return x == -std::numeric_limits<T>::infinity() ? T(0) : x * inv_temperature;
}

// Deep Taylor softmax rule with bias for one element: x' (r - s * sum_dim r).
template <typename T>
C10_HOST_DEVICE inline T softmax_relevance(T x_prime, T r, T s, T row_sum) {
  return x_prime * (r - s * row_sum);
}

// Layer-norm epsilon rule, first half: h = (w / sigma) * r / stab(y).
template <typename T>
C10_HOST_DEVICE inline T layer_norm_h(T r, T y, T w_rstd, T eps) {
  return w_rstd * (r / stab(y, eps));
}

// Layer-norm epsilon rule, second half: x (h - mean(h)).
template <typename T>
C10_HOST_DEVICE inline T layer_norm_relevance(T x, T h, T mean_h) {
  return x * (h - mean_h);
}

// Mean rule: x r / stab(sum_dim x).
template <typename T>
C10_HOST_DEVICE inline T mean_share(T x, T r, T sum, T eps) {
  return x * (r / stab(sum, eps));
}

// Gradient-times-input identity rule, g_x = g_y * y / stab(x): the factor y / stab(x), clamped to
// [-hi, hi] (hi: the largest finite value of the storage type, so a float16 factor never becomes inf).
// NaN compares false both ways and stays NaN.
template <typename T>
C10_HOST_DEVICE inline T gi_identity_factor(T x, T y, T eps, T hi) {
  const T f = y / stab(x, eps);
  return f > hi ? hi : (f < -hi ? -hi : f);
}

// Gradient-times-input layer norm, sigma detached: g_x = rstd * (h - mean(h)) with h = g * w.
template <typename T>
C10_HOST_DEVICE inline T gi_layer_norm_grad(T h, T mean_h, T rstd) {
  return rstd * (h - mean_h);
}

}  // namespace lrpcpp::math
