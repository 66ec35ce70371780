// Portable SIMD vectors for the CPU engine: GCC/Clang vector extensions.
//
// One source serves every target: with -march=native on an AVX-512 machine a
// `vreg` is one zmm register, on AVX2 one ymm, elsewhere 128-bit SSE/NEON.
// Hand-written intrinsics would tie the engine to one ISA; the vector
// extensions compile to the same instructions for these simple patterns
// (loads, broadcast FMAs, stores).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace fastgrok {

#if defined(__AVX512F__)
constexpr int VL = 16;          // floats per vector register
constexpr int MR = 12;          // GEMM micro-tile rows: 12 x 2 accumulators of the 32 zmm registers
#elif defined(__AVX__)
constexpr int VL = 8;
constexpr int MR = 6;           // 6 x 2 accumulators of the 16 ymm registers
#else
constexpr int VL = 4;
constexpr int MR = 6;
#endif
constexpr int NR = 2 * VL;      // GEMM micro-tile columns

typedef float vreg __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(VL * sizeof(float))));
// Unaligned, aliasing-safe views for loads and stores (as immintrin's __m512_u).
typedef float vreg_u __attribute__((vector_size(VL * sizeof(float)), aligned(1), may_alias));

inline vreg load(const float* p) { return *reinterpret_cast<const vreg_u*>(p); }
inline void store(float* p, vreg v) { *reinterpret_cast<vreg_u*>(p) = v; }
inline vreg splat(float x) { return vreg{} + x; }

inline float hsum(vreg v) {
    float s = 0.0f;
    for (int i = 0; i < VL; ++i) s += v[i];
    return s;
}

inline vreg relu(vreg x) { return x > 0.0f ? x : vreg{}; }

inline std::size_t round_up(std::size_t x, std::size_t multiple) {
    return (x + multiple - 1) / multiple * multiple;
}

// exp(x) element-wise to ~1 ulp (the Cephes expf polynomial).
// glibc vectorises expf only under -ffast-math, which would also license the
// compiler to drop the NaN/inf checks that flag a diverged model; this
// version keeps IEEE semantics: NaN propagates, -inf and x < -104 give 0
// (through the subnormal range), +inf and x > 88.7 give +inf.
inline vreg vexp(vreg x) {
    const vreg hi = splat(88.72283935546875f), lo = splat(-103.972084045410f);
    const vreg overflow = x > hi ? splat(__builtin_inff()) : vreg{};
    vreg xc = x > hi ? hi : x;
    xc = xc < lo ? lo : xc;
    // Round-to-nearest of x / ln 2 by the 1.5 * 2^23 shifter: exact for |k| < 2^22.
    const vreg shifter = splat(12582912.0f);
    vreg t = xc * 1.44269504088896341f + shifter;
    vint k = reinterpret_cast<vint>(t) - reinterpret_cast<vint>(shifter);
    vreg kf = t - shifter;
    vreg r = xc - kf * 0.693359375f;
    r = r - kf * -2.12194440e-4f;
    vreg p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    // 2^k as two factors so that k down to -150 stays within normal exponents.
    vint k1 = k >> 1, k2 = k - k1;
    vreg s1 = reinterpret_cast<vreg>((k1 + 127) << 23);
    vreg s2 = reinterpret_cast<vreg>((k2 + 127) << 23);
    vreg result = p * s1 * s2;
    result = x > hi ? overflow : result;
    return x != x ? x : result;   // NaN in, NaN out
}

// exp over an array of any length, in place.
inline void exp_inplace(float* x, int len) {
    int i = 0;
    for (; i + VL <= len; i += VL) store(x + i, vexp(load(x + i)));
    if (i < len) {
        float tail[VL] = {};
        std::memcpy(tail, x + i, sizeof(float) * (len - i));
        store(tail, vexp(load(tail)));
        std::memcpy(x + i, tail, sizeof(float) * (len - i));
    }
}

}  // namespace fastgrok
