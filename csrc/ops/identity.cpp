// The identity rule (AttnLRP Eq. 9): element-wise activations pass relevance
// through unchanged, R_x = R; and the relevance cut stop_relevance, R_x = 0.
#include "impl.h"

namespace lrpcpp {

Tensor silu_identity(const Tensor& x) {
  LRPCPP_DISPATCH(silu_identity);
  return op.call(x);
}

Tensor gelu_identity(const Tensor& x, c10::string_view approximate) {
  LRPCPP_DISPATCH(gelu_identity);
  return op.call(x, approximate);
}

Tensor tanh_identity(const Tensor& x) {
  LRPCPP_DISPATCH(tanh_identity);
  return op.call(x);
}

Tensor relu_identity(const Tensor& x) {
  LRPCPP_DISPATCH(relu_identity);
  return op.call(x);
}

Tensor sigmoid_identity(const Tensor& x) {
  LRPCPP_DISPATCH(sigmoid_identity);
  return op.call(x);
}

Tensor identity_relevance(const Tensor& grad, at::ScalarType dtype) {
  LRPCPP_DISPATCH(identity_relevance);
  return op.call(grad, dtype);
}

Tensor stop_relevance(const Tensor& x) {
  LRPCPP_DISPATCH(stop_relevance);
  return op.call(x);
}

namespace impl {
using namespace detail;

Tensor silu_identity(const Tensor& x) {
  check_floating(x, "lrpcpp.silu_identity", "x");
  return at::silu(x);
}

Tensor gelu_identity(const Tensor& x, c10::string_view approximate) {
  check_floating(x, "lrpcpp.gelu_identity", "x");
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "lrpcpp.gelu_identity: expected approximate to be 'none' or 'tanh', got '", approximate, "'");
  return at::gelu(x, approximate);
}

Tensor tanh_identity(const Tensor& x) {
  check_floating(x, "lrpcpp.tanh_identity", "x");
  return at::tanh(x);
}

Tensor relu_identity(const Tensor& x) {
  check_floating(x, "lrpcpp.relu_identity", "x");
  return at::relu(x);
}

Tensor sigmoid_identity(const Tensor& x) {
  check_floating(x, "lrpcpp.sigmoid_identity", "x");
  return at::sigmoid(x);
}

Tensor identity_relevance(const Tensor& grad, at::ScalarType dtype) {
  check_floating(grad, "lrpcpp.identity_relevance", "grad");
  check_floating_dtype(dtype, "lrpcpp.identity_relevance", "dtype");
  return grad.to(dtype, /*non_blocking=*/false, /*copy=*/true);
}

Tensor stop_relevance(const Tensor& x) {
  check_floating(x, "lrpcpp.stop_relevance", "x");
  return x.clone();
}

}  // namespace impl

// The compositions of dispatcher calls, registered once for every backend (CPU, CUDA, Meta).
TORCH_LIBRARY_IMPL(lrpcpp, CompositeExplicitAutograd, m) {
  m.impl("silu_identity", &impl::silu_identity);
  m.impl("gelu_identity", &impl::gelu_identity);
  m.impl("tanh_identity", &impl::tanh_identity);
  m.impl("relu_identity", &impl::relu_identity);
  m.impl("sigmoid_identity", &impl::sigmoid_identity);
  m.impl("identity_relevance", &impl::identity_relevance);
  m.impl("stop_relevance", &impl::stop_relevance);
}

}  // namespace lrpcpp
