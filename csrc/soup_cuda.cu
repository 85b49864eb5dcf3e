// CUDA soup kernels: many tensors per launch (apex multi_tensor_apply pattern), 16-byte vector loads, fp32
// accumulation, the same element-wise numerics as the CPU path (soup_math.h).
//
// A launch carries a table of up to kCudaMaxTensorsPerLaunch tensors in its kernel arguments (< 4 KB) with the
// prefix sum of their chunk counts: block b finds its tensor t by binary search (first_block[t] <= b <
// first_block[t+1]) and handles elements [c * kChunk, (c + 1) * kChunk) of it, c = b - first_block[t]. Each thread
// moves kVec = 8 elements per step: one 16-byte load of bf16/fp16 (two of fp32) and two float4 loads/stores of the
// fp32 accumulator. Tensors whose base addresses are not 16-byte aligned take a scalar loop (the chunk starts are
// multiples of kVec elements, so alignment is decided per tensor).
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "soup.h"
#include "soup_math.h"

namespace kalm_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;
constexpr int64_t kChunk = int64_t{16} * kThreads * kVec;  // 32768 elements: 16 steps of the block
constexpr int kMaxTensors = kCudaMaxTensorsPerLaunch;

struct AccumulateArgs {
  float* acc[kMaxTensors];
  float* comp[kMaxTensors];
  const void* src[kMaxTensors];
  int64_t n[kMaxTensors];
  int first_block[kMaxTensors + 1];
  int8_t dtype[kMaxTensors];
  int num_tensors;
};

struct CastArgs {
  const float* acc[kMaxTensors];
  const float* comp[kMaxTensors];
  void* dst[kMaxTensors];
  int64_t n[kMaxTensors];
  int first_block[kMaxTensors + 1];
  int8_t dtype[kMaxTensors];
  int num_tensors;
};

// Kernel arguments are limited to 4 KB on every architecture and CUDA version we build for.
static_assert(sizeof(AccumulateArgs) + 16 <= 4096, "AccumulateArgs exceeds the kernel-argument space");
static_assert(sizeof(CastArgs) + 16 <= 4096, "CastArgs exceeds the kernel-argument space");

__device__ __forceinline__ int find_tensor(const int* first_block, int num_tensors, int block) {
  int lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (first_block[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

__device__ __forceinline__ void load8_f32(const float* p, float (&v)[kVec]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

__device__ __forceinline__ void store8_f32(float* p, const float (&v)[kVec]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// 8 elements at src + i (i a multiple of 8, src 16-byte aligned) as fp32.
template <int kDtype>
__device__ __forceinline__ void load8(const void* src, int64_t i, float (&v)[kVec]) {
  if constexpr (kDtype == kF32) {
    load8_f32(static_cast<const float*>(src) + i, v);
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(src) + i);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // little endian: element 2j in the low half of word j
      const uint16_t lo = static_cast<uint16_t>(words[j] & 0xffffu), hi = static_cast<uint16_t>(words[j] >> 16);
      v[2 * j] = kDtype == kBF16 ? bf16_to_f32(lo) : f16_to_f32(lo);
      v[2 * j + 1] = kDtype == kBF16 ? bf16_to_f32(hi) : f16_to_f32(hi);
    }
  }
}

// 8 fp32 values rounded into dst + i (i a multiple of 8, dst 16-byte aligned).
template <int kDtype>
__device__ __forceinline__ void store8(void* dst, int64_t i, const float (&v)[kVec]) {
  if constexpr (kDtype == kF32) {
    store8_f32(static_cast<float*>(dst) + i, v);
  } else {
    uint32_t words[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t lo = kDtype == kBF16 ? f32_to_bf16(v[2 * j]) : f32_to_f16(v[2 * j]);
      const uint32_t hi = kDtype == kBF16 ? f32_to_bf16(v[2 * j + 1]) : f32_to_f16(v[2 * j + 1]);
      words[j] = lo | (hi << 16);
    }
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(dst) + i) = make_uint4(words[0], words[1], words[2], words[3]);
  }
}

// One element: plain s (+)= w * x, or the compensated step on (s, c) with w = hi + lo (soup_math.h).
template <bool kCompensated, bool kFirst>
__device__ __forceinline__ void step(float& s, float& c, float w, float hi, float lo, float x) {
  if constexpr (kCompensated && kFirst) {
    neumaier_first(s, c, hi, lo, x);
  } else if constexpr (kCompensated) {
    neumaier(s, c, hi, lo, x);
  } else if constexpr (kFirst) {
    s = f32_mul(w, x);
  } else {
    s = axpy(s, w, x);
  }
}

// Elements [begin, end) of one tensor; begin is a multiple of kChunk.
template <int kDtype, bool kCompensated, bool kFirst>
__device__ void accumulate_chunk(float* acc, float* comp, const void* src, int64_t begin, int64_t end, float w) {
  const float hi = weight_hi(w), lo = f32_sub(w, hi);
  int64_t scalar_begin = begin;
  if (aligned16(acc) && aligned16(src) && (!kCompensated || aligned16(comp))) {
    scalar_begin = begin + (end - begin) / kVec * kVec;
    for (int64_t i = begin + int64_t{threadIdx.x} * kVec; i < scalar_begin; i += int64_t{kThreads} * kVec) {
      float x[kVec], s[kVec] = {}, c[kVec] = {};
      load8<kDtype>(src, i, x);
      if constexpr (!kFirst) load8_f32(acc + i, s);
      if constexpr (kCompensated && !kFirst) load8_f32(comp + i, c);
#pragma unroll
      for (int j = 0; j < kVec; ++j) step<kCompensated, kFirst>(s[j], c[j], w, hi, lo, x[j]);
      store8_f32(acc + i, s);
      if constexpr (kCompensated) store8_f32(comp + i, c);
    }
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += kThreads) {
    float s = kFirst ? 0.0f : acc[i];
    float c = (kCompensated && !kFirst) ? comp[i] : 0.0f;
    step<kCompensated, kFirst>(s, c, w, hi, lo, load_elem<kDtype>(src, i));
    acc[i] = s;
    if constexpr (kCompensated) comp[i] = c;
  }
}

template <bool kFirst>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(const __grid_constant__ AccumulateArgs args, float w) {
  const int block = static_cast<int>(blockIdx.x);
  const int t = find_tensor(args.first_block, args.num_tensors, block);
  const int64_t begin = int64_t{block - args.first_block[t]} * kChunk;
  const int64_t end = min(args.n[t], begin + kChunk);
  float* acc = args.acc[t];
  float* comp = args.comp[t];
  const void* src = args.src[t];
  const bool compensated = comp != nullptr;
  switch (args.dtype[t]) {
    case kF32:
      compensated ? accumulate_chunk<kF32, true, kFirst>(acc, comp, src, begin, end, w)
                  : accumulate_chunk<kF32, false, kFirst>(acc, comp, src, begin, end, w);
      break;
    case kF16:
      compensated ? accumulate_chunk<kF16, true, kFirst>(acc, comp, src, begin, end, w)
                  : accumulate_chunk<kF16, false, kFirst>(acc, comp, src, begin, end, w);
      break;
    default:
      compensated ? accumulate_chunk<kBF16, true, kFirst>(acc, comp, src, begin, end, w)
                  : accumulate_chunk<kBF16, false, kFirst>(acc, comp, src, begin, end, w);
      break;
  }
}

template <int kDtype, bool kCompensated>
__device__ void cast_chunk(const float* acc, const float* comp, void* dst, int64_t begin, int64_t end,
                           float divisor) {
  int64_t scalar_begin = begin;
  if (aligned16(acc) && aligned16(dst) && (!kCompensated || aligned16(comp))) {
    scalar_begin = begin + (end - begin) / kVec * kVec;
    for (int64_t i = begin + int64_t{threadIdx.x} * kVec; i < scalar_begin; i += int64_t{kThreads} * kVec) {
      float s[kVec], c[kVec];
      load8_f32(acc + i, s);
      if constexpr (kCompensated) load8_f32(comp + i, c);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        s[j] = canonical_f32(f32_div(kCompensated ? compensated_total(s[j], c[j]) : s[j], divisor));
      }
      store8<kDtype>(dst, i, s);
    }
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += kThreads) {
    const float total = kCompensated ? compensated_total(acc[i], comp[i]) : acc[i];
    store_elem<kDtype>(dst, i, f32_div(total, divisor));
  }
}

__global__ void __launch_bounds__(kThreads) cast_kernel(const __grid_constant__ CastArgs args, float divisor) {
  const int block = static_cast<int>(blockIdx.x);
  const int t = find_tensor(args.first_block, args.num_tensors, block);
  const int64_t begin = int64_t{block - args.first_block[t]} * kChunk;
  const int64_t end = min(args.n[t], begin + kChunk);
  const float* acc = args.acc[t];
  const float* comp = args.comp[t];
  void* dst = args.dst[t];
  const bool compensated = comp != nullptr;
  switch (args.dtype[t]) {
    case kF32:
      compensated ? cast_chunk<kF32, true>(acc, comp, dst, begin, end, divisor)
                  : cast_chunk<kF32, false>(acc, comp, dst, begin, end, divisor);
      break;
    case kF16:
      compensated ? cast_chunk<kF16, true>(acc, comp, dst, begin, end, divisor)
                  : cast_chunk<kF16, false>(acc, comp, dst, begin, end, divisor);
      break;
    default:
      compensated ? cast_chunk<kBF16, true>(acc, comp, dst, begin, end, divisor)
                  : cast_chunk<kBF16, false>(acc, comp, dst, begin, end, divisor);
      break;
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("kalm_fast._C.") + what + ": CUDA error: " + cudaGetErrorString(err));
  }
}

// Packs entries into argument tables of at most kMaxTensors tensors and INT_MAX blocks and calls
// launch(args, blocks) for each; set(args, slot, entry) fills one table row.
template <class Args, class Entry, class Set, class Launch>
void multi_tensor_apply(const std::vector<Entry>& entries, const Set& set, const Launch& launch) {
  Args args;
  int num = 0;
  int64_t blocks = 0;
  auto flush = [&] {
    if (num == 0) return;
    args.num_tensors = num;
    args.first_block[num] = static_cast<int>(blocks);
    launch(args, static_cast<unsigned>(blocks));
    num = 0;
    blocks = 0;
  };
  for (const Entry& e : entries) {
    if (e.n == 0) continue;
    const int64_t chunks = (e.n + kChunk - 1) / kChunk;
    if (chunks > INT_MAX) throw std::invalid_argument("kalm_fast._C: tensor too large for one launch");
    if (num == kMaxTensors || blocks + chunks > INT_MAX) flush();
    set(args, num, e);
    args.n[num] = e.n;
    args.dtype[num] = static_cast<int8_t>(e.dtype);
    args.first_block[num] = static_cast<int>(blocks);
    blocks += chunks;
    ++num;
  }
  flush();
}

}  // namespace

void cuda_accumulate(const std::vector<AccumulateEntry>& entries, float weight, bool first, std::intptr_t stream) {
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  multi_tensor_apply<AccumulateArgs>(
      entries,
      [](AccumulateArgs& a, int k, const AccumulateEntry& e) {
        a.acc[k] = e.acc;
        a.comp[k] = e.comp;
        a.src[k] = e.src;
      },
      [&](const AccumulateArgs& a, unsigned blocks) {
        if (first) {
          accumulate_kernel<true><<<blocks, kThreads, 0, s>>>(a, weight);
        } else {
          accumulate_kernel<false><<<blocks, kThreads, 0, s>>>(a, weight);
        }
        check_launch("cuda_accumulate");
      });
}

void cuda_cast(const std::vector<CastEntry>& entries, float divisor, std::intptr_t stream) {
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  multi_tensor_apply<CastArgs>(
      entries,
      [](CastArgs& a, int k, const CastEntry& e) {
        a.acc[k] = e.acc;
        a.comp[k] = e.comp;
        a.dst[k] = e.dst;
      },
      [&](const CastArgs& a, unsigned blocks) {
        cast_kernel<<<blocks, kThreads, 0, s>>>(a, divisor);
        check_launch("cuda_cast");
      });
}

}  // namespace kalm_fast
