// On the CPU, ATen computes exp, log, sqrt, tanh, erf and the other transcendental functions of
// contiguous float and double tensors with MKL's vector math library (VML) when torch is built with MKL,
// each intra-op thread on its own chunk. VML resolves each function's kernel lazily, on its first call,
// and when that first call runs on two threads at once one of them can run a low-accuracy kernel for
// its whole chunk although high accuracy is asked for (errors of thousands of ulp; pytorch/pytorch
// issue 188792). On the development machine a fresh process's first `exp` of a float64 tensor on two
// threads differed from the second in 10-25% of processes (relative 3e-9), and lrpcpp's fused attention
// inherited such errors. lrpcpp's CPU kernels call these functions inside their own parallel loops, so
// loading the library calls each of them once per dtype on one element, from the loading thread: the
// kernels are resolved before any concurrent call, in lrpcpp's ops and in torch's own.
#include <ATen/ATen.h>

#include <initializer_list>

namespace lrpcpp {
namespace {

bool resolve_vector_math_kernels() noexcept {
  try {
    for (const auto dtype : {at::kFloat, at::kDouble}) {
      const at::Tensor x = at::full({1}, 0.5, at::TensorOptions().dtype(dtype));
      for (const auto& f :
           {at::abs,   at::acos,   at::asin, at::atan, at::ceil,       at::cos,   at::cosh,   at::erf,
            at::erfc,  at::erfinv, at::exp,  at::exp2, at::expm1,      at::floor, at::lgamma, at::log,
            at::log10, at::log1p,  at::log2, at::neg,  at::reciprocal, at::round, at::rsqrt,  at::sigmoid,
            at::sin,   at::sinh,   at::sqrt, at::tan,  at::tanh,       at::trunc}) {
        f(x);
      }
    }
    return true;
  } catch (...) {  // never fail the library's loading: without the warm-up only the race remains
    return false;
  }
}

[[maybe_unused]] const bool kVectorMathResolved = resolve_vector_math_kernels();

}  // namespace
}  // namespace lrpcpp
