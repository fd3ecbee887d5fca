// Autograd of add2, mul2 and matmul: backward = their relevance ops, told
// which operands take relevance (those that require grad).
#include "common.h"

namespace lrpcpp::autograd {
namespace {

std::array<bool, 2> relevance_mask(AutogradContext* ctx) {
  return {ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
}

variable_list pair_grads(const TensorPair& r, size_t extra_inputs) {
  variable_list out{std::get<0>(r), std::get<1>(r)};
  out.resize(2 + extra_inputs);
  return out;
}

class Add2Function : public torch::autograd::Function<Add2Function> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& a, const Tensor& b, double epsilon) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({a, b});
    ctx->saved_data["epsilon"] = epsilon;
    return lrpcpp::add2(a, b, epsilon);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    return pair_grads(
        lrpcpp::add2_relevance(grads[0], s[0], s[1], ctx->saved_data["epsilon"].toDouble(), relevance_mask(ctx)), 1);
  }
};

class Mul2Function : public torch::autograd::Function<Mul2Function> {
 public:
  // The uniform rule reads only the operands' shapes, dtype and device: the forward keeps those, not a
  // and b, and the backward hands the relevance op a one-element stand-in expanded to each shape.
  static Tensor forward(AutogradContext* ctx, const Tensor& a, const Tensor& b) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["a_sizes"] = a.sym_sizes();
    ctx->saved_data["b_sizes"] = b.sym_sizes();
    ctx->saved_data["dtype"] = a.scalar_type();
    ctx->saved_data["device"] = a.device();
    return lrpcpp::mul2(a, b);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto& d = ctx->saved_data;
    const Tensor stand_in = at::zeros({}, at::TensorOptions(d["dtype"].toScalarType()).device(d["device"].toDevice()));
    return pair_grads(
        lrpcpp::mul2_relevance(grads[0], stand_in.expand_symint(d["a_sizes"].toSymIntVector()),
                               stand_in.expand_symint(d["b_sizes"].toSymIntVector()), relevance_mask(ctx)),
        0);
  }
};

class MatmulFunction : public torch::autograd::Function<MatmulFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& a, const Tensor& b, double epsilon) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = lrpcpp::matmul(a, b, epsilon);
    ctx->save_for_backward({a, b, out});
    ctx->saved_data["epsilon"] = epsilon;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    return pair_grads(lrpcpp::matmul_relevance(grads[0], s[0], s[1], s[2], ctx->saved_data["epsilon"].toDouble(),
                                               relevance_mask(ctx)),
                      1);
  }
};

Tensor add2_autograd(const Tensor& a, const Tensor& b, double epsilon) {
  return Add2Function::apply(a, b, epsilon);
}

Tensor mul2_autograd(const Tensor& a, const Tensor& b) {
  return Mul2Function::apply(a, b);
}

Tensor matmul_autograd(const Tensor& a, const Tensor& b, double epsilon) {
  return MatmulFunction::apply(a, b, epsilon);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Autograd, m) {
  m.impl("add2", &add2_autograd);
  m.impl("mul2", &mul2_autograd);
  m.impl("matmul", &matmul_autograd);
  m.impl("add2_relevance", torch::autograd::autogradNotImplementedFallback());
  m.impl("mul2_relevance", torch::autograd::autogradNotImplementedFallback());
  m.impl("matmul_relevance", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace lrpcpp::autograd
