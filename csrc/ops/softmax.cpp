// Softmax with the Deep Taylor rule with bias (AttnLRP, Prop. 3.1):
//   s = softmax(x / T, dim);  x' = x / T, set to 0 where masked (x = -inf or s = 0);
//   R_x = x' (R - s * sum_dim R)
#include "impl.h"

namespace lrpcpp {

Tensor softmax(const Tensor& x, int64_t dim, double temperature, std::optional<at::ScalarType> dtype) {
  LRPCPP_DISPATCH(softmax);
  return op.call(x, dim, temperature, dtype);
}

Tensor softmax_relevance(const Tensor& grad, const Tensor& x, const Tensor& output, int64_t dim, double temperature) {
  LRPCPP_DISPATCH(softmax_relevance);
  return op.call(grad, x, output, dim, temperature);
}

namespace impl {
using namespace detail;

namespace {

int64_t check_softmax_args(const Tensor& x, int64_t dim, double temperature, const char* op) {
  check_floating(x, op, "x");
  const int64_t nd = std::max<int64_t>(x.dim(), 1);
  TORCH_CHECK_INDEX(dim >= -nd && dim < nd, op, ": expected dim in [", -nd, ", ", nd - 1, "] for x of shape ",
                    shape_str(x), ", got ", dim);
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), op,
              ": expected temperature to be a finite number > 0, got ", temperature);
  return dim < 0 ? dim + nd : dim;
}

}  // namespace

Tensor softmax(const Tensor& x, int64_t dim, double temperature, std::optional<at::ScalarType> dtype) {
  const char* op = "lrpcpp.softmax";
  check_softmax_args(x, dim, temperature, op);
  if (dtype.has_value()) check_floating_dtype(*dtype, op, "dtype");
  return at::softmax(temperature == 1.0 ? x : at::div(x, temperature), dim, dtype);
}

int64_t check_softmax_relevance(const Tensor& grad, const Tensor& x, const Tensor& output, int64_t dim,
                                double temperature) {
  const char* op = "lrpcpp.softmax_relevance";
  const int64_t wrapped = check_softmax_args(x, dim, temperature, op);
  check_floating(output, op, "output");
  check_same_device(output, x, op, "output", "x");
  check_same_shape(output, x, op, "output", "x");
  check_like(grad, output, op, "grad", "output");
  check_same_shape(grad, output, op, "grad", "output");
  return wrapped;
}

}  // namespace impl

// The compositions of dispatcher calls, registered once for every backend (CPU, CUDA, Meta).
TORCH_LIBRARY_IMPL(lrpcpp, CompositeExplicitAutograd, m) {
  m.impl("softmax", &impl::softmax);
}

}  // namespace lrpcpp
