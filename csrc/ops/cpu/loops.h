// Small helpers for the CPU kernels: typed element access inside a
// TensorIterator loop, and the accumulation type of a storage type.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>

namespace lrpcpp::cpu {

// Elements per task for at::parallel_for on element-wise work.
constexpr int64_t kGrain = 32768;

// Operand k, element i of a TensorIterator 1-D loop, as a T.
template <typename T>
inline T& elem(char** data, const int64_t* strides, int k, int64_t i) {
  return *reinterpret_cast<T*>(data[k] + i * strides[k]);
}

// Rows per task when each row holds `row_len` elements.
inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(row_len, 1));
}

}  // namespace lrpcpp::cpu

// fp64, fp32, fp16, bf16: the dtypes every lrpcpp kernel takes.
#define LRPCPP_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
