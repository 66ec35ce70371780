// Matmul operand precision for the CPU engine: fastgrok/precision.py in C++.
//
// A mode says how the operands of the per-example products with W_O, W_in,
// W_out and W_U are taken (fastgrok/precision.py's docstring is the
// definition): fp32 as they are; tf32 and bf16 rounded to 10 and 7 explicit
// mantissa bits, to nearest, ties to even; bf16x3 split a = hi + lo with
// hi = bf16(a), lo = bf16(a - hi), a @ b = hi_a @ hi_b + hi_a @ lo_b +
// lo_a @ hi_b. The rounding is integer arithmetic on the bit pattern, the
// same operations as fastgrok.precision.round_mantissa, so the two agree bit
// for bit (tests/test_cpu_precision.py), in float32 and in float64 (whose
// exponent range is then kept: the float64 engine checks the algorithm).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "vec.hpp"

namespace fastgrok {

enum class Precision : int { fp32 = 0, tf32 = 1, bf16 = 2, bf16x3 = 3 };

// Explicit mantissa bits each mode rounds an operand to (fp32: none dropped).
inline int mantissa_bits(Precision p) { return p == Precision::tf32 ? 10 : 7; }

template <typename Real>
struct FloatBits;
template <>
struct FloatBits<float> {
    using uint = uint32_t;
    static constexpr int mantissa = 23;
};
template <>
struct FloatBits<double> {
    using uint = uint64_t;
    static constexpr int mantissa = 52;
};

// Round to nearest even on the magnitude: add half a unit of the kept last
// place, minus one unless that place is odd, then clear the dropped bits.
// The carry runs into the exponent (the largest magnitudes become infinity,
// subnormals round on the subnormal grid) and never reaches the sign below
// NaN's patterns; NaN is kept as it is, since its payload may lie only in
// the dropped bits. Unsigned lanes: the wrap-around of a negative NaN's
// pattern is defined, and discarded.
template <typename Real>
struct Rounder {
    using S = Simd<Real>;
    using U = typename FloatBits<Real>::uint;
    typedef U ureg __attribute__((vector_size(VECTOR_BYTES)));

    int drop;
    U half_minus_one, keep;

    explicit Rounder(int bits)
        : drop(FloatBits<Real>::mantissa - bits),
          half_minus_one(drop > 0 ? (U(1) << (drop - 1)) - 1 : 0),
          keep(drop > 0 ? ~((U(1) << drop) - 1) : ~U(0)) {}

    typename S::reg operator()(typename S::reg x) const {
        ureg u;
        std::memcpy(&u, &x, sizeof u);
        u = (u + half_minus_one + ((u >> drop) & 1)) & keep;
        typename S::reg r;
        std::memcpy(&r, &u, sizeof r);
        return x != x ? x : r;
    }

    Real operator()(Real x) const {
        U u;
        std::memcpy(&u, &x, sizeof u);
        u = (u + half_minus_one + ((u >> drop) & 1)) & keep;
        Real r;
        std::memcpy(&r, &u, sizeof r);
        return x != x ? x : r;
    }
};

// out[0:n] = x[0:n] rounded to `bits` explicit mantissa bits (out may be x).
// bits >= the storage's mantissa bits copies.
template <typename Real>
void round_mantissa(const Real* x, Real* out, std::size_t n, int bits) {
    using S = Simd<Real>;
    if (bits >= FloatBits<Real>::mantissa) {
        if (out != x) std::copy(x, x + n, out);
        return;
    }
    const Rounder<Real> round(bits);
    std::size_t i = 0;
    for (; i + S::L <= n; i += S::L) S::store(out + i, round(S::load(x + i)));
    for (; i < n; ++i) out[i] = round(x[i]);
}

// The operand x[0:n] as precision p takes it: hi = x rounded (tf32, bf16),
// or split into hi = bf16(x) and lo = bf16(x - hi) (bf16x3); fp32 copies it
// to hi. hi may be x.
template <typename Real>
void round_operand(Precision p, const Real* x, Real* hi, Real* lo, std::size_t n) {
    using S = Simd<Real>;
    if (p == Precision::fp32) {
        if (hi != x) std::copy(x, x + n, hi);
        return;
    }
    if (p != Precision::bf16x3) return round_mantissa(x, hi, n, mantissa_bits(p));
    const Rounder<Real> round(7);
    std::size_t i = 0;
    for (; i + S::L <= n; i += S::L) {
        const auto v = S::load(x + i), h = round(v), l = round(v - h);
        S::store(hi + i, h);
        S::store(lo + i, l);
    }
    for (; i < n; ++i) {
        const Real v = x[i], h = round(v), l = round(v - h);
        hi[i] = h;
        lo[i] = l;
    }
}

}  // namespace fastgrok
