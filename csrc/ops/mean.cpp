// Mean over dimensions, epsilon rule: R_x = x R / stab(sum_dim x), composed of
// ATen's sum and product and the stab_div primitive.
#include "impl.h"

namespace lrpcpp {

Tensor mean(const Tensor& x, at::OptionalIntArrayRef dim, bool keepdim, double epsilon) {
  LRPCPP_DISPATCH(mean);
  return op.call(x, dim, keepdim, epsilon);
}

Tensor mean_relevance(const Tensor& grad, const Tensor& x, at::OptionalIntArrayRef dim, bool keepdim, double epsilon) {
  LRPCPP_DISPATCH(mean_relevance);
  return op.call(grad, x, dim, keepdim, epsilon);
}

namespace impl {
using namespace detail;

namespace {

// sorted, wrapped dimensions a mean reduces (all of them for None or [])
std::vector<int64_t> mean_reduce_dims(const Tensor& x, at::OptionalIntArrayRef dim, const char* op) {
  std::vector<int64_t> dims;
  const int64_t nd = x.dim();
  if (!dim.has_value() || dim->empty()) {
    for (int64_t i = 0; i < nd; ++i) dims.push_back(i);
    return dims;
  }
  const int64_t bound = std::max<int64_t>(nd, 1);
  std::vector<int64_t> seen;  // wrapped dims (a 0-D x takes dim 0 or -1, and reduces nothing)
  for (int64_t d : *dim) {
    TORCH_CHECK_INDEX(d >= -bound && d < bound, op, ": expected every dim in [", -bound, ", ", bound - 1,
                      "] for x of shape ", shape_str(x), ", got ", d);
    const int64_t w = d < 0 ? d + bound : d;
    TORCH_CHECK(std::find(seen.begin(), seen.end(), w) == seen.end(), op, ": dim ", d, " appears more than once in ",
                *dim);
    seen.push_back(w);
    if (nd > 0) dims.push_back(w);
  }
  std::sort(dims.begin(), dims.end());
  return dims;
}

}  // namespace

Tensor mean(const Tensor& x, at::OptionalIntArrayRef dim, bool keepdim, double epsilon) {
  const char* op = "lrpcpp.mean";
  check_floating(x, op, "x");
  mean_reduce_dims(x, dim, op);
  check_epsilon(epsilon, op);
  return at::mean(x, dim, keepdim);
}

namespace {

// returns the dims the mean reduces
std::vector<int64_t> check_mean_relevance(const Tensor& grad, const Tensor& x, at::OptionalIntArrayRef dim,
                                          bool keepdim, double epsilon) {
  const char* op = "lrpcpp.mean_relevance";
  check_floating(x, op, "x");
  check_like(grad, x, op, "grad", "x");
  check_epsilon(epsilon, op);
  const auto dims = mean_reduce_dims(x, dim, op);
  std::vector<c10::SymInt> expected;
  for (int64_t i = 0; i < x.dim(); ++i) {
    if (std::find(dims.begin(), dims.end(), i) == dims.end()) {
      expected.push_back(x.sym_size(i));
    } else if (keepdim) {
      expected.emplace_back(1);
    }
  }
  TORCH_SYM_CHECK(c10::sym_equals(grad.sym_sizes(), expected), op, ": expected grad to have the shape of the mean ",
                  c10::SymIntArrayRef(expected), ", got ", shape_str(grad));
  return dims;
}

}  // namespace

Tensor mean_relevance(const Tensor& grad, const Tensor& x, at::OptionalIntArrayRef dim, bool keepdim, double epsilon) {
  const auto dims = check_mean_relevance(grad, x, dim, keepdim, epsilon);
  const auto acc = at::toOpMathType(x.scalar_type());
  Tensor r = grad.to(acc);
  if (!keepdim) {
    for (int64_t d : dims) r = r.unsqueeze(d);  // ascending, so each index is already final
  }
  // R / stab(sum_dim x) on the reduced shape (sums in fp32/fp64), then spread over x
  Tensor q = lrpcpp::stab_div(r, at::sum(x, dims, /*keepdim=*/true, acc), epsilon, 1.0, std::nullopt);
  return at::mul(x, q).to(x.scalar_type());
}

}  // namespace impl

// The compositions of dispatcher calls, registered once for every backend (CPU, CUDA, Meta).
TORCH_LIBRARY_IMPL(lrpcpp, CompositeExplicitAutograd, m) {
  m.impl("mean", &impl::mean);
  m.impl("mean_relevance", &impl::mean_relevance);
}

}  // namespace lrpcpp
