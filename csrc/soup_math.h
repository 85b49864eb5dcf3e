// Element-wise numerics of the soup kernels, shared by the C++ (CPU) and CUDA paths so both give the same bits.
//
// Every step is one IEEE-754 binary32 operation rounded to nearest even: the products and sums are never fused into
// an FMA (the CPU sources build with -ffp-contract=off; the device code uses the __f*_rn intrinsics, which nvcc never
// contracts), and denormals are kept. The torch fallback of kalm_fast/soup.py performs the same operations in the
// same order, so the three paths agree bit for bit.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define KF_HD __host__ __device__ __forceinline__
#else
#define KF_HD inline
#endif

namespace kalm_fast {

// dtype codes of the Python interface (kalm_fast._C.DTYPE_*)
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

KF_HD uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

KF_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

KF_HD float f32_add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

KF_HD float f32_sub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

KF_HD float f32_mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

KF_HD float f32_div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// ---- 16-bit -> fp32 (exact) ----------------------------------------------------------------------------------------

// bf16 is the top half of an fp32.
KF_HD float bf16_to_f32(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// IEEE half -> fp32 without branches (vectorizes): move exponent+mantissa to fp32 positions and rebias the exponent
// by 127 - 15 = 112; Inf/NaN (exponent 31) get the remaining 128 - 16 = 112 added so they reach exponent 255;
// zero/subnormals (exponent 0) are renormalized by one fp32 subtraction, which is exact:
// bits(em + (113 << 23)) = 2^-14 * (1 + m/1024) and subtracting 2^-14 = bits(113 << 23) leaves m * 2^-24.
KF_HD float f16_to_f32(uint16_t h) {
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;
  const uint32_t exp = em & 0x0f800000u;
  const uint32_t normal = em + (112u << 23) + (exp == 0x0f800000u ? (112u << 23) : 0u);
  const uint32_t subnormal = float_bits(f32_sub(bits_float(em + (113u << 23)), bits_float(113u << 23)));
  return bits_float((exp == 0 ? subnormal : normal) | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

// ---- fp32 -> 16-bit, round to nearest even -------------------------------------------------------------------------

// NaN leaves every output as the one positive quiet NaN of its dtype (fp32 0x7fc00000, bf16 0x7fc0, fp16 0x7e00),
// whatever its sign and payload: the NaN an operation makes differs by machine (x86 keeps the first NaN operand's
// payload, or makes the negative default NaN 0xffc00000 from Inf - Inf; CUDA always makes 0x7fffffff), and so do
// torch's own casts, so only a canonical NaN keeps the CPU, CUDA and torch paths bit-identical.
KF_HD bool is_nan(float f) { return (float_bits(f) & 0x7fffffffu) > 0x7f800000u; }

KF_HD float canonical_f32(float f) { return is_nan(f) ? bits_float(0x7fc00000u) : f; }

// Adding 0x7fff plus the lowest kept bit to the fp32 pattern carries into bit 16 exactly when the dropped half is
// above the halfway point, or at it with an odd kept bit; the carry propagates into the exponent, so values rounding
// past the largest finite bf16 become Inf. NaN becomes the canonical 0x7fc0 (the carry could turn it into Inf).
KF_HD uint16_t f32_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if (is_nan(f)) return 0x7fc0u;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// IEEE half, round to nearest even (the classic bit-level method):
//  |f| >= 65536 (or Inf/NaN): Inf, or the canonical NaN 0x7e00 (no sign);
//  |f| <  2^-14 (half subnormal range): adding 0.5f aligns the 10 kept mantissa bits at the bottom of the fp32
//       mantissa, and that fp32 addition itself rounds to nearest even;
//  otherwise: rebias the exponent by -112 and round the 13 dropped bits as for bf16; a carry out of the mantissa
//       bumps the exponent (65520 and above become Inf, as RNE requires).
KF_HD uint16_t f32_to_f16(float f) {
  uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  uint32_t h;
  if (u > 0x7f800000u) {
    return 0x7e00u;
  } else if (u >= (143u << 23)) {
    h = 0x7c00u;
  } else if (u < (113u << 23)) {
    h = float_bits(f32_add(bits_float(u), 0.5f)) - float_bits(0.5f);
  } else {
    h = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13;  // 0xc8000000 = (15 - 127) << 23 modulo 2^32
  }
  return static_cast<uint16_t>(h | sign);
}

// Element i of a flat tensor of the dtype code kDtype, read as / written from fp32 (the conversions above).
template <int kDtype>
KF_HD float load_elem(const void* __restrict src, int64_t i) {
  if constexpr (kDtype == kF32) {
    return static_cast<const float*>(src)[i];
  } else if constexpr (kDtype == kBF16) {
    return bf16_to_f32(static_cast<const uint16_t*>(src)[i]);
  } else {
    return f16_to_f32(static_cast<const uint16_t*>(src)[i]);
  }
}

template <int kDtype>
KF_HD void store_elem(void* __restrict dst, int64_t i, float v) {
  if constexpr (kDtype == kF32) {
    static_cast<float*>(dst)[i] = canonical_f32(v);
  } else if constexpr (kDtype == kBF16) {
    static_cast<uint16_t*>(dst)[i] = f32_to_bf16(v);
  } else {
    static_cast<uint16_t*>(dst)[i] = f32_to_f16(v);
  }
}

// ---- the accumulation steps ---------------------------------------------------------------------------------------

// acc += w * x, two roundings (product, then sum).
KF_HD float axpy(float acc, float w, float x) { return f32_add(acc, f32_mul(w, x)); }

// Compensated accumulation (Kahan-Babuska-Neumaier): s is the running sum, c the running compensation, the true sum
// is s + c. The rounding error of each s + y is recovered exactly (TwoSum, larger magnitude first) and added to c.
KF_HD void neumaier_add(float& s, float& c, float y) {
  const float t = f32_add(s, y);
  const float as = s < 0.0f ? -s : s;
  const float ay = y < 0.0f ? -y : y;
  const float e = as >= ay ? f32_add(f32_sub(s, t), y) : f32_add(f32_sub(y, t), s);
  c = f32_add(c, e);
  s = t;
}

// The weight split for exact products: w = hi + lo with hi = w's top 13 significant bits (the low 11 of its 23
// stored mantissa bits cleared) and lo = w - hi (exact, <= 11 bits). For x with <= 11 significant bits (bf16: 8,
// fp16: 11) hi * x (<= 24 bits) and lo * x (<= 22 bits) are exact in fp32, so the compensated sum sees the exact
// product; for fp32 inputs each part is rounded once.
KF_HD float weight_hi(float w) { return bits_float(float_bits(w) & 0xfffff800u); }

// One compensated step s + c += (hi + lo) * x; lo == 0 (e.g. w = 1) adds nothing (and no 0 * Inf = NaN).
KF_HD void neumaier(float& s, float& c, float hi, float lo, float x) {
  neumaier_add(s, c, f32_mul(hi, x));
  if (lo != 0.0f) neumaier_add(s, c, f32_mul(lo, x));
}

// The first compensated step: s + c = (hi + lo) * x.
KF_HD void neumaier_first(float& s, float& c, float hi, float lo, float x) {
  s = f32_mul(hi, x);
  c = 0.0f;
  if (lo != 0.0f) neumaier_add(s, c, f32_mul(lo, x));
}

// The compensated total s + c; where s is Inf or NaN the compensation is meaningless (Inf - Inf made it NaN) and s
// is the answer, as in the plain sum.
KF_HD float compensated_total(float s, float c) {
  const bool finite = (float_bits(s) & 0x7f800000u) != 0x7f800000u;
  return finite ? f32_add(s, c) : s;
}

}  // namespace kalm_fast
