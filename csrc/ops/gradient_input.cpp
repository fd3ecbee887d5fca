// Gradient-times-input semantics (RULES.md section 2): autograd carries g = R / x,
// seeded with 1, and the relevance of any x is x * x.grad. Only the layers whose
// ordinary gradient is not already the rule need an op of their own:
//   gi_identity(x, y):       y = f(x) element-wise (identity rule); g_x = g_y * y / stab(x)
//   gi_grad_scale(x, scale): x;  g_x = g * scale (uniform shares, or 0 to detach)
//   gi_layer_norm:           at::layer_norm; sigma detached: g_x = rstd * (h - mean(h)), h = g * w (the
//                            autograd kernel keeps the forward's rstd, not x: the backward reads no x)
// gi_identity and gi_grad_scale copy nothing: they return y and x themselves, as views (their
// schemas say so), and keep only what their backward reads: gi_identity the factor y / stab(x)
// (gi_identity_factor, in place of the x a plain gradient of f keeps; with keep_inputs x and y, the
// factor computed in the backward), gi_grad_scale the scale.
// Both backwards are the op gi_scale_backward, g * factor.
#include "impl.h"

namespace lrpcpp {

Tensor gi_identity(const Tensor& x, const Tensor& y, double epsilon, bool keep_inputs) {
  LRPCPP_DISPATCH(gi_identity);
  return op.call(x, y, epsilon, keep_inputs);
}

Tensor gi_identity_factor(const Tensor& x, const Tensor& y, double epsilon) {
  LRPCPP_DISPATCH(gi_identity_factor);
  return op.call(x, y, epsilon);
}

Tensor gi_grad_scale(const Tensor& x, const Tensor& scale) {
  LRPCPP_DISPATCH(gi_grad_scale);
  return op.call(x, scale);
}

Tensor gi_scale_backward(const Tensor& grad, const Tensor& factor, at::ScalarType dtype) {
  LRPCPP_DISPATCH(gi_scale_backward);
  return op.call(grad, factor, dtype);
}

Tensor gi_layer_norm(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight, const OptTensor& bias,
                     double eps) {
  LRPCPP_DISPATCH(gi_layer_norm);
  return op.call(x, normalized_shape, weight, bias, eps);
}

Tensor gi_layer_norm_backward(const Tensor& grad, const Tensor& rstd, at::IntArrayRef normalized_shape,
                              const OptTensor& weight) {
  LRPCPP_DISPATCH(gi_layer_norm_backward);
  return op.call(grad, rstd, normalized_shape, weight);
}

namespace impl {
using namespace detail;

namespace {

// `t` broadcasts to `ref`'s shape (the broadcast shape of the two is ref's own).
void check_broadcastable_to(const Tensor& t, const Tensor& ref, const char* op, const char* arg, const char* ref_arg) {
  const auto nt = t.dim(), nr = ref.dim();
  TORCH_CHECK(nt <= nr, op, ": expected ", arg, " ", shape_str(t), " to be broadcastable to ", ref_arg, " ",
              shape_str(ref), ", but it has more dimensions");
  for (int64_t i = 1; i <= nt; ++i) {
    const auto& st = t.sym_size(nt - i);
    TORCH_SYM_CHECK(st.sym_eq(1).sym_or(st.sym_eq(ref.sym_size(nr - i))), op, ": expected ", arg, " ", shape_str(t),
                    " to be broadcastable to ", ref_arg, " ", shape_str(ref), ", but they differ at dimension ", -i);
  }
}

}  // namespace

void check_gi_identity(const Tensor& x, const Tensor& y, double epsilon, const char* op) {
  check_floating(x, op, "x");
  check_floating(y, op, "y");
  check_same_device(y, x, op, "y", "x");
  TORCH_SYM_CHECK(c10::sym_equals(x.sym_sizes(), y.sym_sizes()), op, ": expected x ", shape_str(x), " and y ",
                  shape_str(y), " to have the same shape");
  check_epsilon(epsilon, op);
}

void check_gi_scale_backward(const Tensor& grad, const Tensor& factor, at::ScalarType dtype) {
  const char* op = "lrpcpp.gi_scale_backward";
  check_floating(grad, op, "grad");
  check_floating(factor, op, "factor");
  check_same_device(factor, grad, op, "factor", "grad");
  check_broadcastable_to(factor, grad, op, "factor", "grad");
  check_floating_dtype(dtype, op, "dtype");
}

Tensor gi_scale_backward_empty(const Tensor& grad, const at::TensorOptions& options) {
  if (grad.is_non_overlapping_and_dense())
    return at::empty_strided_symint(grad.sym_sizes(), grad.sym_strides(), options);
  return at::empty_symint(grad.sym_sizes(), options);
}

void check_gi_layer_norm_backward(const Tensor& grad, const Tensor& rstd, at::IntArrayRef normalized_shape,
                                  const OptTensor& weight) {
  const char* op = "lrpcpp.gi_layer_norm_backward";
  check_norm(grad, normalized_shape, weight, std::nullopt, std::nullopt, op, /*same_dtype=*/true, "grad");
  check_floating(rstd, op, "rstd");
  check_same_device(rstd, grad, op, "rstd", "grad");
  // one value per row: grad's leading dims, then a 1 for each normalised dim
  const auto rows = grad.dim() - static_cast<int64_t>(normalized_shape.size());
  bool ok = rstd.dim() == grad.dim();
  for (int64_t d = 0; ok && d < grad.dim(); ++d) {
    ok = d < rows ? rstd.sym_size(d).sym_eq(grad.sym_size(d)).guard_bool(__FILE__, __LINE__)
                  : rstd.sym_size(d).sym_eq(1).guard_bool(__FILE__, __LINE__);
  }
  TORCH_CHECK(ok, op, ": expected rstd to hold one value per row of grad ", shape_str(grad),
              " (its leading dims, then ", normalized_shape.size(),
              " dims of size 1, as native_layer_norm returns it), got ", shape_str(rstd));
}

void check_gi_grad_scale(const Tensor& x, const Tensor& scale) {
  const char* op = "lrpcpp.gi_grad_scale";
  check_floating(x, op, "x");
  check_floating(scale, op, "scale");
  check_same_device(scale, x, op, "scale", "x");
  check_broadcastable_to(scale, x, op, "scale", "x");
}

Tensor gi_identity(const Tensor& x, const Tensor& y, double epsilon, bool /*keep_inputs*/) {
  check_gi_identity(x, y, epsilon, "lrpcpp.gi_identity");
  return y.alias();
}

Tensor gi_grad_scale(const Tensor& x, const Tensor& scale) {
  check_gi_grad_scale(x, scale);
  return x.alias();
}

Tensor gi_layer_norm(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight, const OptTensor& bias,
                     double eps) {
  check_norm(x, normalized_shape, weight, bias, eps, "lrpcpp.gi_layer_norm");
  return at::layer_norm(x, normalized_shape, weight, bias, eps);
}

}  // namespace impl

// The compositions of dispatcher calls, registered once for every backend (CPU, CUDA, Meta).
TORCH_LIBRARY_IMPL(lrpcpp, CompositeExplicitAutograd, m) {
  m.impl("gi_identity", &impl::gi_identity);
  m.impl("gi_grad_scale", &impl::gi_grad_scale);
  m.impl("gi_layer_norm", &impl::gi_layer_norm);
}

}  // namespace lrpcpp
