// Small single-threaded matrix products for the CPU engine.
//
// gemm:     C[i, j] (+)= sum_p A[i, p] * B[p, j]
//   A is read through arbitrary strides (A[i, p] = A[i * rsa + p * csa]), so a
//   transposed A needs no copy: the micro-kernel only broadcasts single
//   elements of A. B and C have unit column stride. The engine's matrices are
//   at most a few hundred KB, so there is no cache blocking beyond the
//   micro-tile: a B strip of k x NR values is reused from L1/L2 by every
//   MR-row block.
// gemm_nt:  C[i, j] (+)= sum_p A[i, p] * B[j, p]
//   rows of A against rows of B, both contiguous: for a long k (F, V) this
//   avoids transposing B, at the cost of one horizontal sum per output.
// Threads run over models in the engine, never inside one product.
#pragma once

#include <algorithm>
#include <vector>

#include "vec.hpp"

namespace fastgrok {

namespace detail {

// An MR_ x (NV vectors) tile of C from a k-long panel of A (strided) and B
// (rows at ldb). NV = 2 is the main kernel; NV = 1 serves a last strip of
// exactly one vector, so operands padded to the vector width need no copy.
template <typename Real, int MR_, int NV>
void micro_kernel(int k, const Real* A, std::ptrdiff_t rsa, std::ptrdiff_t csa, const Real* B,
                  std::ptrdiff_t ldb, Real* C, std::ptrdiff_t ldc, bool accumulate) {
    using S = Simd<Real>;
    typename S::reg c[MR_][NV];
    for (int i = 0; i < MR_; ++i)
        for (int v = 0; v < NV; ++v) c[i][v] = S::zero();
    for (int p = 0; p < k; ++p) {
        typename S::reg b[NV];
        for (int v = 0; v < NV; ++v) b[v] = S::load(B + p * ldb + v * S::L);
        const Real* a = A + p * csa;
        for (int i = 0; i < MR_; ++i) {
            const typename S::reg ai = S::broadcast(a[i * rsa]);
            for (int v = 0; v < NV; ++v) c[i][v] = S::fma(ai, b[v], c[i][v]);
        }
    }
    for (int i = 0; i < MR_; ++i)
        for (int v = 0; v < NV; ++v) {
            Real* out = C + i * ldc + v * S::L;
            S::store(out, accumulate ? c[i][v] + S::load(out) : c[i][v]);
        }
}

template <typename Real, int NV, int... Rows>
struct KernelTable {
    using Fn = void (*)(int, const Real*, std::ptrdiff_t, std::ptrdiff_t, const Real*,
                        std::ptrdiff_t, Real*, std::ptrdiff_t, bool);
    static constexpr Fn fns[sizeof...(Rows)] = {&micro_kernel<Real, Rows, NV>...};
};

template <typename Real, int NV>
void micro_kernel_rows(int rows, int k, const Real* A, std::ptrdiff_t rsa, std::ptrdiff_t csa,
                       const Real* B, std::ptrdiff_t ldb, Real* C, std::ptrdiff_t ldc,
                       bool accumulate) {
#if defined(__AVX512F__)
    using Table = KernelTable<Real, NV, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12>;
#else
    using Table = KernelTable<Real, NV, 1, 2, 3, 4, 5, 6>;
#endif
    static_assert(sizeof(Table::fns) / sizeof(Table::fns[0]) == MR, "one kernel per row count");
    Table::fns[rows - 1](k, A, rsa, csa, B, ldb, C, ldc, accumulate);
}

}  // namespace detail

template <typename Real>
void gemm(int m, int n, int k, const Real* A, std::ptrdiff_t rsa, std::ptrdiff_t csa,
          const Real* B, std::ptrdiff_t ldb, Real* C, std::ptrdiff_t ldc, bool accumulate) {
    constexpr int NR = Simd<Real>::NR;
    if (m <= 0 || n <= 0) return;
    if (k <= 0) {
        if (!accumulate)
            for (int i = 0; i < m; ++i) std::fill(C + i * ldc, C + i * ldc + n, Real(0));
        return;
    }
    // Strips of two vectors; a last strip of exactly one vector has its own
    // kernel; any other partial strip is copied zero-padded to NR columns, so
    // the kernel never reads past B's rows, and its C tile goes through a buffer.
    constexpr int L = Simd<Real>::L;
    thread_local std::vector<Real> edge_b;
    Real edge_c[MR * NR];
    for (int j = 0; j < n; j += NR) {
        const int cols = std::min(NR, n - j);
        const Real* Bj = B + j;
        std::ptrdiff_t ldbj = ldb;
        if (cols != NR && cols != L) {
            edge_b.assign(static_cast<std::size_t>(k) * NR, Real(0));
            for (int p = 0; p < k; ++p)
                std::copy(B + p * ldb + j, B + p * ldb + j + cols, edge_b.data() + p * NR);
            Bj = edge_b.data();
            ldbj = NR;
        }
        for (int i = 0; i < m; i += MR) {
            const int rows = std::min(MR, m - i);
            const Real* Ai = A + i * rsa;
            Real* Cij = C + i * ldc + j;
            if (cols == NR) {
                detail::micro_kernel_rows<Real, 2>(rows, k, Ai, rsa, csa, Bj, ldbj, Cij, ldc, accumulate);
            } else if (cols == L) {
                detail::micro_kernel_rows<Real, 1>(rows, k, Ai, rsa, csa, Bj, ldbj, Cij, ldc, accumulate);
            } else {
                detail::micro_kernel_rows<Real, 2>(rows, k, Ai, rsa, csa, Bj, ldbj, edge_c, NR, false);
                for (int r = 0; r < rows; ++r)
                    for (int c = 0; c < cols; ++c)
                        Cij[r * ldc + c] = (accumulate ? Cij[r * ldc + c] : Real(0)) + edge_c[r * NR + c];
            }
        }
    }
}

namespace detail {

// A RA x RB block of gemm_nt: RA rows of A against RB rows of B, RA * RB
// vector accumulators, one horizontal sum per output at the end.
template <typename Real, int RA, int RB>
void nt_block(int k, const Real* A, std::ptrdiff_t lda, const Real* B, std::ptrdiff_t ldb, Real* C,
              std::ptrdiff_t ldc, bool accumulate) {
    using S = Simd<Real>;
    const int kv = k / S::L * S::L;
    typename S::reg acc[RA][RB];
    for (int i = 0; i < RA; ++i)
        for (int j = 0; j < RB; ++j) acc[i][j] = S::zero();
    for (int p = 0; p < kv; p += S::L) {
        typename S::reg a[RA];
        for (int i = 0; i < RA; ++i) a[i] = S::load(A + i * lda + p);
        for (int j = 0; j < RB; ++j) {
            const auto b = S::load(B + j * ldb + p);
            for (int i = 0; i < RA; ++i) acc[i][j] = S::fma(a[i], b, acc[i][j]);
        }
    }
    for (int i = 0; i < RA; ++i)
        for (int j = 0; j < RB; ++j) {
            Real dot = S::hsum(acc[i][j]);
            for (int p = kv; p < k; ++p) dot += A[i * lda + p] * B[j * ldb + p];
            Real& c = C[i * ldc + j];
            c = accumulate ? c + dot : dot;
        }
}

template <typename Real, int RA>
void nt_row_block(int n, int k, const Real* A, std::ptrdiff_t lda, const Real* B, std::ptrdiff_t ldb, Real* C,
                  std::ptrdiff_t ldc, bool accumulate) {
    int j = 0;
    for (; j + 4 <= n; j += 4) nt_block<Real, RA, 4>(k, A, lda, B + j * ldb, ldb, C + j, ldc, accumulate);
    for (; j < n; ++j) nt_block<Real, RA, 1>(k, A, lda, B + j * ldb, ldb, C + j, ldc, accumulate);
}

}  // namespace detail

template <typename Real>
void gemm_nt(int m, int n, int k, const Real* A, std::ptrdiff_t lda, const Real* B,
             std::ptrdiff_t ldb, Real* C, std::ptrdiff_t ldc, bool accumulate) {
    // 4 x 4 blocks: 8 loads feed 16 FMAs, so the loop is bound by FMAs, not loads.
    int i = 0;
    for (; i + 4 <= m; i += 4) detail::nt_row_block<Real, 4>(n, k, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
    for (; i < m; ++i) detail::nt_row_block<Real, 1>(n, k, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
}

}  // namespace fastgrok
