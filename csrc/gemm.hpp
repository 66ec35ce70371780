// Small single-threaded SGEMM for the CPU engine.
//
//   C[i, j] (+)= sum_p A[i, p] * B[p, j]     0 <= i < m, 0 <= j < n, 0 <= p < k
//
// A is read through arbitrary strides (A[i, p] = A[i * rsa + p * csa]), so
// transposed operands need no copy: the micro-kernel only broadcasts single
// elements of A. B and C have unit column stride. The engine's matrices are at
// most a few hundred KB, so there is no cache blocking beyond the micro-tile:
// a B strip of k x NR floats is reused from L1/L2 by every MR-row block.
// Threads run over models in the engine, never inside one GEMM.
#pragma once

#include <algorithm>
#include <vector>

#include "vec.hpp"

namespace fastgrok {

namespace detail {

// An MR_ x NR tile of C from a k-long panel of A (strided) and B (rows at ldb).
template <int MR_>
inline void micro_kernel(int k, const float* A, std::ptrdiff_t rsa, std::ptrdiff_t csa,
                         const float* B, std::ptrdiff_t ldb, float* C, std::ptrdiff_t ldc,
                         bool accumulate) {
    vreg c0[MR_], c1[MR_];
    for (int i = 0; i < MR_; ++i) c0[i] = c1[i] = vreg{};
    for (int p = 0; p < k; ++p) {
        const vreg b0 = load(B + p * ldb), b1 = load(B + p * ldb + VL);
        const float* a = A + p * csa;
        for (int i = 0; i < MR_; ++i) {
            const float ai = a[i * rsa];
            c0[i] += ai * b0;
            c1[i] += ai * b1;
        }
    }
    for (int i = 0; i < MR_; ++i) {
        float* c = C + i * ldc;
        if (accumulate) {
            c0[i] += load(c);
            c1[i] += load(c + VL);
        }
        store(c, c0[i]);
        store(c + VL, c1[i]);
    }
}

template <int... Rows>
struct KernelTable {
    using Fn = void (*)(int, const float*, std::ptrdiff_t, std::ptrdiff_t, const float*,
                        std::ptrdiff_t, float*, std::ptrdiff_t, bool);
    static constexpr Fn fns[sizeof...(Rows)] = {&micro_kernel<Rows>...};
};

inline void micro_kernel_rows(int rows, int k, const float* A, std::ptrdiff_t rsa,
                              std::ptrdiff_t csa, const float* B, std::ptrdiff_t ldb, float* C,
                              std::ptrdiff_t ldc, bool accumulate) {
#if defined(__AVX512F__)
    using Table = KernelTable<1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12>;
#else
    using Table = KernelTable<1, 2, 3, 4, 5, 6>;
#endif
    static_assert(sizeof(Table::fns) / sizeof(Table::fns[0]) == MR, "one kernel per row count");
    Table::fns[rows - 1](k, A, rsa, csa, B, ldb, C, ldc, accumulate);
}

}  // namespace detail

inline void gemm(int m, int n, int k, const float* A, std::ptrdiff_t rsa, std::ptrdiff_t csa,
                 const float* B, std::ptrdiff_t ldb, float* C, std::ptrdiff_t ldc,
                 bool accumulate) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) {
        if (!accumulate)
            for (int i = 0; i < m; ++i) std::fill(C + i * ldc, C + i * ldc + n, 0.0f);
        return;
    }
    // The last, partial strip of B is copied zero-padded to NR columns, so the
    // kernel never reads past B's rows; its C tile goes through a buffer.
    thread_local std::vector<float> edge_b;
    float edge_c[MR * NR];
    for (int j = 0; j < n; j += NR) {
        const int cols = std::min(NR, n - j);
        const float* Bj = B + j;
        std::ptrdiff_t ldbj = ldb;
        if (cols < NR) {
            edge_b.assign(static_cast<std::size_t>(k) * NR, 0.0f);
            for (int p = 0; p < k; ++p)
                std::copy(B + p * ldb + j, B + p * ldb + j + cols, edge_b.data() + p * NR);
            Bj = edge_b.data();
            ldbj = NR;
        }
        for (int i = 0; i < m; i += MR) {
            const int rows = std::min(MR, m - i);
            const float* Ai = A + i * rsa;
            float* Cij = C + i * ldc + j;
            if (cols == NR) {
                detail::micro_kernel_rows(rows, k, Ai, rsa, csa, Bj, ldbj, Cij, ldc, accumulate);
            } else {
                detail::micro_kernel_rows(rows, k, Ai, rsa, csa, Bj, ldbj, edge_c, NR, false);
                for (int r = 0; r < rows; ++r)
                    for (int c = 0; c < cols; ++c)
                        Cij[r * ldc + c] = (accumulate ? Cij[r * ldc + c] : 0.0f) + edge_c[r * NR + c];
            }
        }
    }
}

}  // namespace fastgrok
