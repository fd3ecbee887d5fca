// Autograd of the fused attention: the forward keeps q, k, v, the mask, the output and the row
// log-sum-exp (no [T_q, T_k] tensor); the backward is the registered relevance op.
#include "common.h"

namespace lrpcpp::autograd {
namespace {

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& query, const Tensor& key, const Tensor& value,
                        const OptTensor& attn_mask, bool is_causal, std::optional<double> scale, bool enable_gqa,
                        c10::string_view method, double epsilon) {
    const char* op = "lrpcpp.scaled_dot_product_attention";
    impl::check_attention_method(method, op);
    detail::check_epsilon(epsilon, op);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] =
        lrpcpp::scaled_dot_product_attention_forward(query, key, value, attn_mask, is_causal, scale, enable_gqa);
    ctx->save_for_backward({query, key, value, saved_or_undefined(attn_mask), out, lse});
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["enable_gqa"] = enable_gqa;
    ctx->saved_data["cp_lrp"] = method == "cp-lrp";
    ctx->saved_data["epsilon"] = epsilon;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    // CP-LRP holds the attention weights constant: q and k take no relevance
    const bool qk = !ctx->saved_data["cp_lrp"].toBool();
    const std::array<bool, 3> mask{qk && ctx->needs_input_grad(0), qk && ctx->needs_input_grad(1),
                                   ctx->needs_input_grad(2)};
    const auto& scale = ctx->saved_data["scale"];
    auto [rq, rk, rv] = lrpcpp::scaled_dot_product_attention_relevance(
        grads[0], s[0], s[1], s[2], optional_tensor(s[3]), s[4], s[5], ctx->saved_data["is_causal"].toBool(),
        scale.isNone() ? std::nullopt : std::optional<double>(scale.toDouble()), ctx->saved_data["enable_gqa"].toBool(),
        ctx->saved_data["epsilon"].toDouble(), mask);
    return {rq, rk, rv, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor attention_autograd(const Tensor& query, const Tensor& key, const Tensor& value, const OptTensor& attn_mask,
                          bool is_causal, std::optional<double> scale, bool enable_gqa, c10::string_view method,
                          double epsilon) {
  return AttentionFunction::apply(query, key, value, attn_mask, is_causal, scale, enable_gqa, method, epsilon);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Autograd, m) {
  m.impl("scaled_dot_product_attention", &attention_autograd);
  m.impl("scaled_dot_product_attention_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("scaled_dot_product_attention_relevance", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace lrpcpp::autograd
