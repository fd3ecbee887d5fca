// Argument checks and small helpers shared by every op and backend.
//
// Checks read symbolic sizes (sym_size) so that the same code serves eager
// kernels and Meta kernels under torch.compile's dynamic shapes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <string>
#include <type_traits>

// fp64, fp32, fp16, bf16: the dtypes every lrpcpp kernel takes.
#define LRPCPP_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace lrpcpp::detail {

// Tensor arguments: names appear in the message as `op: expected <arg> ...`.
// float64, float32, float16 or bfloat16 (not float8 nor complex: no lrpcpp kernel takes them).
void check_floating(const at::Tensor& t, const char* op, const char* arg);
// a dtype argument (the dtype of a result): one of the same four
void check_floating_dtype(at::ScalarType dtype, const char* op, const char* arg);
void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                       const char* ref_arg);
void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg, const char* ref_arg);
void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg, const char* ref_arg);
// floating, same device and same dtype as `ref` in one call (the common case).
void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg, const char* ref_arg);
void check_epsilon(double epsilon, const char* op, const char* arg = "epsilon");
void check_finite(double value, const char* op, const char* arg);

// "[2, 3, 4]" for messages.
std::string shape_str(const at::Tensor& t);

// The dtype in which a rule's intermediate values (R / stab(z), matrix
// products of them) are kept: fp16 has too little range for R / eps, so it is
// promoted to fp32; bf16, fp32 and fp64 keep their own type (bf16 products
// accumulate in fp32 inside ATen's matmul).
at::ScalarType compute_dtype(at::ScalarType dtype);

// x * g, returned in x's dtype; g is a fresh temporary and is reused in place.
at::Tensor times_input(at::Tensor g, const at::Tensor& x);

// The accumulation type of a kernel over two storage types: double if either one's is, else float.
template <typename A, typename B>
using opmath_pair_t =
    std::conditional_t<std::is_same_v<at::opmath_type<A>, double> || std::is_same_v<at::opmath_type<B>, double>, double,
                       float>;

}  // namespace lrpcpp::detail
