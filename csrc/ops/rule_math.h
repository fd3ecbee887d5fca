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

// Input of the Deep Taylor softmax rule: x' = x / T, set to 0 for a masked logit, so that it carries
// no relevance. Masked means x = -inf, or a softmax weight s of exactly 0: a finite mask value such as
// the dtype's lowest contributes nothing to the output either, and x / T would overflow to -inf for
// T < 1 (then x' (R - s sum R) is -inf or NaN).
template <typename T>
C10_HOST_DEVICE inline T softmax_input(T x, T s, T inv_temperature) {
  return (x == -std::numeric_limits<T>::infinity() || s == T(0)) ? T(0) : x * inv_temperature;
}

// Deep Taylor softmax rule with bias for one element: x' (r - s * sum_dim r).
template <typename T>
C10_HOST_DEVICE inline T softmax_relevance(T x_prime, T r, T s, T row_sum) {
  return x_prime * (r - s * row_sum);
}

// Fused attention (explicit rules), one score S = q . k: its normalised relevance Rn_S, from the
// softmax input x (S plus the mask bias, -inf where masked), the weight p, R_P = p (Rn_O . v), the
// row sum c of R_P and inv_t = scale: the softmax rule, then (with a float mask, bias = true) add2's
// share of S in x = S + bias, then the epsilon rule of q k^T, R_S / stab(s_scale S).
template <typename T>
C10_HOST_DEVICE inline T attention_score_relevance(T s, T x, T p, T r_p, T c, T inv_t, T eps, T s_scale, bool bias) {
  const T r_x = softmax_relevance(softmax_input(x, p, inv_t), r_p, p, c);
  const T r_s = bias ? add_share(s, r_x, x, eps) : r_x;
  return stab_div(r_s, s, eps, s_scale);
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

// ----------------------------------------------------------------------------- vision rules
// RULES.md section 3, for z_j = sum_i x_i w_ij + b_j. Both the gamma and the alpha-beta rule split
// each term x_i w_ij by the signs of x_i and w_ij; with v+ = max(v, 0), v- = min(v, 0) and
// p_j = sum_i |x_i| |w_ij|, the two sums of signed terms are
//   A_j = sum_i (x_i w_ij)+ = (xW_j + p_j) / 2 >= 0,   B_j = sum_i (x_i w_ij)- = (xW_j - p_j) / 2 <= 0.
// The gamma rule's relevance takes the form R_x = x (s_w W^T) + |x| (s_abs |W|^T), two products
// with the per-output factors s_w, s_abs computed here. `z` is the layer's output (with bias), `p`
// the product |x| |W|, `b` the output's bias (0 when there is none), `r` the relevance arriving at
// the output.

// Gamma rule: outputs with z >= 0 divide by stab(z + gamma (A + b+)), outputs with z < 0 by
// stab(z + gamma (B + b-)) (the bias is the weight of a constant input +1, so it counts among the
// x+ terms). The stabiliser takes the sign of the branch, which is the sign of the denominator.
template <typename T>
C10_HOST_DEVICE inline void gamma_factors(T r, T z, T p, T b, T gamma, T eps, T& s_w, T& s_abs) {
  const bool pos = z >= T(0);
  const T zb = z - b;
  const T bias_part = pos ? (b > T(0) ? b : T(0)) : (b < T(0) ? b : T(0));
  const T sum_part = pos ? (zb + p) * T(0.5) : (zb - p) * T(0.5);
  const T d = z + gamma * (sum_part + bias_part) + (pos ? eps : -eps);
  const T s = r / d;
  s_w = (T(1) + T(0.5) * gamma) * s;
  s_abs = T(0.5) * gamma * (pos ? s : -s);
}

// Alpha-beta rule: the normalised shares of the positive and the negative terms of one output,
// alpha r / stab(A) and -beta r / stab(B), from A = sum_i (x_i w_ij)+ >= 0 >= B = sum_i (x_i w_ij)-
// (computed as sums of same-signed products, so that an exactly zero sum stays zero).
template <typename T>
C10_HOST_DEVICE inline void alpha_beta_factors(T r, T a, T n, T alpha, T beta, T eps, T& s_pos, T& s_neg) {
  a = a > T(0) ? a : T(0);  // exact arithmetic gives A >= 0 >= B; rounding may not
  n = n < T(0) ? n : T(0);
  s_pos = alpha * (r / stab(a, eps));
  s_neg = -beta * (r / stab(n, eps));
}

// The input side of the gamma rule: x a + |x| b (relevance), or, in gradient-times-input
// form, a + sign(x) b, the same relevance divided by x exactly (sign(0) = +1; x = 0 has none).
template <typename T>
C10_HOST_DEVICE inline T split_times_input(T x, T a, T b) {
  return x * a + (x >= T(0) ? x : -x) * b;
}

template <typename T>
C10_HOST_DEVICE inline T split_gradient(T x, T a, T b) {
  return a + (x >= T(0) ? b : -b);
}

}  // namespace lrpcpp::math
