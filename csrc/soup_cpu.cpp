// CPU soup kernels: acc (+)= w * x from bf16/fp16/fp32 into fp32, and the final fp32 -> bf16/fp16/fp32 cast.
//
// Work is split over std::threads by elements of the concatenated entries (no OpenMP: a second libgomp beside
// torch's is a known source of trouble). The inner loops are branch-free element-wise code on restrict pointers, which
// the compiler vectorizes; on x86-64 Linux/GCC each loop is also built for AVX2 and picked at load time (ifunc):
// wider vectors for the compensated loops, whose arithmetic counts once a chunk's accumulator sits in cache. Same
// IEEE ops in every variant (no FMA), so the results do not depend on the CPU.
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "soup.h"
#include "soup_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define KF_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define KF_CLONES
#endif

namespace kalm_fast {
namespace {

constexpr int64_t kMinPerThread = int64_t{1} << 16;  // below this a thread costs more than it saves
constexpr int64_t kAlign = 16;                        // thread ranges start on 64-byte lines of the fp32 buffers

// fn(begin, end) over [0, total) on up to num_threads threads, the calling thread included.
template <class F>
void parallel_for(int64_t total, int num_threads, const F& fn) {
  int64_t threads = num_threads > 0 ? num_threads : std::max(1u, std::thread::hardware_concurrency());
  threads = std::max<int64_t>(1, std::min(threads, (total + kMinPerThread - 1) / kMinPerThread));
  if (threads == 1) {
    fn(int64_t{0}, total);
    return;
  }
  auto bound = [&](int64_t t) {
    const int64_t b = (total / threads) * t + (total % threads) * t / threads;
    return std::min(total, (b + kAlign - 1) / kAlign * kAlign);
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  int64_t t = 1;
  try {
    for (; t < threads; ++t) pool.emplace_back(fn, bound(t), bound(t + 1));
  } catch (...) {  // no more threads available: the calling thread does the rest
    for (; t < threads; ++t) fn(bound(t), bound(t + 1));
  }
  fn(bound(0), bound(1));
  for (auto& th : pool) th.join();
}

// Maps a range of the concatenated element space onto the entries it overlaps: piece(entry, offset, count).
template <class Entry, class F>
void for_pieces(const std::vector<Entry>& entries, const std::vector<int64_t>& starts, int64_t begin, int64_t end,
                const F& piece) {
  size_t k = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
  for (; k < entries.size() && starts[k] < end; ++k) {
    const int64_t lo = std::max(begin, starts[k]) - starts[k];
    const int64_t hi = std::min(end, starts[k] + entries[k].n) - starts[k];
    if (hi > lo) piece(entries[k], lo, hi - lo);
  }
}

template <class Entry>
std::vector<int64_t> prefix_starts(const std::vector<Entry>& entries, int64_t* total) {
  std::vector<int64_t> starts(entries.size());
  int64_t s = 0;
  for (size_t k = 0; k < entries.size(); ++k) {
    starts[k] = s;
    s += entries[k].n;
  }
  *total = s;
  return starts;
}

// Plain: acc = w * x (first) or acc += w * x. Compensated: (acc, comp) as (s, c) of soup_math.h's neumaier_first /
// neumaier with w = hi + lo, the lo term present iff kLo (lo != 0), decided outside the loop so it vectorizes.
template <int kDtype, bool kCompensated, bool kFirst, bool kLo>
KF_CLONES void accumulate_loop(float* __restrict acc, float* __restrict comp, const void* __restrict src,
                               int64_t n, float w, float hi, float lo) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = load_elem<kDtype>(src, i);
    if constexpr (kCompensated) {
      float s, c;
      if constexpr (kFirst) {
        s = f32_mul(hi, x);
        c = 0.0f;
      } else {
        s = acc[i];
        c = comp[i];
        neumaier_add(s, c, f32_mul(hi, x));
      }
      if constexpr (kLo) neumaier_add(s, c, f32_mul(lo, x));
      acc[i] = s;
      comp[i] = c;
    } else if constexpr (kFirst) {
      acc[i] = f32_mul(w, x);
    } else {
      acc[i] = axpy(acc[i], w, x);
    }
  }
}

template <int kDtype, bool kCompensated>
KF_CLONES void cast_loop(const float* __restrict acc, const float* __restrict comp, void* __restrict dst,
                         int64_t n, float divisor) {
  for (int64_t i = 0; i < n; ++i) {
    const float total = kCompensated ? compensated_total(acc[i], comp[i]) : acc[i];
    store_elem<kDtype>(dst, i, f32_div(total, divisor));
  }
}

template <int kDtype, bool kCompensated, bool kFirst>
void accumulate_typed(float* acc, float* comp, const void* src, int64_t n, float w) {
  const float hi = weight_hi(w), lo = f32_sub(w, hi);
  if (kCompensated && lo != 0.0f) {
    accumulate_loop<kDtype, kCompensated, kFirst, true>(acc, comp, src, n, w, hi, lo);
  } else {
    accumulate_loop<kDtype, kCompensated, kFirst, false>(acc, comp, src, n, w, hi, lo);
  }
}

template <int kDtype, bool kCompensated>
void accumulate_dispatch_first(const AccumulateEntry& e, int64_t off, int64_t n, float w, bool first) {
  float* acc = e.acc + off;
  float* comp = kCompensated ? e.comp + off : nullptr;
  const void* src = static_cast<const char*>(e.src) + off * (kDtype == kF32 ? 4 : 2);
  if (first) {
    accumulate_typed<kDtype, kCompensated, true>(acc, comp, src, n, w);
  } else {
    accumulate_typed<kDtype, kCompensated, false>(acc, comp, src, n, w);
  }
}

template <bool kCompensated>
void accumulate_piece(const AccumulateEntry& e, int64_t off, int64_t n, float w, bool first) {
  switch (e.dtype) {
    case kF32: accumulate_dispatch_first<kF32, kCompensated>(e, off, n, w, first); break;
    case kF16: accumulate_dispatch_first<kF16, kCompensated>(e, off, n, w, first); break;
    default: accumulate_dispatch_first<kBF16, kCompensated>(e, off, n, w, first); break;
  }
}

template <int kDtype>
void cast_piece_typed(const CastEntry& e, int64_t off, int64_t n, float divisor) {
  void* dst = static_cast<char*>(e.dst) + off * (kDtype == kF32 ? 4 : 2);
  if (e.comp != nullptr) {
    cast_loop<kDtype, true>(e.acc + off, e.comp + off, dst, n, divisor);
  } else {
    cast_loop<kDtype, false>(e.acc + off, nullptr, dst, n, divisor);
  }
}

void cast_piece(const CastEntry& e, int64_t off, int64_t n, float divisor) {
  switch (e.dtype) {
    case kF32: cast_piece_typed<kF32>(e, off, n, divisor); break;
    case kF16: cast_piece_typed<kF16>(e, off, n, divisor); break;
    default: cast_piece_typed<kBF16>(e, off, n, divisor); break;
  }
}

constexpr int64_t kTile = 2048;  // fp32 sum + compensation of a tile: 16 KB, within L1

// Entry j of a fused soup, elements [off, off + n): K accumulate steps and the cast on L1-resident tiles.
template <bool kCompensated>
void soup_piece(const SoupEntry& e, const SoupSource* srcs, const std::vector<float>& weights, float divisor,
                int64_t off, int64_t n) {
  alignas(64) float acc[kTile];
  alignas(64) float comp[kTile];
  const size_t K = weights.size();
  const int64_t dst_size = e.dtype == kF32 ? 4 : 2;
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t m = std::min(kTile, n - t);
    for (size_t k = 0; k < K; ++k) {
      const int64_t src_size = srcs[k].dtype == kF32 ? 4 : 2;
      const AccumulateEntry a{acc, kCompensated ? comp : nullptr,
                              static_cast<const char*>(srcs[k].src) + (off + t) * src_size, m, srcs[k].dtype};
      accumulate_piece<kCompensated>(a, 0, m, weights[k], k == 0);
    }
    const CastEntry c{acc, kCompensated ? comp : nullptr, static_cast<char*>(e.dst) + (off + t) * dst_size, m,
                      e.dtype};
    cast_piece(c, 0, m, divisor);
  }
}

}  // namespace

void cpu_soup(const std::vector<SoupEntry>& entries, const std::vector<SoupSource>& srcs,
              const std::vector<float>& weights, float divisor, bool compensated, int num_threads) {
  if (weights.empty()) return;
  int64_t total = 0;
  const std::vector<int64_t> starts = prefix_starts(entries, &total);
  const SoupSource* base = srcs.data();
  const size_t K = weights.size();
  parallel_for(total, num_threads, [&](int64_t begin, int64_t end) {
    for_pieces(entries, starts, begin, end, [&](const SoupEntry& e, int64_t off, int64_t n) {
      const SoupSource* s = base + (&e - entries.data()) * K;
      if (compensated) {
        soup_piece<true>(e, s, weights, divisor, off, n);
      } else {
        soup_piece<false>(e, s, weights, divisor, off, n);
      }
    });
  });
}

void cpu_accumulate(const std::vector<AccumulateEntry>& entries, float weight, bool first, int num_threads) {
  int64_t total = 0;
  const std::vector<int64_t> starts = prefix_starts(entries, &total);
  parallel_for(total, num_threads, [&](int64_t begin, int64_t end) {
    for_pieces(entries, starts, begin, end, [&](const AccumulateEntry& e, int64_t off, int64_t n) {
      if (e.comp != nullptr) {
        accumulate_piece<true>(e, off, n, weight, first);
      } else {
        accumulate_piece<false>(e, off, n, weight, first);
      }
    });
  });
}

void cpu_cast(const std::vector<CastEntry>& entries, float divisor, int num_threads) {
  int64_t total = 0;
  const std::vector<int64_t> starts = prefix_starts(entries, &total);
  parallel_for(total, num_threads, [&](int64_t begin, int64_t end) {
    for_pieces(entries, starts, begin, end,
               [&](const CastEntry& e, int64_t off, int64_t n) { cast_piece(e, off, n, divisor); });
  });
}

}  // namespace kalm_fast
