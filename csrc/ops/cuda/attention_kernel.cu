// CUDA kernels of the fused attention (see ops/attention.cpp for the rule). One thread per query row
// (the forward with an online softmax, and the relevance of q) or per key row (the relevance of k
// and v, over the query heads that share the key head, so no atomics), kBlock rows per block; the
// rows of the other side stream through shared memory in tiles of kBlock. A thread keeps its q / k
// row, its accumulators and its normalised relevance in registers (head sizes up to kMaxHead);
// arithmetic in float32 for float16 / bfloat16 (float64 for float64). Nothing of size T_q x T_k is
// stored: the backward recomputes each score from q, k and the forward's log-sum-exp.
#include <torch/library.h>

#include <limits>
#include <type_traits>

#include "../impl.h"
#include "../rule_math.h"
#include "cuda_utils.cuh"

namespace lrpcpp {
namespace {

constexpr int kBlock = 64;
constexpr int kMaxHead = 128;
constexpr int kMaxLead = 8;

enum MaskKind : int { kNone = 0, kCausal = 1, kBool = 2, kAdditive = 3 };

struct Params {
  int64_t Hq, Hk, G, Tq, Tk, E, Ev;
  int kind;
  const void* mask;
  // the mask expanded to [..., Hq, Tq, Tk]: sizes and strides of its leading dims (those of a
  // (batch, head) block), and the strides of its last two
  int nlead;
  int64_t lead_size[kMaxLead], lead_stride[kMaxLead];
  int64_t msq, msk;
  double scale, epsilon;
  bool mask_q, mask_k, mask_v;
};

__device__ __forceinline__ int64_t mask_offset(const Params& p, int64_t bh) {
  int64_t off = 0;
  for (int d = p.nlead - 1; d >= 0; --d) {
    off += (bh % p.lead_size[d]) * p.lead_stride[d];
    bh /= p.lead_size[d];
  }
  return off;
}

// The softmax input of score s (row i, column j): -inf where masked, s + mask / scale (clamped to the
// dtype's finite range) for a float mask, as the unfused composition builds it.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t score_input(const Params& p, int64_t moff, acc_t s, int64_t i, int64_t j) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  switch (p.kind) {
    case kCausal: return j > i ? ninf : s;
    case kBool: return static_cast<const bool*>(p.mask)[moff + i * p.msq + j * p.msk] ? s : ninf;
    case kAdditive: {
      const acc_t m = static_cast<acc_t>(static_cast<const scalar_t*>(p.mask)[moff + i * p.msq + j * p.msk]);
      if (!isfinite(m)) return s + m;
      const acc_t lo = static_cast<acc_t>(std::numeric_limits<scalar_t>::lowest());
      const acc_t hi = static_cast<acc_t>(std::numeric_limits<scalar_t>::max());
      const acc_t b = m / static_cast<acc_t>(p.scale);
      return s + (b < lo ? lo : (b > hi ? hi : b));
    }
    default: return s;
  }
}

// The keys a block of query rows can attend: all, or under is_causal (top-left aligned) those up to
// its last row; and the first query row a block of key rows can be attended by.
__device__ __forceinline__ int64_t key_end(const Params& p) {
  return p.kind == kCausal ? std::min<int64_t>(p.Tk, (static_cast<int64_t>(blockIdx.x) + 1) * kBlock) : p.Tk;
}

__device__ __forceinline__ int64_t query_begin(const Params& p) {
  return p.kind == kCausal ? std::min<int64_t>(p.Tq, static_cast<int64_t>(blockIdx.x) * kBlock) : 0;
}

template <typename acc_t, typename scalar_t, int D>
__device__ __forceinline__ void load_row(acc_t (&r)[D], const scalar_t* src, int64_t n) {
#pragma unroll
  for (int e = 0; e < D; ++e) r[e] = e < n ? static_cast<acc_t>(src[e]) : acc_t(0);
}

template <typename acc_t, int D>
__device__ __forceinline__ acc_t dot(const acc_t (&r)[D], const acc_t* row, int64_t n) {
  acc_t s = 0;
#pragma unroll
  for (int e = 0; e < D; ++e)
    if (e < n) s += r[e] * row[e];
  return s;
}

// kBlock rows of a [rows, n] matrix into shared memory, from row r0 (zero rows past `rows`).
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ void load_tile(acc_t* dst, const scalar_t* src, int64_t r0, int64_t rows, int64_t n) {
  const int64_t count = std::min<int64_t>(kBlock, rows - r0) * n;
  for (int64_t t = threadIdx.x; t < count; t += blockDim.x) dst[t] = static_cast<acc_t>(src[r0 * n + t]);
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kBlock)
    attention_forward_kernel(Params p, const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                             const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                             at::opmath_type<scalar_t>* __restrict__ lse) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* ks = reinterpret_cast<acc_t*>(smem);
  acc_t* vs = ks + kBlock * p.E;
  const int64_t bh = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq, kvh = b * p.Hk + h / p.G;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  const bool active = i < p.Tq;
  const int64_t moff = p.kind >= kBool ? mask_offset(p, bh) : 0;
  const acc_t temperature = static_cast<acc_t>(1.0 / p.scale);
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  acc_t qr[D], o[D];
  load_row(qr, q + (bh * p.Tq + (active ? i : 0)) * p.E, p.E);
#pragma unroll
  for (int e = 0; e < D; ++e) o[e] = 0;
  acc_t m = ninf, l = 0;
  const scalar_t* kb = k + kvh * p.Tk * p.E;
  const scalar_t* vb = v + kvh * p.Tk * p.Ev;
  const int64_t tk = key_end(p);
  for (int64_t j0 = 0; j0 < tk; j0 += kBlock) {
    __syncthreads();
    load_tile(ks, kb, j0, p.Tk, p.E);
    load_tile(vs, vb, j0, p.Tk, p.Ev);
    __syncthreads();
    if (!active) continue;
    const int64_t n = std::min<int64_t>(kBlock, tk - j0);
    for (int64_t jj = 0; jj < n; ++jj) {
      const acc_t x = score_input<scalar_t, acc_t>(p, moff, dot(qr, ks + jj * p.E, p.E), i, j0 + jj);
      if (x == ninf) continue;
      const acc_t y = x / temperature;
      if (y > m) {  // online softmax: rescale what was summed so far to the new maximum
        const acc_t corr = std::exp(m - y);
        l *= corr;
#pragma unroll
        for (int e = 0; e < D; ++e) o[e] *= corr;
        m = y;
      }
      const acc_t w = std::exp(y - m);
      l += w;
#pragma unroll
      for (int e = 0; e < D; ++e)
        if (e < p.Ev) o[e] += w * vs[jj * p.Ev + e];
    }
  }
  if (!active) return;
  scalar_t* orow = out + (bh * p.Tq + i) * p.Ev;
  const bool empty = m == ninf;  // no attended position: output 0
#pragma unroll
  for (int e = 0; e < D; ++e)
    if (e < p.Ev) orow[e] = static_cast<scalar_t>(empty ? acc_t(0) : o[e] / l);
  lse[bh * p.Tq + i] = empty ? ninf : m + std::log(l);
}

// Rn_O of one query row, in registers.
template <typename acc_t, typename scalar_t, int D>
__device__ __forceinline__ void normalised_relevance(acc_t (&rn)[D], const scalar_t* g, const scalar_t* o, int64_t n,
                                                     acc_t eps, acc_t o_scale) {
#pragma unroll
  for (int e = 0; e < D; ++e)
    rn[e] = e < n ? math::stab_div<acc_t>(static_cast<acc_t>(g[e]), static_cast<acc_t>(o[e]), eps, o_scale) : acc_t(0);
}

template <typename acc_t>
__device__ __forceinline__ acc_t weight(acc_t x, acc_t temperature, acc_t l) {
  return l == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : std::exp(x / temperature - l);
}

// Query side: c_i = sum_j R_P[i, j] (for the key side), and R_q = (Rn_S k) q.
template <typename scalar_t, int D>
__global__ void __launch_bounds__(kBlock)
    attention_query_kernel(Params p, const scalar_t* __restrict__ grad, const scalar_t* __restrict__ q,
                           const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                           const scalar_t* __restrict__ out, const at::opmath_type<scalar_t>* __restrict__ lse,
                           at::opmath_type<scalar_t>* __restrict__ c_out, scalar_t* __restrict__ rq) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* ks = reinterpret_cast<acc_t*>(smem);
  acc_t* vs = ks + kBlock * p.E;
  const int64_t bh = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq, kvh = b * p.Hk + h / p.G;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  const bool active = i < p.Tq;
  const int64_t row = bh * p.Tq + (active ? i : 0);
  const int64_t moff = p.kind >= kBool ? mask_offset(p, bh) : 0;
  const double t = 1.0 / p.scale;
  const acc_t temperature = static_cast<acc_t>(t), inv_t = static_cast<acc_t>(1.0 / t);
  const acc_t eps = static_cast<acc_t>(p.epsilon);
  const acc_t o_scale = p.mask_v ? 2 : 1, s_scale = (p.mask_q && p.mask_k) ? 2 : 1;
  acc_t qr[D], rn[D], dq[D];
  load_row(qr, q + row * p.E, p.E);
  normalised_relevance(rn, grad + row * p.Ev, out + row * p.Ev, p.Ev, eps, o_scale);
#pragma unroll
  for (int e = 0; e < D; ++e) dq[e] = 0;
  const acc_t l = lse[row];
  const scalar_t* kb = k + kvh * p.Tk * p.E;
  const scalar_t* vb = v + kvh * p.Tk * p.Ev;
  acc_t c = 0;
  const int64_t tk = key_end(p);
  for (int pass = 0; pass < (p.mask_q ? 2 : 1); ++pass) {
    for (int64_t j0 = 0; j0 < tk; j0 += kBlock) {
      __syncthreads();
      load_tile(ks, kb, j0, p.Tk, p.E);
      load_tile(vs, vb, j0, p.Tk, p.Ev);
      __syncthreads();
      if (!active) continue;
      const int64_t n = std::min<int64_t>(kBlock, tk - j0);
      for (int64_t jj = 0; jj < n; ++jj) {
        const acc_t s = dot(qr, ks + jj * p.E, p.E);
        const acc_t x = score_input<scalar_t, acc_t>(p, moff, s, i, j0 + jj);
        const acc_t w = weight(x, temperature, l);
        const acc_t r_p = w * dot(rn, vs + jj * p.Ev, p.Ev);
        if (pass == 0) {
          c += r_p;
          continue;
        }
        const acc_t rns =
            math::attention_score_relevance<acc_t>(s, x, w, r_p, c, inv_t, eps, s_scale, p.kind == kAdditive);
#pragma unroll
        for (int e = 0; e < D; ++e)
          if (e < p.E) dq[e] += rns * ks[jj * p.E + e];
      }
    }
  }
  if (!active) return;
  c_out[row] = c;
  if (p.mask_q) {
#pragma unroll
    for (int e = 0; e < D; ++e)
      if (e < p.E) rq[row * p.E + e] = static_cast<scalar_t>(dq[e] * qr[e]);
  }
}

// Key side: R_k = (Rn_S^T q) k and R_v = (P^T Rn_O) v for one key row, summed over the query heads
// of its key head.
template <typename scalar_t, int D>
__global__ void __launch_bounds__(kBlock)
    attention_key_kernel(Params p, const scalar_t* __restrict__ grad, const scalar_t* __restrict__ q,
                         const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                         const scalar_t* __restrict__ out, const at::opmath_type<scalar_t>* __restrict__ lse,
                         const at::opmath_type<scalar_t>* __restrict__ c_in, scalar_t* __restrict__ rk,
                         scalar_t* __restrict__ rv) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* qs = reinterpret_cast<acc_t*>(smem);
  acc_t* rns = qs + kBlock * p.E;
  acc_t* ls = rns + kBlock * p.Ev;
  acc_t* cs = ls + kBlock;
  const int64_t kvh = blockIdx.y, b = kvh / p.Hk, hk = kvh % p.Hk;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  const bool active = j < p.Tk;
  const int64_t krow = kvh * p.Tk + (active ? j : 0);
  const double t = 1.0 / p.scale;
  const acc_t temperature = static_cast<acc_t>(t), inv_t = static_cast<acc_t>(1.0 / t);
  const acc_t eps = static_cast<acc_t>(p.epsilon);
  const bool qk = p.mask_q || p.mask_k;
  const acc_t o_scale = (qk && p.mask_v) ? 2 : 1, s_scale = (p.mask_q && p.mask_k) ? 2 : 1;
  acc_t kr[D], vr[D], dk[D], dv[D];
  load_row(kr, k + krow * p.E, p.E);
  load_row(vr, v + krow * p.Ev, p.Ev);
#pragma unroll
  for (int e = 0; e < D; ++e) dk[e] = dv[e] = 0;
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t bh = b * p.Hq + hk * p.G + g;
    const int64_t moff = p.kind >= kBool ? mask_offset(p, bh) : 0;
    for (int64_t i0 = query_begin(p); i0 < p.Tq; i0 += kBlock) {
      const int64_t n = std::min<int64_t>(kBlock, p.Tq - i0);
      __syncthreads();
      load_tile(qs, q + bh * p.Tq * p.E, i0, p.Tq, p.E);
      for (int64_t t2 = threadIdx.x; t2 < n * p.Ev; t2 += blockDim.x) {
        const int64_t at = (bh * p.Tq + i0) * p.Ev + t2;
        rns[t2] = math::stab_div<acc_t>(static_cast<acc_t>(grad[at]), static_cast<acc_t>(out[at]), eps, o_scale);
      }
      for (int64_t t2 = threadIdx.x; t2 < n; t2 += blockDim.x) {
        ls[t2] = lse[bh * p.Tq + i0 + t2];
        cs[t2] = qk ? c_in[bh * p.Tq + i0 + t2] : acc_t(0);
      }
      __syncthreads();
      if (!active) continue;
      for (int64_t ii = 0; ii < n; ++ii) {
        const acc_t* qrow = qs + ii * p.E;
        const acc_t* rnrow = rns + ii * p.Ev;
        const acc_t s = dot(kr, qrow, p.E);
        const acc_t x = score_input<scalar_t, acc_t>(p, moff, s, i0 + ii, j);
        const acc_t w = weight(x, temperature, ls[ii]);
        if (p.mask_v) {
#pragma unroll
          for (int e = 0; e < D; ++e)
            if (e < p.Ev) dv[e] += w * rnrow[e];
        }
        if (p.mask_k) {
          const acc_t r_p = w * dot(vr, rnrow, p.Ev);
          const acc_t rn_s =
              math::attention_score_relevance<acc_t>(s, x, w, r_p, cs[ii], inv_t, eps, s_scale, p.kind == kAdditive);
#pragma unroll
          for (int e = 0; e < D; ++e)
            if (e < p.E) dk[e] += rn_s * qrow[e];
        }
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int e = 0; e < D; ++e) {
    if (p.mask_k && e < p.E) rk[krow * p.E + e] = static_cast<scalar_t>(dk[e] * kr[e]);
    if (p.mask_v && e < p.Ev) rv[krow * p.Ev + e] = static_cast<scalar_t>(dv[e] * vr[e]);
  }
}

// The kernels' view of the arguments: [B, H, T, E] extents and the mask's addressing.
Params make_params(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& attn_mask, bool is_causal,
                   std::optional<double> scale, const char* op) {
  Params p{};
  p.Hq = q.dim() >= 3 ? q.size(-3) : 1;
  p.Hk = k.dim() >= 3 ? k.size(-3) : 1;
  p.G = p.Hk > 0 ? p.Hq / p.Hk : 1;
  p.Tq = q.size(-2);
  p.Tk = k.size(-2);
  p.E = q.size(-1);
  p.Ev = v.size(-1);
  // no division by zero for an empty head (E = 0: nothing to compute, and a process with floating-point
  // traps enabled must not stop)
  p.scale = scale.has_value() ? *scale : (p.E > 0 ? 1.0 / std::sqrt(static_cast<double>(p.E)) : 1.0);
  TORCH_CHECK(p.E <= kMaxHead && p.Ev <= kMaxHead, op, ": the CUDA kernel takes head sizes up to ", kMaxHead,
              ", got query [..., ", p.E, "] and value [..., ", p.Ev, "]");
  p.kind = is_causal ? kCausal : kNone;
  if (attn_mask.has_value()) {
    TORCH_CHECK(q.dim() - 2 <= kMaxLead, op, ": the CUDA kernel takes at most ", kMaxLead,
                " batch and head dimensions, got query of shape ", detail::shape_str(q));
    p.kind = attn_mask->scalar_type() == at::kBool ? kBool : kAdditive;
    std::vector<int64_t> full(q.sizes().begin(), q.sizes().end());
    full.back() = p.Tk;
    const Tensor m = attn_mask->expand(full);
    p.mask = m.const_data_ptr();
    p.nlead = static_cast<int>(q.dim()) - 2;
    for (int d = 0; d < p.nlead; ++d) {
      p.lead_size[d] = full[d];
      p.lead_stride[d] = m.stride(d);
    }
    p.msq = m.stride(-2);
    p.msk = m.stride(-1);
  }
  return p;
}

// Dynamic shared memory past the default 48 KiB (head sizes near kMaxHead, float64) is opted into.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

template <typename F>
void with_head_size(int64_t size, const F& f) {
  if (size <= 32) {
    f(std::integral_constant<int, 32>{});
  } else if (size <= 64) {
    f(std::integral_constant<int, 64>{});
  } else {
    f(std::integral_constant<int, kMaxHead>{});
  }
}

dim3 grid(int64_t rows, int64_t heads, const char* op) {
  TORCH_CHECK(heads <= 65535, op, ": too many batch x head blocks (", heads, ") for one CUDA launch");
  return dim3(static_cast<unsigned>((rows + kBlock - 1) / kBlock), static_cast<unsigned>(heads));
}

TensorPair attention_forward_cuda(const Tensor& query, const Tensor& key, const Tensor& value,
                                  const OptTensor& attn_mask, bool is_causal, std::optional<double> scale,
                                  bool enable_gqa) {
  const char* op = "lrpcpp.scaled_dot_product_attention_forward";
  impl::check_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa, op);
  const c10::cuda::CUDAGuard guard(query.device());
  const Params p = make_params(query, key, value, attn_mask, is_causal, scale, op);
  auto shape = query.sizes().vec();
  shape.back() = p.Ev;
  Tensor out = impl::empty_attention_output(c10::fromIntArrayRefSlow(shape), query.options());
  Tensor lse = at::empty(query.sizes().slice(0, query.dim() - 1),
                         query.options().dtype(impl::attention_stat_dtype(query.scalar_type())));
  if (lse.numel() == 0) return {out, lse};
  // the kernel writes [..., H, T_q, E_v] densely; copied into the output's layout after it
  Tensor dense = out.is_contiguous() ? out : at::empty(shape, query.options());
  const Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  const int64_t heads = lse.numel() / p.Tq;
  LRPCPP_DISPATCH_FLOATING(query.scalar_type(), "lrpcpp_attention_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = kBlock * (p.E + p.Ev) * sizeof(acc_t);
    with_head_size(std::max(p.E, p.Ev), [&](auto d) {
      allow_shared_memory(attention_forward_kernel<scalar_t, decltype(d)::value>, smem);
      attention_forward_kernel<scalar_t, decltype(d)::value><<<grid(p.Tq, heads, op), kBlock, smem, cuda::stream()>>>(
          p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
          dense.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (!dense.is_same(out)) out.copy_(dense);
  return {out, lse};
}

TensorTriple attention_relevance_cuda(const Tensor& grad, const Tensor& query, const Tensor& key, const Tensor& value,
                                      const OptTensor& attn_mask, const Tensor& output, const Tensor& logsumexp,
                                      bool is_causal, std::optional<double> scale, bool enable_gqa, double epsilon,
                                      std::array<bool, 3> output_mask) {
  const char* op = "lrpcpp.scaled_dot_product_attention_relevance";
  impl::check_attention_relevance(grad, query, key, value, attn_mask, output, logsumexp, is_causal, scale, enable_gqa,
                                  epsilon);
  Tensor rq, rk, rv;
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {rq, rk, rv};
  const c10::cuda::CUDAGuard guard(query.device());
  Params p = make_params(query, key, value, attn_mask, is_causal, scale, op);
  p.epsilon = epsilon;
  p.mask_q = output_mask[0];
  p.mask_k = output_mask[1];
  p.mask_v = output_mask[2];
  if (p.mask_q) rq = at::zeros_like(query, at::MemoryFormat::Contiguous);
  if (p.mask_k) rk = at::zeros_like(key, at::MemoryFormat::Contiguous);
  if (p.mask_v) rv = at::zeros_like(value, at::MemoryFormat::Contiguous);
  // the kernels write contiguous tensors; the op returns them in the inputs' layouts (a copy only for an
  // input laid out by position)
  const auto laid_out = [&] {
    const auto as_input = [](const Tensor& r, const Tensor& x) {
      return r.defined() && impl::attention_laid_out_by_position(x) ? impl::empty_attention_relevance(x).copy_(r) : r;
    };
    return TensorTriple{as_input(rq, query), as_input(rk, key), as_input(rv, value)};
  };
  if (logsumexp.numel() == 0 || p.Tk == 0) return laid_out();
  const Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  const Tensor g = grad.contiguous(), o = output.contiguous(), lse = logsumexp.contiguous();
  const int64_t qheads = lse.numel() / p.Tq, kheads = qheads / p.G;
  const bool qk = p.mask_q || p.mask_k;
  Tensor c = at::empty_like(lse);
  LRPCPP_DISPATCH_FLOATING(query.scalar_type(), "lrpcpp_attention_relevance_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_head_size(std::max(p.E, p.Ev), [&](auto d) {
      constexpr int D = decltype(d)::value;
      if (qk) {
        const size_t smem = kBlock * (p.E + p.Ev) * sizeof(acc_t);
        allow_shared_memory(attention_query_kernel<scalar_t, D>, smem);
        attention_query_kernel<scalar_t, D><<<grid(p.Tq, qheads, op), kBlock, smem, cuda::stream()>>>(
            p, g.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
            v.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(),
            c.mutable_data_ptr<acc_t>(), p.mask_q ? rq.mutable_data_ptr<scalar_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (p.mask_k || p.mask_v) {
        const size_t smem = kBlock * (p.E + p.Ev + 2) * sizeof(acc_t);
        allow_shared_memory(attention_key_kernel<scalar_t, D>, smem);
        attention_key_kernel<scalar_t, D><<<grid(p.Tk, kheads, op), kBlock, smem, cuda::stream()>>>(
            p, g.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
            v.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(),
            c.const_data_ptr<acc_t>(), p.mask_k ? rk.mutable_data_ptr<scalar_t>() : nullptr,
            p.mask_v ? rv.mutable_data_ptr<scalar_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return laid_out();
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, CUDA, m) {
  m.impl("scaled_dot_product_attention_forward", &attention_forward_cuda);
  m.impl("scaled_dot_product_attention_relevance", &attention_relevance_cuda);
}

}  // namespace lrpcpp
