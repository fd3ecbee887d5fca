// Shared pieces of the CUDA kernels: the launch configuration, vectorised
// element access, a block-wide sum, and the launch check.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "../common.h"

namespace lrpcpp::cuda {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

inline cudaStream_t stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}

inline int blocks_for(int64_t work) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks)));
}

// N values of T loaded or stored with one instruction (16 bytes at most).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store(T* p, const Pack<T, N>& x) {
  *reinterpret_cast<Pack<T, N>*>(p) = x;
}

// Elements per 16-byte pack of the narrowest type T of a kernel.
template <typename T>
constexpr int pack_size() {
  return 16 / sizeof(T) > 8 ? 8 : static_cast<int>(16 / sizeof(T));
}

inline bool aligned(const void* p, int bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// Grid-stride loop over n elements: op.template apply<N>(i) handles elements
// [i, i + N); full packs first, then the tail one by one.
template <int N, typename Op>
__global__ void elementwise_kernel(int64_t n, Op op) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / N;
  for (int64_t p = tid; p < packs; p += stride) op.template apply<N>(p * N);
  for (int64_t i = packs * N + tid; i < n; i += stride) op.template apply<1>(i);
}

// Launches op over n elements with packs of N when `vectorise`, else one by one.
template <int N, typename Op>
void launch_elementwise(int64_t n, bool vectorise, const Op& op) {
  if (n == 0) return;
  if (vectorise) {
    elementwise_kernel<N><<<blocks_for((n + N - 1) / N), kThreads, 0, stream()>>>(n, op);
  } else {
    elementwise_kernel<1><<<blocks_for(n), kThreads, 0, stream()>>>(n, op);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Sum of v over the block; every thread gets the result. `scratch` holds 32 values.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) / 32;
    v = lane < warps ? scratch[lane] : T(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

// Mean and 1 / sqrt(biased variance + eps) of the row `xr` of a layer norm's input, one block per
// row; every thread gets both.
template <typename acc_t>
struct RowStats {
  acc_t mean, rstd;
};

template <typename acc_t, typename scalar_t>
__device__ RowStats<acc_t> block_row_stats(const scalar_t* xr, int64_t len, acc_t eps, acc_t* scratch) {
  acc_t partial = 0;
  for (int64_t k = threadIdx.x; k < len; k += blockDim.x) partial += static_cast<acc_t>(xr[k]);
  const acc_t mean = block_sum(partial, scratch) / len;
  partial = 0;
  for (int64_t k = threadIdx.x; k < len; k += blockDim.x) {
    const acc_t d = static_cast<acc_t>(xr[k]) - mean;
    partial += d * d;
  }
  return {mean, rsqrt(block_sum(partial, scratch) / len + eps)};
}

// Threads per block of the row kernels (one block per row), at most. They are declared with
// __launch_bounds__(kMaxRowThreads), so that the compiler keeps their registers within what a block
// of that many threads may use (64 per thread): a kernel that grew past that would otherwise fail at
// launch with "too many resources requested for launch", on long rows only.
constexpr int kMaxRowThreads = 1024;

// Threads per block for a row of `len` elements: a power of 2 from 32 (one warp) to kMaxRowThreads.
inline int row_threads(int64_t len) {
  int t = 32;
  while (t < kMaxRowThreads && t < len) t *= 2;
  return t;
}

}  // namespace lrpcpp::cuda
