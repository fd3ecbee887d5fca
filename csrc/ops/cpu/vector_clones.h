// LRPCPP_VECTOR_CLONES: an element-wise loop compiled also for AVX-512 and AVX2 (GCC on x86-64 picks the
// widest the processor has when the library loads) where the library itself targets the baseline x86-64
// (SSE2): the same operations per element, with no multiply and add fused into one rounding
// (fp-contract=off), so the results are the same bits on every processor. For functions whose loop has
// no reduction (a wider vector would sum in another order) and calls only inline functions.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LRPCPP_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), optimize("fp-contract=off")))
#else
#define LRPCPP_VECTOR_CLONES
#endif
