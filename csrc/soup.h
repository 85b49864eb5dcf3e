// Host interface of the soup kernels (CPU: soup_cpu.cpp, CUDA: soup_cuda.cu). Buffers are raw pointers taken from
// torch tensors in Python; the kernels trust them (kalm_fast/soup.py checks devices, dtypes and sizes).
#pragma once

#include <cstdint>
#include <vector>

namespace kalm_fast {

// acc[i] (+ comp[i]) <- w * src[i] for the first input, or accumulated into for the next ones. acc/comp are fp32,
// comp is null for plain accumulation; src has `dtype` (DType).
struct AccumulateEntry {
  float* acc;
  float* comp;
  const void* src;
  int64_t n;
  int dtype;
};

// dst[i] <- round_to_nearest_even((acc[i] (+ comp[i])) / divisor) in `dtype`.
struct CastEntry {
  const float* acc;
  const float* comp;
  void* dst;
  int64_t n;
  int dtype;
};

// One output tensor (piece) of a fused soup step: dst[i] <- RNE(sum_k w_k src_k[i] / divisor) in `dtype`, the
// sources (one per input, in input order) in srcs[first_src, first_src + K) of the step.
struct SoupEntry {
  void* dst;
  int64_t n;
  int dtype;
};
struct SoupSource {
  const void* src;
  int dtype;
};

// num_threads <= 0: one thread per hardware thread. Small work runs on fewer threads (>= 64Ki elements each).
void cpu_accumulate(const std::vector<AccumulateEntry>& entries, float weight, bool first, int num_threads);
void cpu_cast(const std::vector<CastEntry>& entries, float divisor, int num_threads);
// The whole soup of a chunk in one pass: for entry j, srcs[j * K + k] is input k's piece (K = weights.size()).
// Element by element the same operations in the same order as cpu_accumulate over k then cpu_cast (same bits), on
// an fp32 tile (+ compensation tile) that stays in L1 instead of a chunk-sized accumulator in memory.
void cpu_soup(const std::vector<SoupEntry>& entries, const std::vector<SoupSource>& srcs,
              const std::vector<float>& weights, float divisor, bool compensated, int num_threads);

#ifdef KALM_FAST_WITH_CUDA
// Tensors described in one launch's kernel arguments (apex multi_tensor_apply pattern); more make more launches.
constexpr int kCudaMaxTensorsPerLaunch = 64;

// Many tensors per launch on `stream` (a cudaStream_t as an integer); asynchronous like any kernel launch.
void cuda_accumulate(const std::vector<AccumulateEntry>& entries, float weight, bool first, std::intptr_t stream);
void cuda_cast(const std::vector<CastEntry>& entries, float divisor, std::intptr_t stream);
#endif

}  // namespace kalm_fast
