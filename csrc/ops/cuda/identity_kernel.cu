// CUDA registrations of the identity rule: torch's own activations forward, and a
// copy (cast to the input's dtype) of R as the relevance.
#include <torch/library.h>

#include "../impl.h"

namespace lrpcpp {

TORCH_LIBRARY_IMPL(lrpcpp, CUDA, m) {
  m.impl("silu_identity", &impl::silu_identity);
  m.impl("gelu_identity", &impl::gelu_identity);
  m.impl("tanh_identity", &impl::tanh_identity);
  m.impl("relu_identity", &impl::relu_identity);
  m.impl("sigmoid_identity", &impl::sigmoid_identity);
  m.impl("identity_relevance", &impl::identity_relevance);
  m.impl("stop_relevance", &impl::stop_relevance);
}

}  // namespace lrpcpp
