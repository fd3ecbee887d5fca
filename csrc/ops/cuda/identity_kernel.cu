// CUDA registrations of the identity rule: torch's own activations forward, and a
// copy (cast to the input's dtype) of R as the relevance.
#include <torch/library.h>

#include "../impl.h"

namespace lrpcpp {

TORCH_LIBRARY_IMPL(lrpcpp, CUDA, m) {
  impl::register_identity_composites(m);
}

}  // namespace lrpcpp
