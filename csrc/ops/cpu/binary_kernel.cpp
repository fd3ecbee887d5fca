// CPU kernels of the binary family: add2's relevance in one pass over R, a
// and b (broadcasting through TensorIterator).
#include <torch/library.h>

#include "../impl.h"
#include "../rule_math.h"
#include "loops.h"

namespace lrpcpp {
namespace {

TensorPair add2_relevance_cpu(const Tensor& grad, const Tensor& a, const Tensor& b, double epsilon,
                              std::array<bool, 2> output_mask) {
  impl::check_add2_relevance(grad, a, b, epsilon);
  if (!output_mask[0] && !output_mask[1]) return {};
  // relevance of each summand at the broadcast shape, then summed back to its own shape
  Tensor ra = at::empty(grad.sizes(), grad.options());
  Tensor rb = at::empty(grad.sizes(), grad.options());
  if (grad.numel() > 0) {
    auto iter = at::TensorIteratorConfig()
                    .add_output(ra)
                    .add_output(rb)
                    .add_const_input(grad)
                    .add_const_input(a)
                    .add_const_input(b)
                    .build();
    LRPCPP_DISPATCH_FLOATING(grad.scalar_type(), "lrpcpp_add2_relevance_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t e = static_cast<acc_t>(epsilon);
      iter.for_each([&](char** data, const int64_t* strides, int64_t n) {
        cpu::typed_loop<scalar_t, scalar_t, const scalar_t, const scalar_t, const scalar_t>(
            data, strides, n,
            [e](scalar_t& ra_i, scalar_t& rb_i, const scalar_t& r_i, const scalar_t& a_i, const scalar_t& b_i) {
              const acc_t r = r_i, va = a_i, vb = b_i, y = va + vb;
              ra_i = static_cast<scalar_t>(math::add_share(va, r, y, e));
              rb_i = static_cast<scalar_t>(math::add_share(vb, r, y, e));
            });
      });
    });
  }
  return {output_mask[0] ? at::sum_to(ra, a.sizes()) : Tensor(), output_mask[1] ? at::sum_to(rb, b.sizes()) : Tensor()};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpcpp, CPU, m) {
  m.impl("add2_relevance", &add2_relevance_cpu);
}

}  // namespace lrpcpp
