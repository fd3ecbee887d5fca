// Ops between two tensors that both may carry relevance.
//   add2:   R_a = a R / stab(a + b),  R_b = b R / stab(a + b)          (epsilon rule)
//   mul2:   R_a = R_b = R / 2, or all of R to the one that needs it    (uniform, Prop. 3.2)
//   matmul: Rn = R / stab(2 O); R_a = (Rn b^T) a, R_b = (a^T Rn) b       (Prop. 3.3)
// Broadcast inputs receive their relevance summed back to their own shape.
#include "impl.h"

namespace lrpcpp {

Tensor add2(const Tensor& a, const Tensor& b, double epsilon) {
  LRPCPP_DISPATCH(add2);
  return op.call(a, b, epsilon);
}

TensorPair add2_relevance(const Tensor& grad, const Tensor& a, const Tensor& b, double epsilon,
                          std::array<bool, 2> output_mask) {
  LRPCPP_DISPATCH(add2_relevance);
  return op.call(grad, a, b, epsilon, output_mask);
}

Tensor mul2(const Tensor& a, const Tensor& b) {
  LRPCPP_DISPATCH(mul2);
  return op.call(a, b);
}

TensorPair mul2_relevance(const Tensor& grad, const Tensor& a, const Tensor& b, std::array<bool, 2> output_mask) {
  LRPCPP_DISPATCH(mul2_relevance);
  return op.call(grad, a, b, output_mask);
}

Tensor matmul(const Tensor& a, const Tensor& b, double epsilon) {
  LRPCPP_DISPATCH(matmul);
  return op.call(a, b, epsilon);
}

TensorPair matmul_relevance(const Tensor& grad, const Tensor& a, const Tensor& b, const Tensor& output, double epsilon,
                            std::array<bool, 2> output_mask) {
  LRPCPP_DISPATCH(matmul_relevance);
  return op.call(grad, a, b, output, epsilon, output_mask);
}

namespace impl {
using namespace detail;

namespace {

void check_pair(const Tensor& a, const Tensor& b, const char* op) {
  check_floating(a, op, "a");
  check_like(b, a, op, "b", "a");
}

// a and b broadcast against each other (torch's rules), named in the message.
void check_broadcastable(const Tensor& a, const Tensor& b, const char* op) {
  const auto na = a.dim(), nb = b.dim();
  for (int64_t i = 1; i <= std::min(na, nb); ++i) {
    const auto& sa = a.sym_size(na - i);
    const auto& sb = b.sym_size(nb - i);
    TORCH_SYM_CHECK(sa.sym_eq(sb).sym_or(sa.sym_eq(1)).sym_or(sb.sym_eq(1)), op, ": expected a ", shape_str(a),
                    " and b ", shape_str(b), " to be broadcastable, but they differ at dimension ", -i);
  }
}

void check_broadcast_grad(const Tensor& grad, const Tensor& a, const Tensor& b, const char* op) {
  check_pair(a, b, op);
  check_broadcastable(a, b, op);
  check_like(grad, a, op, "grad", "a");
  auto shape = at::infer_size_symdimvector(a.sym_sizes(), b.sym_sizes());
  TORCH_SYM_CHECK(c10::sym_equals(grad.sym_sizes(), shape), op,
                  ": expected grad to have the broadcast shape of a and b ", c10::SymIntArrayRef(shape), ", got ",
                  shape_str(grad));
}

void check_matmul(const Tensor& a, const Tensor& b, double epsilon, const char* op) {
  check_pair(a, b, op);
  TORCH_CHECK(a.dim() >= 2 && b.dim() >= 2, op,
              ": expected a [..., n, k] and b [..., k, m] to have at least 2 dimensions each (unsqueeze vectors), "
              "got shapes ",
              shape_str(a), " and ", shape_str(b));
  TORCH_SYM_CHECK(a.sym_size(-1).sym_eq(b.sym_size(-2)), op, ": expected a.shape[-1] to equal b.shape[-2], got a ",
                  shape_str(a), " and b ", shape_str(b));
  const auto na = a.dim() - 2, nb = b.dim() - 2;
  for (int64_t i = 1; i <= std::min(na, nb); ++i) {
    const auto& sa = a.sym_size(na - i);
    const auto& sb = b.sym_size(nb - i);
    TORCH_SYM_CHECK(sa.sym_eq(sb).sym_or(sa.sym_eq(1)).sym_or(sb.sym_eq(1)), op,
                    ": expected the batch dimensions of a ", shape_str(a), " and b ", shape_str(b),
                    " to be broadcastable");
  }
  check_epsilon(epsilon, op);
}

}  // namespace

void check_add2_relevance(const Tensor& grad, const Tensor& a, const Tensor& b, double epsilon) {
  const char* op = "lrpcpp.add2_relevance";
  check_broadcast_grad(grad, a, b, op);
  check_epsilon(epsilon, op);
}

Tensor add2(const Tensor& a, const Tensor& b, double epsilon) {
  const char* op = "lrpcpp.add2";
  check_pair(a, b, op);
  check_broadcastable(a, b, op);
  check_epsilon(epsilon, op);
  return at::add(a, b);
}

Tensor mul2(const Tensor& a, const Tensor& b) {
  const char* op = "lrpcpp.mul2";
  check_pair(a, b, op);
  check_broadcastable(a, b, op);
  return at::mul(a, b);
}

TensorPair mul2_relevance(const Tensor& grad, const Tensor& a, const Tensor& b, std::array<bool, 2> output_mask) {
  check_broadcast_grad(grad, a, b, "lrpcpp.mul2_relevance");
  // uniform rule: an even split between the operands that take relevance
  const double share = (output_mask[0] && output_mask[1]) ? 0.5 : 1.0;
  Tensor ra, rb;
  if (output_mask[0]) ra = at::sum_to(at::mul(grad, share), a.sym_sizes());
  if (output_mask[1]) rb = at::sum_to(at::mul(grad, share), b.sym_sizes());
  return {ra, rb};
}

Tensor matmul(const Tensor& a, const Tensor& b, double epsilon) {
  check_matmul(a, b, epsilon, "lrpcpp.matmul");
  return at::matmul(a, b);
}

TensorPair matmul_relevance(const Tensor& grad, const Tensor& a, const Tensor& b, const Tensor& output, double epsilon,
                            std::array<bool, 2> output_mask) {
  const char* op = "lrpcpp.matmul_relevance";
  check_matmul(a, b, epsilon, op);
  check_like(output, a, op, "output", "a");
  check_like(grad, output, op, "grad", "output");
  check_same_shape(grad, output, op, "grad", "output");
  auto expected = at::infer_size_symdimvector(a.sym_sizes().slice(0, a.dim() - 2), b.sym_sizes().slice(0, b.dim() - 2));
  expected.push_back(a.sym_size(-2));
  expected.push_back(b.sym_size(-1));
  TORCH_SYM_CHECK(c10::sym_equals(output.sym_sizes(), expected), op, ": expected output to have the shape ",
                  c10::SymIntArrayRef(expected), " of a @ b, got ", shape_str(output));
  Tensor ra, rb;
  if (!output_mask[0] && !output_mask[1]) return {ra, rb};
  const auto cd = compute_dtype(a.scalar_type());
  // epsilon rule on the bilinear product, then a uniform split when both operands take relevance
  const double scale = (output_mask[0] && output_mask[1]) ? 2.0 : 1.0;
  Tensor rn = lrpcpp::stab_div(grad, output, epsilon, scale, cd);
  if (output_mask[0]) ra = times_input(at::sum_to(at::matmul(rn, b.to(cd).mT()), a.sym_sizes()), a);
  if (output_mask[1]) rb = times_input(at::sum_to(at::matmul(a.to(cd).mT(), rn), b.sym_sizes()), b);
  return {ra, rb};
}

}  // namespace impl

// The compositions of dispatcher calls, registered once for every backend (CPU, CUDA, Meta).
TORCH_LIBRARY_IMPL(lrpcpp, CompositeExplicitAutograd, m) {
  m.impl("add2", &impl::add2);
  m.impl("mul2", &impl::mul2);
  m.impl("mul2_relevance", &impl::mul2_relevance);
  m.impl("matmul", &impl::matmul);
  m.impl("matmul_relevance", &impl::matmul_relevance);
}

}  // namespace lrpcpp
