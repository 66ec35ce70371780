// Portable SIMD vectors for the CPU engine: GCC/Clang vector extensions.
//
// One source serves every target: with -march=native on an AVX-512 machine a
// `Simd<float>::reg` is one zmm register, on AVX2 one ymm, elsewhere 128-bit
// SSE/NEON. Intrinsics would tie the engine to one ISA; the vector extensions
// compile to the same instructions for these patterns (loads, broadcast FMAs,
// stores). Real is float for training; double exists so the algorithm can be
// tested against the float64 oracle free of float32 rounding.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastgrok {

#if defined(__AVX512F__)
constexpr int VECTOR_BYTES = 64;
constexpr int MR = 12;  // GEMM micro-tile rows: 12 x 2 accumulators of the 32 zmm registers
#elif defined(__AVX__)
constexpr int VECTOR_BYTES = 32;
constexpr int MR = 6;   // 6 x 2 accumulators of the 16 ymm registers
#else
constexpr int VECTOR_BYTES = 16;
constexpr int MR = 6;
#endif

template <typename Real, int Bytes>
struct HalfSum {
    typedef Real vec __attribute__((vector_size(Bytes)));
    typedef Real half __attribute__((vector_size(Bytes / 2)));
    static Real sum(const vec& v) {
        half lo, hi;
        std::memcpy(&lo, &v, sizeof lo);
        std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
        const half s = lo + hi;
        if constexpr (Bytes / 2 == 2 * sizeof(Real)) return s[0] + s[1];
        else return HalfSum<Real, Bytes / 2>::sum(s);
    }
};

template <typename Real>
struct Simd {
    static_assert(std::is_same_v<Real, float> || std::is_same_v<Real, double>);
    static constexpr int L = VECTOR_BYTES / sizeof(Real);  // lanes
    static constexpr int NR = 2 * L;                       // GEMM micro-tile columns
    typedef Real reg __attribute__((vector_size(VECTOR_BYTES)));
    typedef std::conditional_t<std::is_same_v<Real, float>, int32_t, int64_t> lane_int;
    typedef lane_int ireg __attribute__((vector_size(VECTOR_BYTES)));

    // memcpy compiles to one unaligned vector load/store and is aliasing-safe.
    static reg load(const Real* p) { reg r; std::memcpy(&r, p, sizeof r); return r; }
    static void store(Real* p, reg v) { std::memcpy(p, &v, sizeof v); }
    static reg zero() { return reg{}; }
    // One vbroadcast: x - 0 is x for every x, so the subtraction folds away
    // (x + 0 is not: -0 + 0 = +0, and a lane loop compiles to inserts).
    static reg broadcast(Real x) { return x - reg{}; }
    // Pairwise: halves are added until one lane is left (log2(L) dependent
    // adds instead of L); memcpy of a half compiles to a register extract.
    static Real hsum(reg v) { return hsum_bytes<VECTOR_BYTES>(v); }
    // NaN passes through, as in torch.relu, so a diverged model reports a NaN loss.
    template <int Bytes>
    static Real hsum_bytes(const reg& v) { return HalfSum<Real, Bytes>::sum(v); }
    static reg relu(reg x) { return x < Real(0) ? reg{} : x; }
    // a * b + c. The compiler contracts `c += a * b` into an FMA in some
    // instantiations of a template and not in others (seen: the 1-row GEMM
    // kernel on AVX2), which would make a GEMM row's bits depend on how many
    // rows share its tile; the kernels say which one they mean.
    static reg fma(reg a, reg b, reg c) {
#if defined(__AVX512F__)
        if constexpr (VECTOR_BYTES == 64 && std::is_same_v<Real, float>) return reg(_mm512_fmadd_ps(a, b, c));
        if constexpr (VECTOR_BYTES == 64 && std::is_same_v<Real, double>) return reg(_mm512_fmadd_pd(a, b, c));
#endif
#if defined(__FMA__)
        if constexpr (VECTOR_BYTES == 32 && std::is_same_v<Real, float>) return reg(_mm256_fmadd_ps(a, b, c));
        if constexpr (VECTOR_BYTES == 32 && std::is_same_v<Real, double>) return reg(_mm256_fmadd_pd(a, b, c));
        if constexpr (VECTOR_BYTES == 16 && std::is_same_v<Real, float>) return reg(_mm_fmadd_ps(a, b, c));
        if constexpr (VECTOR_BYTES == 16 && std::is_same_v<Real, double>) return reg(_mm_fmadd_pd(a, b, c));
#endif
#if defined(__aarch64__)
        reg r;
        for (int i = 0; i < L; ++i) r[i] = std::fma(a[i], b[i], c[i]);  // one fmla per vector
        return r;
#else
        return a * b + c;  // no FMA instruction: nothing to contract either
#endif
    }
};

// The scalar a * b + c, fused where the target has an FMA instruction. For
// the same reason as Simd::fma: GCC keeps a loop-carried `s += a * b` of
// unknown trip count unfused (its FMA-chain tuning) and fuses the same chain
// once the loop is unrolled, so whether a bound is a constant would change
// the bits.
template <typename Real>
inline Real fma_scalar(Real a, Real b, Real c) {
#if defined(__FMA__) || defined(__aarch64__)
    return std::fma(a, b, c);
#else
    return a * b + c;
#endif
}

inline std::size_t round_up(std::size_t x, std::size_t multiple) {
    return (x + multiple - 1) / multiple * multiple;
}

// exp(x) element-wise to ~1 ulp (float: the Cephes expf polynomial).
// glibc vectorises expf only under -ffast-math, which would also license the
// compiler to drop the NaN/inf checks that flag a diverged model; this
// version keeps IEEE semantics: NaN propagates, -inf and x < -104 give 0
// (through the subnormal range), +inf and x > 88.7 give +inf.
inline Simd<float>::reg vexp(Simd<float>::reg x) {
    using S = Simd<float>;
    using reg = S::reg;
    using ireg = S::ireg;
    const reg hi = reg{} + 88.72283935546875f, lo = reg{} + -103.972084045410f;
    reg xc = x > hi ? hi : x;
    xc = xc < lo ? lo : xc;
    // Round-to-nearest of x / ln 2 by the 1.5 * 2^23 shifter: exact for |k| < 2^22.
    const reg shifter = reg{} + 12582912.0f;
    const reg t = xc * 1.44269504088896341f + shifter;
    const ireg k = reinterpret_cast<ireg>(t) - reinterpret_cast<ireg>(shifter);
    const reg kf = t - shifter;
    reg r = xc - kf * 0.693359375f;
    r = r - kf * -2.12194440e-4f;
    reg p = reg{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    // 2^k as two factors so that k down to -150 stays within normal exponents.
    const ireg k1 = k >> 1, k2 = k - k1;
    const reg s1 = reinterpret_cast<reg>((k1 + 127) << 23);
    const reg s2 = reinterpret_cast<reg>((k2 + 127) << 23);
    reg result = p * s1 * s2;
    result = x > hi ? reg{} + __builtin_inff() : result;
    return x != x ? x : result;  // NaN in, NaN out
}

// The float64 path only checks the algorithm; libm's exp is accurate and fast enough.
inline Simd<double>::reg vexp(Simd<double>::reg x) {
    for (int i = 0; i < Simd<double>::L; ++i) x[i] = std::exp(x[i]);
    return x;
}

// exp over an array of any length, in place.
template <typename Real>
inline void exp_inplace(Real* x, int len) {
    using S = Simd<Real>;
    int i = 0;
    for (; i + S::L <= len; i += S::L) S::store(x + i, vexp(S::load(x + i)));
    if (i < len) {
        Real tail[S::L] = {};
        std::memcpy(tail, x + i, sizeof(Real) * (len - i));
        S::store(tail, vexp(S::load(tail)));
        std::memcpy(x + i, tail, sizeof(Real) * (len - i));
    }
}

}  // namespace fastgrok
