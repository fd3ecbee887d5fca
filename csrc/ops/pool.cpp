// LRP rules for pooling layers, 1 to 3 spatial dimensions, with torch's arguments (as zennit treats them):
//   avg_pool_epsilon, adaptive_avg_pool_epsilon: the epsilon rule (zennit's Norm),
//       R_x = x * P^T (R / stab(y)), P^T the input-gradient of the pooling;
//   max_pool_wta: winner takes all, R_x = P^T R (the input-gradient of the max pooling: each window's
//       relevance goes to its maximum, torch's choice among ties).
// The forwards return torch's pooling (bitwise); the relevance ops compose ATen's pooling backward ops.
// gi = true (gradient-times-input form): the backward takes g with R_y = g * y and returns g_x with
// x * g_x = R_x, exactly: the epsilon rule's relevance is a multiple of x (g_x = P^T (R / stab(y))),
// and the winner of a window is its output (g_x = P^T g, the plain gradient). float16 and bfloat16
// are computed in float32 for the division (compute_dtype), the result is in x's dtype.
// A 1-D pooling runs as the 2-D one over [..., 1, L], as torch computes it.
#include "impl.h"
#include "output_shape.h"

namespace lrpcpp {

// ----------------------------------------------------------------------------- dispatcher entries
Tensor avg_pool_epsilon(const Tensor& x, IntRef kernel_size, IntRef stride, IntRef padding, bool ceil_mode,
                        bool count_include_pad, std::optional<int64_t> divisor_override, double epsilon, bool gi) {
  LRPCPP_DISPATCH(avg_pool_epsilon);
  return op.call(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, epsilon, gi);
}

Tensor avg_pool_epsilon_relevance(const Tensor& grad, const Tensor& x, const Tensor& output, IntRef kernel_size,
                                  IntRef stride, IntRef padding, bool ceil_mode, bool count_include_pad,
                                  std::optional<int64_t> divisor_override, double epsilon, bool gi) {
  LRPCPP_DISPATCH(avg_pool_epsilon_relevance);
  return op.call(grad, x, output, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, epsilon,
                 gi);
}

Tensor adaptive_avg_pool_epsilon(const Tensor& x, IntRef output_size, double epsilon, bool gi) {
  LRPCPP_DISPATCH(adaptive_avg_pool_epsilon);
  return op.call(x, output_size, epsilon, gi);
}

Tensor adaptive_avg_pool_epsilon_relevance(const Tensor& grad, const Tensor& x, const Tensor& output,
                                           IntRef output_size, double epsilon, bool gi) {
  LRPCPP_DISPATCH(adaptive_avg_pool_epsilon_relevance);
  return op.call(grad, x, output, output_size, epsilon, gi);
}

Tensor max_pool_wta(const Tensor& x, IntRef kernel_size, IntRef stride, IntRef padding, IntRef dilation, bool ceil_mode,
                    bool gi) {
  LRPCPP_DISPATCH(max_pool_wta);
  return op.call(x, kernel_size, stride, padding, dilation, ceil_mode, gi);
}

Tensor max_pool_wta_relevance(const Tensor& grad, const Tensor& x, const Tensor& output, IntRef kernel_size,
                              IntRef stride, IntRef padding, IntRef dilation, bool ceil_mode, bool gi) {
  LRPCPP_DISPATCH(max_pool_wta_relevance);
  return op.call(grad, x, output, kernel_size, stride, padding, dilation, ceil_mode, gi);
}

namespace impl {
using namespace detail;

namespace {

// The pooling geometry with one value per spatial dimension (stride [] is the kernel size, as torch's).
struct PoolGeometry {
  int64_t n;  // spatial dimensions
  std::vector<int64_t> kernel, stride, padding, dilation;
};

// x: [batch, channels, *spatial] or [channels, *spatial] with n = len(kernel_size) in 1..3 spatial
// dimensions; each of stride, padding, dilation has n values or one (none: stride the kernel size, padding 0,
// dilation 1); the padding at most half the (dilated) kernel, which fits into the padded input, as torch checks.
PoolGeometry check_pool(const Tensor& x, IntRef kernel_size, IntRef stride, IntRef padding, IntRef dilation,
                        const char* op) {
  check_floating(x, op, "x");
  const int64_t n = static_cast<int64_t>(kernel_size.size());
  TORCH_CHECK(n >= 1 && n <= 3, op, ": expected kernel_size to have 1 to 3 values (one per spatial dimension), got ",
              kernel_size);
  TORCH_CHECK(x.dim() == n + 1 || x.dim() == n + 2, op, ": expected x to be ", n + 1, "-D or ", n + 2,
              "-D ([batch,] channels, *spatial) for a ", n, "-D pooling, got shape ", shape_str(x));
  const auto expand = [&](IntRef v, const char* arg, IntRef fallback) {
    if (v.empty()) v = fallback;
    TORCH_CHECK(static_cast<int64_t>(v.size()) == n || v.size() == 1, op, ": expected ", arg, " to have ", n,
                " values (one per spatial dimension) or one, got ", v);
    std::vector<int64_t> out(n);
    for (int64_t i = 0; i < n; ++i) out[i] = v.size() == 1 ? v[0] : v[i];
    return out;
  };
  for (int64_t d = x.dim() == n + 2 ? 1 : 0; d < x.dim(); ++d) {
    TORCH_SYM_CHECK(x.sym_size(d).sym_ne(0), op,
                    ": expected x to have a non-zero size in every dimension but the batch, got shape ", shape_str(x));
  }
  const std::array<int64_t, 1> zero{0}, one{1};
  PoolGeometry g{n, expand(kernel_size, "kernel_size", kernel_size), expand(stride, "stride", kernel_size),
                 expand(padding, "padding", zero), expand(dilation, "dilation", one)};
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(g.kernel[i] >= 1, op, ": expected kernel_size >= 1, got ", kernel_size);
    TORCH_CHECK(g.stride[i] >= 1, op, ": expected stride >= 1, got ", stride);
    TORCH_CHECK(g.dilation[i] >= 1, op, ": expected dilation >= 1, got ", dilation);
    const auto extent = g.dilation[i] * (g.kernel[i] - 1) + 1;
    TORCH_CHECK(g.padding[i] >= 0 && 2 * g.padding[i] <= extent, op,
                ": expected padding >= 0 and at most half the (dilated) kernel size, got padding=", padding,
                ", kernel_size=", kernel_size, ", dilation=", dilation);
    TORCH_SYM_CHECK((x.sym_size(x.dim() - n + i) + 2 * g.padding[i]).sym_ge(extent), op,
                    ": expected the (dilated) kernel ", kernel_size, " to fit into x ", shape_str(x), " padded by ",
                    padding, " at dimension ", x.dim() - n + i);
  }
  return g;
}

// the output sizes of a pooling with g over x (torch's pooling_output_shape)
std::vector<c10::SymInt> pool_output_sizes(const Tensor& x, const PoolGeometry& g, bool ceil_mode) {
  std::vector<c10::SymInt> out(x.sym_sizes().begin(), x.sym_sizes().end() - g.n);
  for (int64_t i = 0; i < g.n; ++i) {
    const c10::SymInt in = x.sym_size(x.dim() - g.n + i);
    const int64_t k = g.dilation[i] * (g.kernel[i] - 1) + 1, s = g.stride[i], p = g.padding[i];
    c10::SymInt size = (in + 2 * p - k + (ceil_mode ? s - 1 : 0)) / s + 1;
    // the last window starts inside the input or its left padding
    if (ceil_mode && ((size - 1) * s).sym_ge(in + p).guard_bool(__FILE__, __LINE__)) size = size - 1;
    out.push_back(size);
  }
  return out;
}

void check_relevance_inputs(const Tensor& grad, const Tensor& x, const Tensor& output, double epsilon, const char* op) {
  check_grad_output(grad, output, x, op);
  check_epsilon(epsilon, op);
}

// [..., L] -> [..., 1, L] and the 2-D geometry of a 1-D pooling (torch runs it as a 2-D one)
Tensor as_2d(const Tensor& t) {
  return t.unsqueeze(-2);
}
std::vector<int64_t> with_one(const std::vector<int64_t>& v, int64_t first) {
  return {first, v[0]};
}

// P^T s: the input-gradient of the average pooling at s, with x's shape
Tensor avg_pool_transpose(const Tensor& s, const Tensor& x, const PoolGeometry& g, bool ceil_mode,
                          bool count_include_pad, std::optional<int64_t> divisor_override) {
  if (g.n == 1) {
    return at::avg_pool2d_backward(as_2d(s), as_2d(x), with_one(g.kernel, 1), with_one(g.stride, 1),
                                   with_one(g.padding, 0), ceil_mode, count_include_pad, divisor_override)
        .squeeze(-2);
  }
  if (g.n == 2) {
    return at::avg_pool2d_backward(s, x, g.kernel, g.stride, g.padding, ceil_mode, count_include_pad, divisor_override);
  }
  return at::avg_pool3d_backward(s, x, g.kernel, g.stride, g.padding, ceil_mode, count_include_pad, divisor_override);
}

// the epsilon rule through a pooling's transpose: R_x = x * P^T (R / stab(y)); gi: P^T (g y / stab(y))
template <typename Transpose>
Tensor pool_epsilon_relevance(const Tensor& grad, const Tensor& x, const Tensor& output, double epsilon, bool gi,
                              const Transpose& transpose) {
  const auto cd = compute_dtype(x.scalar_type());
  const Tensor r = gi ? grad.to(cd) * output.to(cd) : grad.to(cd);
  const Tensor s = lrpcpp::stab_div(r, output.to(cd), epsilon, 1.0, std::nullopt);
  const Tensor t = transpose(s, x.to(cd));
  return gi ? t.to(x.scalar_type()) : times_input(t, x);
}

}  // namespace

// ----------------------------------------------------------------------------- average pooling
Tensor avg_pool_epsilon(const Tensor& x, IntRef kernel_size, IntRef stride, IntRef padding, bool ceil_mode,
                        bool count_include_pad, std::optional<int64_t> divisor_override, double epsilon, bool /*gi*/) {
  const char* op = "lrpcpp.avg_pool_epsilon";
  const auto g = check_pool(x, kernel_size, stride, padding, {}, op);
  check_epsilon(epsilon, op);
  TORCH_CHECK(!divisor_override.has_value() || *divisor_override != 0, op, ": expected divisor_override != 0");
  if (g.n == 1) {
    TORCH_CHECK(!divisor_override.has_value(), op, ": a 1-D average pooling takes no divisor_override (as torch's)");
    return at::avg_pool1d(x, g.kernel, g.stride, g.padding, ceil_mode, count_include_pad);
  }
  if (g.n == 2) return at::avg_pool2d(x, g.kernel, g.stride, g.padding, ceil_mode, count_include_pad, divisor_override);
  return at::avg_pool3d(x, g.kernel, g.stride, g.padding, ceil_mode, count_include_pad, divisor_override);
}

Tensor avg_pool_epsilon_relevance(const Tensor& grad, const Tensor& x, const Tensor& output, IntRef kernel_size,
                                  IntRef stride, IntRef padding, bool ceil_mode, bool count_include_pad,
                                  std::optional<int64_t> divisor_override, double epsilon, bool gi) {
  const char* op = "lrpcpp.avg_pool_epsilon_relevance";
  const auto g = check_pool(x, kernel_size, stride, padding, {}, op);
  check_relevance_inputs(grad, x, output, epsilon, op);
  TORCH_CHECK(!divisor_override.has_value() || (*divisor_override != 0 && g.n > 1), op,
              ": expected divisor_override != 0, and none for a 1-D average pooling");
  check_output_shape(output, pool_output_sizes(x, g, ceil_mode), op);
  return pool_epsilon_relevance(grad, x, output, epsilon, gi, [&](const Tensor& s, const Tensor& xc) {
    return avg_pool_transpose(s, xc, g, ceil_mode, count_include_pad, divisor_override);
  });
}

// ----------------------------------------------------------------------------- adaptive average pooling
namespace {
int64_t check_adaptive(const Tensor& x, IntRef output_size, const char* op) {
  check_floating(x, op, "x");
  const int64_t n = static_cast<int64_t>(output_size.size());
  TORCH_CHECK(n >= 1 && n <= 3, op, ": expected output_size to have 1 to 3 values (one per spatial dimension), got ",
              output_size);
  TORCH_CHECK(x.dim() == n + 1 || x.dim() == n + 2, op, ": expected x to be ", n + 1, "-D or ", n + 2,
              "-D ([batch,] channels, *spatial) for a ", n, "-D pooling, got shape ", shape_str(x));
  for (int64_t d = x.dim() == n + 2 ? 1 : 0; d < x.dim(); ++d) {
    TORCH_SYM_CHECK(x.sym_size(d).sym_ne(0), op,
                    ": expected x to have a non-zero size in every dimension but the batch, got shape ", shape_str(x));
  }
  for (const auto s : output_size) TORCH_CHECK(s >= 1, op, ": expected output_size >= 1, got ", output_size);
  return n;
}
}  // namespace

Tensor adaptive_avg_pool_epsilon(const Tensor& x, IntRef output_size, double epsilon, bool /*gi*/) {
  const char* op = "lrpcpp.adaptive_avg_pool_epsilon";
  const int64_t n = check_adaptive(x, output_size, op);
  check_epsilon(epsilon, op);
  if (n == 1) return at::adaptive_avg_pool1d(x, output_size);
  if (n == 2) return at::adaptive_avg_pool2d(x, output_size);
  return at::adaptive_avg_pool3d(x, output_size);
}

Tensor adaptive_avg_pool_epsilon_relevance(const Tensor& grad, const Tensor& x, const Tensor& output,
                                           IntRef output_size, double epsilon, bool gi) {
  const char* op = "lrpcpp.adaptive_avg_pool_epsilon_relevance";
  const int64_t n = check_adaptive(x, output_size, op);
  check_relevance_inputs(grad, x, output, epsilon, op);
  std::vector<c10::SymInt> sizes(x.sym_sizes().begin(), x.sym_sizes().end() - n);
  for (const auto s : output_size) sizes.emplace_back(s);
  check_output_shape(output, sizes, op);
  return pool_epsilon_relevance(grad, x, output, epsilon, gi, [&](const Tensor& s, const Tensor& xc) {
    if (n == 1) return at::_adaptive_avg_pool2d_backward(as_2d(s), as_2d(xc)).squeeze(-2);
    if (n == 2) return at::_adaptive_avg_pool2d_backward(s, xc);
    return at::_adaptive_avg_pool3d_backward(s, xc);
  });
}

// ----------------------------------------------------------------------------- max pooling
Tensor max_pool_wta(const Tensor& x, IntRef kernel_size, IntRef stride, IntRef padding, IntRef dilation, bool ceil_mode,
                    bool /*gi*/) {
  const auto g = check_pool(x, kernel_size, stride, padding, dilation, "lrpcpp.max_pool_wta");
  if (g.n == 1) return at::max_pool1d(x, g.kernel, g.stride, g.padding, g.dilation, ceil_mode);
  if (g.n == 2) return at::max_pool2d(x, g.kernel, g.stride, g.padding, g.dilation, ceil_mode);
  return at::max_pool3d(x, g.kernel, g.stride, g.padding, g.dilation, ceil_mode);
}

// R_x = P^T R: each window's relevance to its maximum (the indices of torch's max pooling with indices,
// the one its gradient uses); gi: the same map of g (the winner's x is the window's y)
Tensor max_pool_wta_relevance(const Tensor& grad, const Tensor& x, const Tensor& output, IntRef kernel_size,
                              IntRef stride, IntRef padding, IntRef dilation, bool ceil_mode, bool /*gi*/) {
  const char* op = "lrpcpp.max_pool_wta_relevance";
  const auto g = check_pool(x, kernel_size, stride, padding, dilation, op);
  check_relevance_inputs(grad, x, output, 0.0, op);
  auto sizes = pool_output_sizes(x, g, ceil_mode);
  check_output_shape(output, sizes, op);
  if (g.n == 1) {
    const auto k = with_one(g.kernel, 1), s = with_one(g.stride, 1), p = with_one(g.padding, 0),
               d = with_one(g.dilation, 1);
    const Tensor x2 = as_2d(x);
    const auto indices = std::get<1>(at::max_pool2d_with_indices(x2, k, s, p, d, ceil_mode));
    return at::max_pool2d_with_indices_backward(as_2d(grad), x2, k, s, p, d, ceil_mode, indices).squeeze(-2);
  }
  if (g.n == 2) {
    const auto indices =
        std::get<1>(at::max_pool2d_with_indices(x, g.kernel, g.stride, g.padding, g.dilation, ceil_mode));
    return at::max_pool2d_with_indices_backward(grad, x, g.kernel, g.stride, g.padding, g.dilation, ceil_mode, indices);
  }
  const auto indices =
      std::get<1>(at::max_pool3d_with_indices(x, g.kernel, g.stride, g.padding, g.dilation, ceil_mode));
  return at::max_pool3d_with_indices_backward(grad, x, g.kernel, g.stride, g.padding, g.dilation, ceil_mode, indices);
}

}  // namespace impl

// The compositions of ATen calls, registered once for every backend (CPU, CUDA, Meta).
TORCH_LIBRARY_IMPL(lrpcpp, CompositeExplicitAutograd, m) {
  m.impl("avg_pool_epsilon", &impl::avg_pool_epsilon);
  m.impl("avg_pool_epsilon_relevance", &impl::avg_pool_epsilon_relevance);
  m.impl("adaptive_avg_pool_epsilon", &impl::adaptive_avg_pool_epsilon);
  m.impl("adaptive_avg_pool_epsilon_relevance", &impl::adaptive_avg_pool_epsilon_relevance);
  m.impl("max_pool_wta", &impl::max_pool_wta);
  m.impl("max_pool_wta_relevance", &impl::max_pool_wta_relevance);
}

}  // namespace lrpcpp
