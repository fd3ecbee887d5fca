// Meta kernels of the fused attention: shapes and dtypes only.
#include <torch/library.h>

#include "../impl.h"

namespace lrpcpp {
namespace {

TensorPair attention_forward_meta(const Tensor& query, const Tensor& key, const Tensor& value,
                                  const OptTensor& attn_mask, bool is_causal, std::optional<double> scale,
                                  bool enable_gqa) {
  impl::check_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa,
                        "lrpcpp.scaled_dot_product_attention_forward");
  auto shape = query.sym_sizes().vec();
  shape.back() = value.sym_size(-1);
  Tensor out = impl::empty_attention_output(shape, query.options());
  Tensor lse = at::empty_symint(query.sym_sizes().slice(0, query.dim() - 1),
                                query.options().dtype(impl::attention_stat_dtype(query.scalar_type())));
  return {out, lse};
}

TensorTriple attention_relevance_meta(const Tensor& grad, const Tensor& query, const Tensor& key, const Tensor& value,
                                      const OptTensor& attn_mask, const Tensor& output, const Tensor& logsumexp,
                                      bool is_causal, std::optional<double> scale, bool enable_gqa, double epsilon,
                                      std::array<bool, 3> output_mask) {
  impl::check_attention_relevance(grad, query, key, value, attn_mask, output, logsumexp, is_causal, scale, enable_gqa,
                                  epsilon);
  Tensor rq, rk, rv;
  if (output_mask[0]) rq = impl::empty_attention_relevance(query);
  if (output_mask[1]) rk = impl::empty_attention_relevance(key);
  if (output_mask[2]) rv = impl::empty_attention_relevance(value);
  return {rq, rk, rv};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Meta, m) {
  m.impl("scaled_dot_product_attention_forward", &attention_forward_meta);
  m.impl("scaled_dot_product_attention_relevance", &attention_relevance_meta);
}

}  // namespace lrpcpp
