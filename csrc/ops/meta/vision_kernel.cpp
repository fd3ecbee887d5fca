// Meta (shape and dtype only) kernels of the vision family.
#include <torch/library.h>

#include "../impl.h"

namespace lrpcpp {
namespace {

TensorPair two_factor_meta(const Tensor& output) {
  return {at::empty_symint(output.sym_sizes(), output.options()),
          at::empty_symint(output.sym_sizes(), output.options())};
}

TensorPair gamma_stab_div_meta(const Tensor& grad, const Tensor& output, const Tensor& abs_product,
                               const OptTensor& bias, int64_t bias_dim, double gamma, double epsilon, bool /*gi*/) {
  const char* op = "lrpcpp.gamma_stab_div";
  impl::check_factor_inputs(grad, output, abs_product, bias, bias_dim, epsilon, op);
  impl::check_gamma(gamma, op);
  return two_factor_meta(output);
}

TensorPair alpha_beta_stab_div_meta(const Tensor& grad, const Tensor& output, const Tensor& pos_sum,
                                    const Tensor& neg_sum, double alpha, double beta, double epsilon, bool /*gi*/) {
  impl::check_alpha_beta_inputs(grad, output, pos_sum, neg_sum, alpha, beta, epsilon);
  return two_factor_meta(output);
}

Tensor split_times_input_meta(const Tensor& x, const Tensor& a, const Tensor& b, bool /*gi*/) {
  impl::check_split_times_input(x, a, b);
  return at::empty_symint(x.sym_sizes(), x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, Meta, m) {
  m.impl("gamma_stab_div", &gamma_stab_div_meta);
  m.impl("alpha_beta_stab_div", &alpha_beta_stab_div_meta);
  m.impl("split_times_input", &split_times_input_meta);
}

}  // namespace lrpcpp
