// Normalisation layers.
//   rms_norm_identity, layer_norm_identity, normalize_identity: R_x = R (Prop. 3.4)
//   layer_norm (epsilon rule, sigma treated as a constant):
//     Rn = R / stab(y);  h = (w / sigma) Rn;  R_x = x (h - mean(h))
#include "impl.h"

#include <cfloat>

namespace lrpcpp {

Tensor rms_norm_identity(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                         std::optional<double> eps) {
  LRPCPP_DISPATCH(rms_norm_identity);
  return op.call(x, normalized_shape, weight, eps);
}

Tensor layer_norm(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight, const OptTensor& bias,
                  double eps, double epsilon) {
  LRPCPP_DISPATCH(layer_norm);
  return op.call(x, normalized_shape, weight, bias, eps, epsilon);
}

Tensor layer_norm_relevance(const Tensor& grad, const Tensor& x, at::IntArrayRef normalized_shape,
                            const OptTensor& weight, const OptTensor& bias, double eps, double epsilon) {
  LRPCPP_DISPATCH(layer_norm_relevance);
  return op.call(grad, x, normalized_shape, weight, bias, eps, epsilon);
}

Tensor layer_norm_identity(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                           const OptTensor& bias, double eps) {
  LRPCPP_DISPATCH(layer_norm_identity);
  return op.call(x, normalized_shape, weight, bias, eps);
}

Tensor normalize_identity(const Tensor& x, double p, int64_t dim, double eps) {
  LRPCPP_DISPATCH(normalize_identity);
  return op.call(x, p, dim, eps);
}

namespace impl {
using namespace detail;

namespace {

void check_affine(const OptTensor& t, const Tensor& x, at::IntArrayRef normalized_shape, const char* op,
                  const char* arg, bool same_dtype, const char* x_name) {
  if (!t.has_value() || !t->defined()) return;
  check_floating(*t, op, arg);
  // x's dtype, or float32 with a float16 / bfloat16 x (ATen's mixed-precision layer norm)
  const bool mixed =
      t->scalar_type() == at::kFloat && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16);
  TORCH_CHECK(!same_dtype || mixed || t->scalar_type() == x.scalar_type(), op, ": expected ", arg,
              " to have the dtype of ", x_name, " (", x.scalar_type(), "), or float32 when ", x_name,
              " is float16 or bfloat16, got ", t->scalar_type());
  check_same_device(*t, x, op, arg, x_name);
  TORCH_SYM_CHECK(c10::sym_equals(t->sym_sizes(), c10::fromIntArrayRefSlow(normalized_shape)), op, ": expected ", arg,
                  " to have shape normalized_shape = ", normalized_shape, ", got ", shape_str(*t));
}

}  // namespace

void check_norm(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight, const OptTensor& bias,
                std::optional<double> eps, const char* op, bool same_dtype, const char* x_name) {
  check_floating(x, op, x_name);
  const auto n = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(n >= 1, op, ": expected normalized_shape to have at least one dimension, got []");
  TORCH_CHECK(x.dim() >= n, op, ": expected ", x_name, " ", shape_str(x), " to end with normalized_shape ",
              normalized_shape);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_SYM_CHECK(x.sym_size(x.dim() - n + i).sym_eq(normalized_shape[i]), op, ": expected ", x_name, " ",
                    shape_str(x), " to end with normalized_shape ", normalized_shape);
  }
  check_affine(weight, x, normalized_shape, op, "weight", same_dtype, x_name);
  check_affine(bias, x, normalized_shape, op, "bias", same_dtype, x_name);
  if (same_dtype && weight.has_value() && weight->defined() && bias.has_value() && bias->defined()) {
    check_same_dtype(*bias, *weight, op, "bias", "weight");
  }
  if (eps.has_value()) {
    TORCH_CHECK(*eps >= 0.0 && std::isfinite(*eps), op, ": expected eps to be a finite number >= 0, got ", *eps);
  }
}

namespace {

// torch.finfo(dtype).eps, the default of torch.nn.functional.rms_norm
double machine_eps(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return DBL_EPSILON;
    case at::kHalf: return 0.0009765625;   // 2^-10
    case at::kBFloat16: return 0.0078125;  // 2^-7
    default: return FLT_EPSILON;
  }
}

}  // namespace

Tensor rms_norm_identity(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                         std::optional<double> eps) {
  // a weight of another dtype is allowed (the output is promoted, as torch's rms_norm)
  check_norm(x, normalized_shape, weight, std::nullopt, eps, "lrpcpp.rms_norm_identity", /*same_dtype=*/false);
  // fp32 (or fp64) arithmetic, cast back to x's dtype before the weight, as LLaMA-style models do
  const auto acc = at::toOpMathType(x.scalar_type());
  std::vector<int64_t> dims;
  for (int64_t i = x.dim() - static_cast<int64_t>(normalized_shape.size()); i < x.dim(); ++i) dims.push_back(i);
  Tensor xf = x.to(acc);
  Tensor rstd = at::rsqrt(at::mean(xf * xf, dims, /*keepdim=*/true).add_(eps.value_or(machine_eps(x.scalar_type()))));
  Tensor y = (xf * rstd).to(x.scalar_type());
  if (!weight.has_value() || !weight->defined()) return y;
  // y is a new tensor: the weight (of shape normalized_shape) multiplied into it where the result keeps
  // its dtype (one tensor of x's size less), else promoted as y * weight
  return at::result_type(y, *weight) == y.scalar_type() ? y.mul_(*weight) : y * *weight;
}

Tensor layer_norm(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight, const OptTensor& bias,
                  double eps, double epsilon) {
  const char* op = "lrpcpp.layer_norm";
  check_norm(x, normalized_shape, weight, bias, eps, op);
  check_epsilon(epsilon, op);
  return at::layer_norm(x, normalized_shape, weight, bias, eps);
}

void check_layer_norm_relevance(const Tensor& grad, const Tensor& x, at::IntArrayRef normalized_shape,
                                const OptTensor& weight, const OptTensor& bias, double eps, double epsilon) {
  const char* op = "lrpcpp.layer_norm_relevance";
  check_norm(x, normalized_shape, weight, bias, eps, op);
  check_epsilon(epsilon, op);
  check_like(grad, x, op, "grad", "x");
  check_same_shape(grad, x, op, "grad", "x");
}

Tensor layer_norm_identity(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                           const OptTensor& bias, double eps) {
  check_norm(x, normalized_shape, weight, bias, eps, "lrpcpp.layer_norm_identity");
  return at::layer_norm(x, normalized_shape, weight, bias, eps);
}

Tensor normalize_identity(const Tensor& x, double p, int64_t dim, double eps) {
  const char* op = "lrpcpp.normalize_identity";
  check_floating(x, op, "x");
  const int64_t nd = std::max<int64_t>(x.dim(), 1);
  TORCH_CHECK_INDEX(dim >= -nd && dim < nd, op, ": expected dim in [", -nd, ", ", nd - 1, "] for x of shape ",
                    shape_str(x), ", got ", dim);
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), op, ": expected eps to be a finite number >= 0, got ", eps);
  TORCH_CHECK(!std::isnan(p), op, ": expected p to be a number, got nan");
  // a negative or infinite norm has no value over no elements (torch's shape propagation refuses
  // any empty x, its CPU kernel only an empty dim: refused alike on every backend)
  TORCH_CHECK((p >= 0.0 && std::isfinite(p)) || x.sym_numel() != 0, op, ": expected x ", shape_str(x),
              " to be non-empty for the p = ", p, " norm");
  // the same ATen calls as torch.nn.functional.normalize
  Tensor denom = at::norm(x, p, {dim}, /*keepdim=*/true).clamp_min(eps).expand_as(x);
  return x / denom;
}

Tensor layer_norm_affine_row(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& t, double fill) {
  const auto acc = at::toOpMathType(x.scalar_type());
  return (t.has_value() && t->defined())
             ? t->to(acc).contiguous().view(-1)
             : at::full({c10::multiply_integers(normalized_shape)}, fill, x.options().dtype(acc));
}

TensorPair layer_norm_affine_rows(const Tensor& x, at::IntArrayRef normalized_shape, const OptTensor& weight,
                                  const OptTensor& bias) {
  return {layer_norm_affine_row(x, normalized_shape, weight, 1.0),
          layer_norm_affine_row(x, normalized_shape, bias, 0.0)};
}

}  // namespace impl

// The compositions of dispatcher calls, registered once for every backend (CPU, CUDA, Meta).
TORCH_LIBRARY_IMPL(lrpcpp, CompositeExplicitAutograd, m) {
  m.impl("rms_norm_identity", &impl::rms_norm_identity);
  m.impl("layer_norm", &impl::layer_norm);
  m.impl("layer_norm_identity", &impl::layer_norm_identity);
  m.impl("normalize_identity", &impl::normalize_identity);
}

}  // namespace lrpcpp
