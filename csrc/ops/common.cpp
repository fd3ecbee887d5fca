#include "common.h"

#include <sstream>

namespace lrpcpp::detail {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sym_sizes();
  return s.str();
}

namespace {
bool is_kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}
}  // namespace

void check_floating(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.defined(), op, ": expected ", arg, " to be a tensor, got an undefined tensor");
  TORCH_CHECK(is_kernel_dtype(t.scalar_type()), op, ": expected ", arg,
              " to be a floating-point tensor (float64, float32, float16 or bfloat16), got ", t.scalar_type());
}

void check_floating_dtype(at::ScalarType dtype, const char* op, const char* arg) {
  TORCH_CHECK(is_kernel_dtype(dtype), op, ": expected ", arg,
              " to be a floating-point type (float64, float32, float16 or bfloat16), got ", dtype);
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                       const char* ref_arg) {
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", arg, " to be on the same device as ", ref_arg, " (",
              ref.device(), "), got ", t.device());
}

void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                      const char* ref_arg) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected ", arg, " to have the dtype of ", ref_arg, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                      const char* ref_arg) {
  TORCH_SYM_CHECK(c10::sym_equals(t.sym_sizes(), ref.sym_sizes()), op, ": expected ", arg, " to have the shape of ",
                  ref_arg, " ", shape_str(ref), ", got ", shape_str(t));
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg, const char* ref_arg) {
  check_floating(t, op, arg);
  check_same_device(t, ref, op, arg, ref_arg);
  check_same_dtype(t, ref, op, arg, ref_arg);
}

void check_epsilon(double epsilon, const char* op, const char* arg) {
  TORCH_CHECK(epsilon >= 0.0 && std::isfinite(epsilon), op, ": expected ", arg, " to be a finite number >= 0, got ",
              epsilon);
}

void check_finite(double value, const char* op, const char* arg) {
  TORCH_CHECK(std::isfinite(value), op, ": expected ", arg, " to be a finite number, got ", value);
}

at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf ? at::kFloat : dtype;
}

at::Tensor times_input(at::Tensor g, const at::Tensor& x) {
  g.mul_(x);
  return g.scalar_type() == x.scalar_type() ? g : g.to(x.scalar_type());
}

}  // namespace lrpcpp::detail
