// CPU kernels of the fused attention (see ops/attention.cpp for the rule). One task per (batch, query
// head); a task walks its queries in tiles of `query_rows` rows and the keys a tile can attend (all of
// them, the first i0 + rows under is_causal) in tiles of kKeyTile: [rows, kKeyTile] scratch buffers per
// thread at any sequence length, nothing of size T_q * T_k.
// The forward is the online softmax: per row a running maximum and sum of exp(x / T - maximum), the
// output's numerator rescaled when the maximum grows; the query tile is multiplied by 1 / T before its
// product with the keys (a float mask: the scores, then (S + mask / scale) / T element by element).
// The relevance puts the key tiles in the outer loop and the query tiles that attend a key tile inside,
// so that the key tile's k and v and its sums into dk and dv stay in cache (the row sums of R_P it needs
// come from Rn_O . O, not from the keys); each sum still runs over the tiles in index order.
// The matrix products are at::mm on the tiles (single-threaded inside at::parallel_for). The softmax's
// steps are loops over a tile's rows, compiled also for AVX-512 / AVX2 (vector_clones.h): in float the
// row's maximum, its exp (exp_of_shifted) and its sum, row by row; in double the shifted inputs, torch's
// exp over the tile, then the sums. In the relevance, x / T - lse and (float) its exp are one
// loop per row, and the rule of math::attention_score_relevance one loop over the tile (element by
// element through that function with a float mask). All in float32 for float16 / bfloat16.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../impl.h"
#include "../rule_math.h"
#include "vector_clones.h"

namespace lrpcpp {
namespace {

constexpr int64_t kTile = 64;
// keys per tile: the [kTile, kKeyTile] tiles (128 KiB each in float32) stay in cache
constexpr int64_t kKeyTile = 512;
// the bytes of one head's keys and values above which the tiles are taller (see query_rows)
constexpr int64_t kTallTileBytes = int64_t{2} << 20;

enum class MaskKind { none, causal, boolean, additive };

// q, k, v (and output, grad) as contiguous [B, H, T, E] views, and the mask's addressing.
struct Layout {
  int64_t B = 1, Hq = 1, Hk = 1, G = 1, Tq = 0, Tk = 0, E = 0, Ev = 0;
  MaskKind kind = MaskKind::none;
  Tensor mask;                    // expanded to [..., Hq, Tq, Tk] (stride 0 where broadcast)
  std::vector<int64_t> mask_off;  // offset of each (b, h) block in `mask`
  int64_t mask_sq = 0, mask_sk = 0;
  double scale = 1.0;
};

Layout make_layout(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& attn_mask, bool is_causal,
                   std::optional<double> scale) {
  Layout L;
  const int64_t nd = q.dim();
  for (int64_t d = 0; d < nd - 3; ++d) L.B *= q.size(d);
  if (nd >= 3) {
    L.Hq = q.size(-3);
    L.Hk = k.size(-3);
    L.G = L.Hk > 0 ? L.Hq / L.Hk : 1;
  }
  L.Tq = q.size(-2);
  L.Tk = k.size(-2);
  L.E = q.size(-1);
  L.Ev = v.size(-1);
  // no division by zero for an empty head (E = 0: nothing to compute, and a process with floating-point
  // traps enabled must not stop)
  L.scale = scale.has_value() ? *scale : (L.E > 0 ? 1.0 / std::sqrt(static_cast<double>(L.E)) : 1.0);
  if (is_causal) L.kind = MaskKind::causal;
  if (attn_mask.has_value()) {
    L.kind = attn_mask->scalar_type() == at::kBool ? MaskKind::boolean : MaskKind::additive;
    std::vector<int64_t> full(q.sizes().begin(), q.sizes().end());
    full.back() = L.Tk;
    L.mask = attn_mask->expand(full);
    L.mask_sq = L.mask.stride(-2);
    L.mask_sk = L.mask.stride(-1);
    L.mask_off.assign(L.B * L.Hq, 0);
    for (int64_t bh = 0; bh < L.B * L.Hq; ++bh) {
      int64_t rest = bh, off = 0;
      for (int64_t d = nd - 3; d >= 0; --d) {
        off += (rest % full[d]) * L.mask.stride(d);
        rest /= full[d];
      }
      L.mask_off[bh] = off;
    }
  }
  return L;
}

// The keys a query tile [i0, i0 + n) can attend: all, or under is_causal (top-left aligned) the first
// i0 + n; the others have weight 0 and add nothing to any sum.
int64_t key_end(const Layout& L, int64_t i0, int64_t n) {
  return L.kind == MaskKind::causal ? std::min(L.Tk, i0 + n) : L.Tk;
}

// Query rows per tile: kTile, or `tall` where one head's keys and values take more than kTallTileBytes,
// more than a core's L2 cache holds. Then the forward reads them from further away for every query
// tile, and the relevance reads the queries' rows (q, Rn_O, the sums into R_q) for every key tile;
// taller tiles read them less often (one thread, 64 dims per head, T = 8192: forward 348 -> 291 ms with
// 256 rows, relevance 668-677 -> 612-653 ms with 128). Shorter sequences keep kTile rows: no gain at
// T = 4096, and at 1024 taller tiles were slower (under is_causal a tile computes the scores of more
// masked keys on the diagonal). The relevance's three [rows, kKeyTile] buffers limit it to 128 rows.
int64_t query_rows(const Layout& L, int64_t tall, int64_t element_size) {
  return L.Tk * (L.E + L.Ev) * element_size > kTallTileBytes ? tall : kTile;
}

// The first n * cols elements of a scratch buffer, as a contiguous [n, cols] matrix.
Tensor scratch(const Tensor& buf, int64_t n, int64_t cols) {
  return buf.view({-1}).narrow(0, 0, n * cols).view({n, cols});
}

// t itself where its rows (the last dimension) are dense, else a contiguous copy.
Tensor dense_rows(const Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// One head's [T, E] matrix as a contiguous matrix of dtype acc: t itself where it is one, else a copy into
// buf, allocated on first use and reused for every head of the task. (An activation-sized allocation per
// head is returned to the system when freed and its pages are faulted in again by the next one.)
Tensor dense_head(const Tensor& t, Tensor& buf, const at::TensorOptions& acc) {
  if (t.is_contiguous() && t.dtype() == acc.dtype()) return t;
  if (!buf.defined()) buf = at::empty(t.sizes(), acc);
  return buf.copy_(t);
}

// A [..., H, T, E] tensor as [B, H, T, E], with its own strides where its rows (E) are dense (e.g. the
// output and its gradient, laid out [..., T, H, E]). The kernels copy a head's q, k and v into a dense
// [T, E] matrix when it is not one (a row stride of H * E, often a power of two, slows the tiles'
// products), one head at a time.
Tensor as_bhte(const Tensor& t, const Layout& L, int64_t heads) {
  return dense_rows(t).reshape({L.B, heads, t.size(-2), t.size(-1)});
}

// The softmax input x of score s at row i, column j, as the unfused composition builds it: -inf where
// masked, s + mask / scale for a float mask (mask / scale clamped to the dtype's finite range).
template <typename scalar_t, typename acc_t>
struct Scores {
  const Layout& L;
  const scalar_t* fmask = nullptr;
  const bool* bmask = nullptr;
  acc_t lo, hi, scale;

  Scores(const Layout& layout, int64_t bh) : L(layout) {
    lo = static_cast<acc_t>(std::numeric_limits<scalar_t>::lowest());
    hi = static_cast<acc_t>(std::numeric_limits<scalar_t>::max());
    scale = static_cast<acc_t>(L.scale);
    if (L.kind == MaskKind::additive) fmask = L.mask.const_data_ptr<scalar_t>() + L.mask_off[bh];
    if (L.kind == MaskKind::boolean) bmask = L.mask.const_data_ptr<bool>() + L.mask_off[bh];
  }

  acc_t operator()(acc_t s, int64_t i, int64_t j) const {
    constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    switch (L.kind) {
      case MaskKind::none: return s;
      case MaskKind::causal: return j > i ? ninf : s;
      case MaskKind::boolean: return bmask[i * L.mask_sq + j * L.mask_sk] ? s : ninf;
      case MaskKind::additive: {
        const acc_t m = static_cast<acc_t>(fmask[i * L.mask_sq + j * L.mask_sk]);
        if (!std::isfinite(m)) return s + m;
        const acc_t b = m / scale;
        return s + (b < lo ? lo : (b > hi ? hi : b));
      }
    }
    return s;
  }
};

// exp(x) in float for the softmax's shifted inputs x = s - max <= 0, in operations a vector loop can
// take: x = n ln 2 + r with n rounded to the nearest integer (by adding 1.5 * 2^23) and |r| <= ln(2) / 2
// (ln 2 in two parts, exact for |n| < 2^9), exp(r) by a polynomial of degree 7, times 2^n built from its
// exponent bits: within 1 ulp of exp on [-87.33, 0] (20 million points against float64's exp). 0 below
// ln of the smallest normal float (exp(-inf) = 0), NaN for NaN. The forward's weights and the
// relevance's P = exp(x / T - lse) both use it.
inline float exp_of_shifted(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23, whose bits are kRoundBits
  constexpr uint32_t kRoundBits = 0x4B400000u;
  const float t = x * 1.44269504088896341f + kRound;
  const float fn = t - kRound;  // n
  uint32_t t_bits;
  std::memcpy(&t_bits, &t, sizeof t_bits);
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  // the bits of 2^n: n + 127 in the exponent field (unsigned: wraps where x is -inf or NaN, masked below)
  const uint32_t bits = (t_bits - kRoundBits + 127u) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  const float e = y * two_n;
  return x < -87.33654f ? 0.0f : e;
}

// The largest of row[0, n) (-inf for none); NaN is passed over, and makes the row's sum NaN below.
template <typename acc_t>
inline acc_t row_max(const acc_t* row, int64_t n) {
  constexpr int64_t W = 16;
  acc_t part[W];
  std::fill(part, part + W, -std::numeric_limits<acc_t>::infinity());
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    for (int64_t k = 0; k < W; ++k) part[k] = row[j + k] > part[k] ? row[j + k] : part[k];
  }
  for (; j < n; ++j) part[0] = row[j] > part[0] ? row[j] : part[0];
  acc_t m = part[0];
  for (int64_t k = 1; k < W; ++k) m = part[k] > m ? part[k] : m;
  return m;
}

// The sum of row[0, n) in W partial sums, then those in order.
template <typename acc_t>
inline acc_t row_sum(const acc_t* row, int64_t n) {
  constexpr int64_t W = 16;
  acc_t part[W] = {};
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    for (int64_t k = 0; k < W; ++k) part[k] += row[j + k];
  }
  for (; j < n; ++j) part[0] += row[j];
  acc_t total = part[0];
  for (int64_t k = 1; k < W; ++k) total += part[k];
  return total;
}

// The softmax inputs x / T of a tile (rows i0.., columns j0..), in place in p, where a mask is given. With
// a float mask p holds the scores S: x / T = (S + mask / scale) / T element by element. With a boolean
// mask p holds x / T already (the forward multiplies the query tile by 1 / T before its product with the
// keys), and the mask sets -inf where it excludes a key. (Under is_causal online_softmax_tile stops each
// row at the diagonal.)
template <typename scalar_t, typename acc_t>
void softmax_inputs(const Scores<scalar_t, acc_t>& scores, Tensor& p, int64_t i0, int64_t j0, acc_t temp) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const MaskKind kind = scores.L.kind;
  if (kind != MaskKind::boolean && kind != MaskKind::additive) return;
  const int64_t n = p.size(0), tk = p.size(1);
  acc_t* xp = p.mutable_data_ptr<acc_t>();
  for (int64_t r = 0; r < n; ++r) {
    acc_t* row = xp + r * tk;
    for (int64_t j = 0; j < tk; ++j) {
      if (kind == MaskKind::additive) {
        row[j] = scores(row[j], i0 + r, j0 + j) / temp;
      } else if (scores(0, i0 + r, j0 + j) == ninf) {
        row[j] = ninf;
      }
    }
  }
}

// The attention weights P = exp(x / T - lse) of a tile of scores S (rows i0.., columns j0..) into p, 0
// in a row that attends nothing (lse = -inf): x / T - lse in one loop per row (x / T as the unfused
// composition computes it, then the subtraction), in float its exp_of_shifted in the same loop, in double
// torch's exp over the tile after.
template <typename scalar_t, typename acc_t>
LRPCPP_VECTOR_CLONES void weights_from_lse(const Scores<scalar_t, acc_t>& scores, const Tensor& s, Tensor& p,
                                           const acc_t* lse, int64_t i0, int64_t j0, acc_t temp) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  constexpr bool fused = std::is_same_v<acc_t, float>;
  const Layout& L = scores.L;
  const int64_t n = s.size(0), tk = s.size(1);
  for (int64_t r = 0; r < n; ++r) {
    const acc_t* srow = s.const_data_ptr<acc_t>() + r * tk;
    acc_t* prow = p.mutable_data_ptr<acc_t>() + r * tk;
    const acc_t m = lse[i0 + r];
    int64_t end = tk;  // x = -inf from here on (under is_causal)
    if (m == ninf) {
      end = 0;
    } else if (L.kind == MaskKind::none || L.kind == MaskKind::causal) {
      if (L.kind == MaskKind::causal) end = std::clamp<int64_t>(i0 + r + 1 - j0, 0, tk);
      for (int64_t j = 0; j < end; ++j) prow[j] = srow[j] / temp - m;
    } else {
      for (int64_t j = 0; j < tk; ++j) prow[j] = scores(srow[j], i0 + r, j0 + j) / temp - m;
    }
    if constexpr (fused) {
      for (int64_t j = 0; j < end; ++j) prow[j] = exp_of_shifted(prow[j]);
      std::fill(prow + end, prow + tk, acc_t{0});
    } else {
      std::fill(prow + end, prow + tk, ninf);
    }
  }
  if constexpr (!fused) p.exp_();
}

// math::attention_score_relevance over a tile without a float mask (the softmax input is S itself, a
// masked position has P = 0), in one loop with the same order of operations: R_P = P (Rn_O v^T) from
// the product in d and P, then Rn_S = x' (R_P - P c) / stab(s_scale S), x' = S scale, into d. The rule
// sets x' = 0 where P = 0; there R_P - P c = 0 as well (NaN where R_P or c is, as in the rule), so x'
// only has to be finite: it is clamped to the finite range, which changes nothing where P > 0 (S is
// finite there).
template <typename acc_t>
LRPCPP_VECTOR_CLONES void score_relevance(const Tensor& s, const Tensor& p, Tensor& d, const acc_t* c, acc_t inv_t,
                                          acc_t eps, acc_t s_scale) {
  constexpr acc_t lo = std::numeric_limits<acc_t>::lowest(), hi = std::numeric_limits<acc_t>::max();
  const int64_t n = s.size(0), tk = s.size(1);
  const acc_t *sp = s.const_data_ptr<acc_t>(), *pp = p.const_data_ptr<acc_t>();
  acc_t* dp = d.mutable_data_ptr<acc_t>();
  for (int64_t r = 0; r < n; ++r) {
    const acc_t cr = c[r];
    for (int64_t e = r * tk; e < (r + 1) * tk; ++e) {
      const acc_t x = sp[e] * inv_t;
      const acc_t xc = x < lo ? lo : (x > hi ? hi : x);
      const acc_t z = s_scale != 1 ? sp[e] * s_scale : sp[e];
      // stab(z) = z + eps sign(z), sign(0) = +1: z + copysign(eps, z), which differs only at z = -0,
      // where x' = 0 makes the numerator 0 and only the sign of that zero can differ
      dp[e] = (dp[e] * pp[e] - pp[e] * cr) * xc / (z + std::copysign(eps, z));
    }
  }
}

// One key tile of the forward's online softmax, row by row over the tile's softmax inputs x / T in p
// ([n, m]; -inf where masked; row r attends at most its first `diagonal + r` columns): the new
// running maximum (in mx), the factor exp(old - new maximum) of the earlier tiles (alpha), the weights
// exp(x / T - maximum) in place of p (0 where not attended) and the running sum of the weights (l).
// float: exp_of_shifted row by row; double: the tile's shifted inputs, then torch's exp over it.
template <typename acc_t>
LRPCPP_VECTOR_CLONES void online_softmax_tile(Tensor& p, int64_t diagonal, acc_t* mx, acc_t* l, acc_t* alpha,
                                              bool first) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  constexpr bool fused = std::is_same_v<acc_t, float>;
  const int64_t n = p.size(0), m = p.size(1);
  acc_t* pp = p.mutable_data_ptr<acc_t>();
  for (int64_t r = 0; r < n; ++r) {
    acc_t* row = pp + r * m;
    const int64_t end = std::clamp<int64_t>(diagonal + r, 0, m);
    const acc_t old = mx[r], now = std::max(old, row_max(row, end)), shift = now == ninf ? acc_t{0} : now;
    alpha[r] = old == ninf ? 0 : std::exp(old - now);
    mx[r] = now;
    if constexpr (fused) {
      for (int64_t j = 0; j < end; ++j) row[j] = exp_of_shifted(row[j] - shift);
      std::fill(row + end, row + m, acc_t{0});
      const acc_t sum = row_sum(row, m);
      l[r] = first ? sum : l[r] * alpha[r] + sum;
    } else {
      for (int64_t j = 0; j < end; ++j) row[j] -= shift;
      std::fill(row + end, row + m, ninf);
    }
  }
  if constexpr (!fused) {
    p.exp_();
    for (int64_t r = 0; r < n; ++r) {
      const acc_t sum = row_sum(pp + r * m, m);
      l[r] = first ? sum : l[r] * alpha[r] + sum;
    }
  }
}

template <typename scalar_t>
void forward_loop(const Layout& L, const Tensor& q4, const Tensor& k4, const Tensor& v4, Tensor& out4, Tensor& lse3) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = q4.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const acc_t temperature = static_cast<acc_t>(1.0 / L.scale), inv_t = static_cast<acc_t>(L.scale);
  const bool additive = L.kind == MaskKind::additive;
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const int64_t tile = query_rows(L, 256, sizeof(acc_t));
  at::parallel_for(0, L.B * L.Hq, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows = std::min(tile, L.Tq), cols = std::min(kKeyTile, L.Tk);
    Tensor buf = at::empty({rows, cols}, acc), obuf = at::empty({rows, L.Ev}, acc);
    Tensor alphabuf = at::empty({rows}, acc), lbuf = at::empty({rows}, acc);
    Tensor kbuf, vbuf, kf, vf;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / L.Hq, h = bh % L.Hq;
      if (bh == begin || h % L.G == 0) {  // a new key head (G query heads share one)
        kf = dense_head(k4[b][h / L.G], kbuf, acc), vf = dense_head(v4[b][h / L.G], vbuf, acc);
      }
      const Scores<scalar_t, acc_t> scores(L, bh);
      acc_t* lse = lse3[b][h].mutable_data_ptr<acc_t>();
      for (int64_t i0 = 0; i0 < L.Tq; i0 += tile) {
        const int64_t n = std::min(tile, L.Tq - i0), tk = key_end(L, i0, n);
        if (tk == 0) {  // no keys: nothing attended
          std::fill(lse + i0, lse + i0 + n, ninf);
          out4[b][h].narrow(0, i0, n).zero_();
          continue;
        }
        Tensor qt = q4[b][h].narrow(0, i0, n).to(acc);
        if (!additive) qt = qt * inv_t;
        Tensor o = obuf.narrow(0, 0, n), l = lbuf.narrow(0, 0, n);
        acc_t *ap = alphabuf.mutable_data_ptr<acc_t>(), *lp = l.mutable_data_ptr<acc_t>();
        // the online softmax over the key tiles: per row the running maximum (in lse until the end), the
        // sum of exp(x / T - maximum) in l, and the output's numerator in o, rescaled by exp(old - new
        // maximum) when the maximum grows; a row with no attended key so far has maximum -inf, weights
        // exp(-inf - 0) = 0 and sum 0
        std::fill(lse + i0, lse + i0 + n, ninf);
        for (int64_t j0 = 0; j0 < tk; j0 += kKeyTile) {
          const int64_t m = std::min(kKeyTile, tk - j0);
          Tensor p = scratch(buf, n, m);
          at::mm_out(p, qt, kf.narrow(0, j0, m).t());
          softmax_inputs(scores, p, i0, j0, temperature);
          // under is_causal row r attends the first i0 + r + 1 - j0 keys of the tile, else all of them
          const int64_t diagonal = L.kind == MaskKind::causal ? i0 + 1 - j0 : m;
          online_softmax_tile(p, diagonal, lse + i0, lp, ap, j0 == 0);
          if (j0 == 0) {
            at::mm_out(o, p, vf.narrow(0, j0, m));
          } else {
            acc_t* op = o.mutable_data_ptr<acc_t>();
            for (int64_t r = 0; r < n; ++r) {
              for (int64_t e = 0; e < L.Ev; ++e) op[r * L.Ev + e] *= ap[r];
            }
            o.addmm_(p, vf.narrow(0, j0, m));
          }
        }
        // the output o / l and lse = maximum + log(l); a row that attends nothing: output 0, lse -inf
        for (int64_t r = 0; r < n; ++r) {
          if (lse[i0 + r] == ninf) {
            lp[r] = 1;
          } else {
            lse[i0 + r] += std::log(lp[r]);
          }
        }
        out4[b][h].narrow(0, i0, n).copy_(o.div_(l.unsqueeze(1)));
      }
    }
  });
}

template <typename scalar_t>
void relevance_loop(const Layout& L, const Tensor& g4, const Tensor& q4, const Tensor& k4, const Tensor& v4,
                    const Tensor& o4, const Tensor& lse3, double epsilon, std::array<bool, 3> mask, Tensor& rq4,
                    Tensor& dk, Tensor& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = q4.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const double temperature = 1.0 / L.scale;
  const acc_t temp = static_cast<acc_t>(temperature), inv_t = static_cast<acc_t>(1.0 / temperature);
  const acc_t eps = static_cast<acc_t>(epsilon);
  const bool qk = mask[0] || mask[1];
  // the epsilon rule of each product: both operands carry relevance, or only one
  const acc_t o_scale = (qk && mask[2]) ? 2 : 1, s_scale = (mask[0] && mask[1]) ? 2 : 1;
  const bool additive = L.kind == MaskKind::additive;
  const int64_t tile = query_rows(L, 128, sizeof(acc_t));
  at::parallel_for(0, L.B * L.Hq, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows = std::min(tile, L.Tq), cols = std::min(kKeyTile, L.Tk);
    Tensor sbuf = at::empty({rows, cols}, acc), pbuf = at::empty({rows, cols}, acc),
           dbuf = at::empty({rows, cols}, acc);
    // per task, for every query of a head: Rn_O, c and the sum over the keys of Rn_S k
    Tensor rnall = at::empty({L.Tq, L.Ev}, acc), call = at::empty({L.Tq}, acc);
    Tensor rqall = mask[0] ? at::empty({L.Tq, L.E}, acc) : Tensor();
    Tensor kbuf, vbuf, qbuf, kf, vf;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / L.Hq, h = bh % L.Hq;
      if (bh == begin || h % L.G == 0) {  // a new key head (G query heads share one)
        kf = dense_head(k4[b][h / L.G], kbuf, acc), vf = dense_head(v4[b][h / L.G], vbuf, acc);
      }
      const Tensor qf = dense_head(q4[b][h], qbuf, acc);
      const Scores<scalar_t, acc_t> scores(L, bh);
      const acc_t* lse = lse3[b][h].const_data_ptr<acc_t>();
      // Rn_O = R / stab(o_scale O), and c, the row sums of R_P = P (Rn_O v^T): sum_j P_ij (Rn_O v^T)_ij
      // = Rn_O_i . (P v)_i = Rn_O_i . O_i, so c needs no pass over the keys
      {
        const Tensor gt = dense_rows(g4[b][h].to(acc)), ot = dense_rows(o4[b][h].to(acc));
        const int64_t gs = gt.stride(0), os = ot.stride(0);
        const acc_t *gp = gt.const_data_ptr<acc_t>(), *op = ot.const_data_ptr<acc_t>();
        acc_t *rp = rnall.mutable_data_ptr<acc_t>(), *cp = call.mutable_data_ptr<acc_t>();
        for (int64_t r = 0; r < L.Tq; ++r) {
          const acc_t *g = gp + r * gs, *o = op + r * os;
          acc_t* rn = rp + r * L.Ev;
          acc_t total = 0;
          for (int64_t e = 0; e < L.Ev; ++e) {
            rn[e] = math::stab_div<acc_t>(g[e], o[e], eps, o_scale);
            total += rn[e] * o[e];
          }
          cp[r] = total;
        }
      }
      // The keys in tiles of kKeyTile, each met by every query tile that attends it before the next
      // (the key tile's k, v and its sums into dk, dv stay in cache while the queries pass); each sum
      // still runs over the tiles in index order, as the same products of the same shapes.
      for (int64_t j0 = 0; j0 < L.Tk; j0 += kKeyTile) {
        for (int64_t i0 = 0; i0 < L.Tq; i0 += tile) {
          const int64_t n = std::min(tile, L.Tq - i0), tk = key_end(L, i0, n);
          if (j0 >= tk) continue;
          const int64_t m = std::min(kKeyTile, tk - j0);
          const Tensor qt = qf.narrow(0, i0, n), kt = kf.narrow(0, j0, m), vt = vf.narrow(0, j0, m);
          const Tensor rn = rnall.narrow(0, i0, n), c = call.narrow(0, i0, n);
          // S and P, recomputed from the row's log-sum-exp
          Tensor s = scratch(sbuf, n, m), p = scratch(pbuf, n, m);
          at::mm_out(s, qt, kt.t());
          const acc_t* sp = s.const_data_ptr<acc_t>();
          acc_t* pp = p.mutable_data_ptr<acc_t>();
          weights_from_lse(scores, s, p, lse, i0, j0, temp);
          if (mask[2]) dv[b][h].narrow(0, j0, m).addmm_(p.t(), rn);
          if (!qk) continue;
          // Rn_O v^T, then R_P = P (Rn_O v^T) and Rn_S element by element
          Tensor d = scratch(dbuf, n, m);
          at::mm_out(d, rn, vt.t());
          if (!additive) {
            score_relevance(s, p, d, c.const_data_ptr<acc_t>(), inv_t, eps, s_scale);
          } else {
            acc_t* dp = d.mutable_data_ptr<acc_t>();
            const acc_t* cp = c.const_data_ptr<acc_t>();
            for (int64_t r = 0; r < n; ++r) {
              for (int64_t j = 0; j < m; ++j) {
                const acc_t sv = sp[r * m + j];
                dp[r * m + j] = math::attention_score_relevance<acc_t>(sv, scores(sv, i0 + r, j0 + j), pp[r * m + j],
                                                                       dp[r * m + j] * pp[r * m + j], cp[r], inv_t, eps,
                                                                       s_scale, true);
              }
            }
          }
          if (mask[0]) {
            Tensor rq = rqall.narrow(0, i0, n);
            if (j0 == 0) {
              at::mm_out(rq, d, kt);
            } else {
              rq.addmm_(d, kt);
            }
          }
          if (mask[1]) dk[b][h].narrow(0, j0, m).addmm_(d.t(), qt);
        }
      }
      // every query tile attends a key here (T_k > 0, and the first i0 + n under is_causal)
      if (mask[0]) {
        Tensor rqt = rq4[b][h];
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          at::mul_out(rqt, rqall, qf);
        } else {
          rqt.copy_(rqall.mul_(qf));
        }
      }
    }
  });
}

// Where the sums dk / dv over the query heads that share a key head are accumulated: where each key head
// has one query head and x's dtype is the accumulation dtype, in the relevance's own memory (x's layout,
// impl::empty_attention_relevance), then multiplied by x in place; else in a [B, Hq, T, E] buffer of the
// accumulation dtype.
bool sums_in_place(const Layout& L, const Tensor& x, const at::TensorOptions& acc) {
  return L.G == 1 && x.dtype() == acc.dtype();
}

// Zeroed sums for x (key or value), shaped as x (see sums_in_place) or [B, Hq, T, E].
Tensor zeroed_sums(const Layout& L, const Tensor& x, const at::TensorOptions& acc) {
  if (sums_in_place(L, x, acc)) return impl::empty_attention_relevance(x).zero_();
  return at::zeros({L.B, L.Hq, x.size(-2), x.size(-1)}, acc);
}

// The relevance of x: its sums over the query heads that share a key head, times x itself, in x's layout.
Tensor grouped_times_input(const Tensor& sums, const Layout& L, const Tensor& x) {
  if (sums_in_place(L, x, sums.options())) return sums.mul_(x);
  Tensor g = L.G == 1 ? sums : sums.view({L.B, L.Hk, L.G, sums.size(2), sums.size(3)}).sum(2);
  g = g.view(x.sizes());
  Tensor out = impl::empty_attention_relevance(x);
  if (g.scalar_type() == x.scalar_type()) return at::mul_out(out, g, x);
  return out.copy_(g.mul_(x));
}

std::vector<int64_t> output_shape(const Tensor& q, const Tensor& v) {
  std::vector<int64_t> shape(q.sizes().begin(), q.sizes().end());
  shape.back() = v.size(-1);
  return shape;
}

TensorPair attention_forward_cpu(const Tensor& query, const Tensor& key, const Tensor& value,
                                 const OptTensor& attn_mask, bool is_causal, std::optional<double> scale,
                                 bool enable_gqa) {
  impl::check_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa,
                        "lrpcpp.scaled_dot_product_attention_forward");
  const Layout L = make_layout(query, key, value, attn_mask, is_causal, scale);
  const auto stat = query.options().dtype(impl::attention_stat_dtype(query.scalar_type()));
  const auto shape = output_shape(query, value);
  Tensor out = impl::empty_attention_output(c10::fromIntArrayRefSlow(shape), query.options());
  Tensor lse = at::empty({L.B, L.Hq, L.Tq}, stat);
  if (out.numel() > 0 || lse.numel() > 0) {
    const Tensor q4 = as_bhte(query, L, L.Hq), k4 = as_bhte(key, L, L.Hk), v4 = as_bhte(value, L, L.Hk);
    Tensor out4 = out.view({L.B, L.Hq, L.Tq, L.Ev});  // (in the output's layout)
    LRPCPP_DISPATCH_FLOATING(query.scalar_type(), "lrpcpp_attention_forward_cpu",
                             [&] { forward_loop<scalar_t>(L, q4, k4, v4, out4, lse); });
  }
  return {out, lse.view(query.sizes().slice(0, query.dim() - 1))};
}

TensorTriple attention_relevance_cpu(const Tensor& grad, const Tensor& query, const Tensor& key, const Tensor& value,
                                     const OptTensor& attn_mask, const Tensor& output, const Tensor& logsumexp,
                                     bool is_causal, std::optional<double> scale, bool enable_gqa, double epsilon,
                                     std::array<bool, 3> output_mask) {
  impl::check_attention_relevance(grad, query, key, value, attn_mask, output, logsumexp, is_causal, scale, enable_gqa,
                                  epsilon);
  Tensor rq, rk, rv;
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {rq, rk, rv};
  const Layout L = make_layout(query, key, value, attn_mask, is_causal, scale);
  const auto acc = query.options().dtype(impl::attention_stat_dtype(query.scalar_type()));
  if (output_mask[0]) rq = impl::empty_attention_relevance(query).zero_();
  Tensor rq4 = output_mask[0] ? rq.view({L.B, L.Hq, L.Tq, L.E}) : Tensor();
  const Tensor dk = output_mask[1] ? zeroed_sums(L, key, acc) : Tensor();
  const Tensor dv = output_mask[2] ? zeroed_sums(L, value, acc) : Tensor();
  Tensor dk4 = output_mask[1] ? dk.view({L.B, L.Hq, L.Tk, L.E}) : Tensor();
  Tensor dv4 = output_mask[2] ? dv.view({L.B, L.Hq, L.Tk, L.Ev}) : Tensor();
  if (query.numel() > 0 && key.numel() > 0 && value.numel() > 0 && output.numel() > 0) {
    const Tensor q4 = as_bhte(query, L, L.Hq), k4 = as_bhte(key, L, L.Hk), v4 = as_bhte(value, L, L.Hk);
    const Tensor g4 = as_bhte(grad, L, L.Hq), o4 = as_bhte(output, L, L.Hq);
    const Tensor lse3 = logsumexp.contiguous().view({L.B, L.Hq, L.Tq});
    LRPCPP_DISPATCH_FLOATING(query.scalar_type(), "lrpcpp_attention_relevance_cpu", [&] {
      relevance_loop<scalar_t>(L, g4, q4, k4, v4, o4, lse3, epsilon, output_mask, rq4, dk4, dv4);
    });
  }
  if (output_mask[1]) rk = grouped_times_input(dk, L, key);
  if (output_mask[2]) rv = grouped_times_input(dv, L, value);
  return {rq, rk, rv};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, CPU, m) {
  m.impl("scaled_dot_product_attention_forward", &attention_forward_cpu);
  m.impl("scaled_dot_product_attention_relevance", &attention_relevance_cpu);
}

}  // namespace lrpcpp
