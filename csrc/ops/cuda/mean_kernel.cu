// CUDA registrations of the mean rule: torch's mean forward, and the relevance
// composed of ATen reductions and the stab_div primitive.
#include <torch/library.h>

#include "../impl.h"

namespace lrpcpp {

TORCH_LIBRARY_IMPL(lrpcpp, CUDA, m) {
  impl::register_mean_composites(m);
}

}  // namespace lrpcpp
