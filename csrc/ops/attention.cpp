// Fused scaled dot-product attention with the explicit AttnLRP rules.
//
// The forward is softmax(q k^T * scale + mask) v, as torch's F.scaled_dot_product_attention, and
// also returns the log-sum-exp of each row of the softmax. The relevance op computes exactly the
// relevance of the unfused composition matmul -> (mask) -> softmax -> matmul (RULES.md section 1),
// with R the relevance of the output O, S = q k^T, x = S + mask / scale (the softmax input, -inf
// where masked), P = softmax(x * scale):
//   Rn_O = R / stab(2 O)                          (R / stab(O) when only one of P, v carries)
//   R_v  = (P^T Rn_O) v,   R_P = P (Rn_O v^T)
//   R_x  = x' (R_P - P c),  x' = x * scale (0 where masked), c_i = sum_j R_P[i, j]   (Prop. 3.1)
//   R_S  = S R_x / stab(x) with a float mask (a constant bias of add2), else R_x
//   Rn_S = R_S / stab(2 S)                        (R_S / stab(S) when only one of q, k carries)
//   R_q  = (Rn_S k) q,     R_k = (Rn_S^T q) k     (summed over the query heads of a GQA key head)
// No kernel holds the [T_q, T_k] matrices of all rows at once: a kernel handles one query tile at a
// time and recomputes its scores from q, k and the saved log-sum-exp, so what the backward keeps is
// q, k, v, the mask, the output and the row statistics: O(T E), and O(T * tile) of scratch per thread.
#include <utility>
#include <vector>

#include "impl.h"

namespace lrpcpp {

Tensor scaled_dot_product_attention(const Tensor& query, const Tensor& key, const Tensor& value,
                                    const OptTensor& attn_mask, bool is_causal, std::optional<double> scale,
                                    bool enable_gqa, c10::string_view method, double epsilon) {
  LRPCPP_DISPATCH(scaled_dot_product_attention);
  return op.call(query, key, value, attn_mask, is_causal, scale, enable_gqa, method, epsilon);
}

TensorPair scaled_dot_product_attention_forward(const Tensor& query, const Tensor& key, const Tensor& value,
                                                const OptTensor& attn_mask, bool is_causal, std::optional<double> scale,
                                                bool enable_gqa) {
  LRPCPP_DISPATCH(scaled_dot_product_attention_forward);
  return op.call(query, key, value, attn_mask, is_causal, scale, enable_gqa);
}

TensorTriple scaled_dot_product_attention_relevance(const Tensor& grad, const Tensor& query, const Tensor& key,
                                                    const Tensor& value, const OptTensor& attn_mask,
                                                    const Tensor& output, const Tensor& logsumexp, bool is_causal,
                                                    std::optional<double> scale, bool enable_gqa, double epsilon,
                                                    std::array<bool, 3> output_mask) {
  LRPCPP_DISPATCH(scaled_dot_product_attention_relevance);
  return op.call(grad, query, key, value, attn_mask, output, logsumexp, is_causal, scale, enable_gqa, epsilon,
                 output_mask);
}

namespace impl {
using namespace detail;

void check_attention(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& attn_mask, bool is_causal,
                     std::optional<double> scale, bool enable_gqa, const char* op) {
  check_floating(q, op, "query");
  check_like(k, q, op, "key", "query");
  check_like(v, q, op, "value", "query");
  const int64_t nd = q.dim();
  TORCH_CHECK(nd >= 2 && k.dim() == nd && v.dim() == nd, op,
              ": expected query [..., H, T_q, E], key [..., H_k, T_k, E] and value [..., H_k, T_k, E_v] with the "
              "same number (>= 2) of dimensions, got shapes ",
              shape_str(q), ", ", shape_str(k), " and ", shape_str(v));
  for (int64_t d = 0; d < nd - 3; ++d) {
    TORCH_SYM_CHECK(q.sym_size(d).sym_eq(k.sym_size(d)).sym_and(q.sym_size(d).sym_eq(v.sym_size(d))), op,
                    ": expected query, key and value to have the same batch dimensions, got shapes ", shape_str(q),
                    ", ", shape_str(k), " and ", shape_str(v));
  }
  TORCH_SYM_CHECK(q.sym_size(-1).sym_eq(k.sym_size(-1)), op,
                  ": expected query and key to have the same embedding size (last dimension), got shapes ",
                  shape_str(q), " and ", shape_str(k));
  TORCH_SYM_CHECK(k.sym_size(-2).sym_eq(v.sym_size(-2)), op,
                  ": expected key and value to have the same sequence length (dimension -2), got shapes ", shape_str(k),
                  " and ", shape_str(v));
  if (nd >= 3) {
    TORCH_SYM_CHECK(k.sym_size(-3).sym_eq(v.sym_size(-3)), op,
                    ": expected key and value to have the same number of heads (dimension -3), got shapes ",
                    shape_str(k), " and ", shape_str(v));
    const auto& hq = q.sym_size(-3);
    const auto& hk = k.sym_size(-3);
    if (enable_gqa) {
      // hk > 0 checked first: hq % hk with hk = 0 would be an integer division by zero
      const auto not_grouped = [&] {
        return c10::str(op,
                        ": expected the number of query heads to be a multiple of the number of key/value heads "
                        "(enable_gqa=True), got query ",
                        shape_str(q), " and key ", shape_str(k));
      };
      TORCH_SYM_CHECK(hk.sym_gt(0), not_grouped());
      TORCH_SYM_CHECK((hq % hk).sym_eq(0), not_grouped());
    } else {
      TORCH_SYM_CHECK(hq.sym_eq(hk), op,
                      ": expected query and key to have the same number of heads (dimension -3), got query ",
                      shape_str(q), " and key ", shape_str(k), " (pass enable_gqa=True for grouped-query attention)");
    }
  }
  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale) && *scale > 0.0, op, ": expected scale to be a finite number > 0, got ", *scale);
  }
  if (attn_mask.has_value()) {
    const Tensor& m = *attn_mask;
    TORCH_CHECK(!is_causal, op, ": expected either attn_mask or is_causal=True, got both");
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type(), op,
                ": expected attn_mask to be a bool tensor (True: attend) or to have query's dtype (", q.scalar_type(),
                "), got ", m.scalar_type());
    check_same_device(m, q, op, "attn_mask", "query");
    TORCH_CHECK(m.dim() <= nd, op, ": expected attn_mask to broadcast to [..., H, T_q, T_k] = ", shape_str(q),
                "[:-1] + [T_k], got shape ", shape_str(m));
    for (int64_t i = 1; i <= m.dim(); ++i) {
      const auto& want = i == 1 ? k.sym_size(-2) : q.sym_size(-i);
      const auto& got = m.sym_size(-i);
      TORCH_SYM_CHECK(got.sym_eq(1).sym_or(got.sym_eq(want)), op,
                      ": expected attn_mask to broadcast to [..., H, T_q, T_k] (query ", shape_str(q), ", key ",
                      shape_str(k), "), got shape ", shape_str(m));
    }
  }
}

void check_attention_relevance(const Tensor& grad, const Tensor& q, const Tensor& k, const Tensor& v,
                               const OptTensor& attn_mask, const Tensor& output, const Tensor& logsumexp,
                               bool is_causal, std::optional<double> scale, bool enable_gqa, double epsilon) {
  const char* op = "lrpcpp.scaled_dot_product_attention_relevance";
  check_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa, op);
  check_epsilon(epsilon, op);
  check_like(output, q, op, "output", "query");
  check_like(grad, q, op, "grad", "query");
  auto expected = q.sym_sizes().vec();
  expected.back() = v.sym_size(-1);
  TORCH_SYM_CHECK(c10::sym_equals(output.sym_sizes(), expected), op, ": expected output to have the shape ",
                  c10::SymIntArrayRef(expected), " of the attention's output, got ", shape_str(output));
  check_same_shape(grad, output, op, "grad", "output");
  check_same_device(logsumexp, q, op, "logsumexp", "query");
  TORCH_CHECK(logsumexp.scalar_type() == attention_stat_dtype(q.scalar_type()), op, ": expected logsumexp to be ",
              attention_stat_dtype(q.scalar_type()),
              " (the forward's row statistics "
              "for a ",
              q.scalar_type(), " query), got ", logsumexp.scalar_type());
  TORCH_SYM_CHECK(c10::sym_equals(logsumexp.sym_sizes(), q.sym_sizes().slice(0, q.dim() - 1)), op,
                  ": expected logsumexp to have the shape ", c10::SymIntArrayRef(q.sym_sizes().slice(0, q.dim() - 1)),
                  " (query's without the last dimension), got ", shape_str(logsumexp));
}

at::ScalarType attention_stat_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

Tensor empty_attention_output(c10::SymIntArrayRef shape, const at::TensorOptions& options) {
  const size_t n = shape.size();
  if (n < 3) return at::empty_symint(shape, options);
  std::vector<c10::SymInt> memory(shape.begin(), shape.end());
  std::swap(memory[n - 3], memory[n - 2]);
  return at::empty_symint(memory, options).transpose(-3, -2);
}

bool attention_laid_out_by_position(const Tensor& x) {
  return x.dim() >= 3 && x.sym_stride(-3) < x.sym_stride(-2);
}

Tensor empty_attention_relevance(const Tensor& x) {
  return attention_laid_out_by_position(x) ? empty_attention_output(x.sym_sizes(), x.options())
                                           : at::empty_symint(x.sym_sizes(), x.options());
}

void check_attention_method(c10::string_view method, const char* op) {
  TORCH_CHECK(method == "attnlrp" || method == "cp-lrp", op,
              ": expected method to be \"attnlrp\" or \"cp-lrp\", got \"", std::string(method), "\"");
}

Tensor scaled_dot_product_attention(const Tensor& query, const Tensor& key, const Tensor& value,
                                    const OptTensor& attn_mask, bool is_causal, std::optional<double> scale,
                                    bool enable_gqa, c10::string_view method, double epsilon) {
  const char* op = "lrpcpp.scaled_dot_product_attention";
  check_attention_method(method, op);
  check_epsilon(epsilon, op);
  return std::get<0>(
      lrpcpp::scaled_dot_product_attention_forward(query, key, value, attn_mask, is_causal, scale, enable_gqa));
}

}  // namespace impl

// The composition of dispatcher calls, registered once for every backend (CPU, CUDA, Meta).
TORCH_LIBRARY_IMPL(lrpcpp, CompositeExplicitAutograd, m) {
  m.impl("scaled_dot_product_attention", &impl::scaled_dot_product_attention);
}

}  // namespace lrpcpp
