// The fused CPU engine: one training step of a population, model by model.
//
// Algorithm (notation of fastgrok/engine.py; t indexes the 4 positions, r_t
// the token row an example reads there, a[t, h] its attention weights at the
// last position, c = W_E[=] + W_pos[3]).
//
// The MLP input and the logits are linear in the attention weights:
//   pre    = c @ W_in + b_in    + sum_{t,h} a[t,h] U[r_t, h]
//   logits = (c + b_out) @ W_U  + sum_{t,h} a[t,h] UU[r_t, h] + relu(pre) @ W_OU
// with per-step tables U[r, h] = V_tab[r, h] @ W_OI[h] (R x H x F),
// UU[r, h] = V_tab[r, h] @ W_OUh[h] (R x H x V), where W_OI[h] = W_O[h] @ W_in,
// W_OUh[h] = W_O[h] @ W_U and W_OU = W_out @ W_U (F x V). So an example costs
// 4H gathered rows of U and UU and one F x V product forward, instead of the
// H*Dh*D + 2*D*F + D*V multiply-adds of z @ W_O, the two MLP layers and the
// unembedding.
//
// Backward per example, with dlogits from the loss:
//   dW_OU += relu(pre)^T dlogits;  dpre = (dlogits @ W_OU^T) * [pre > 0]
//   da[t,h] = dpre . U[r_t,h] + dlogits . UU[r_t,h]
//   dU[r_t,h] += a[t,h] dpre;  dUU[r_t,h] += a[t,h] dlogits
//   dS[r_t,h] += softmax backward of da
// and per step the chain rule back through the table products to W_O, W_in,
// W_out, W_U, V_tab, then the key/value/query tables as in the batched engine.
//
// The rows of positions 1 and 3 (operator, =) are the same for every example,
// so their share of the sums above is a GEMM per tile of examples; only the
// x and y rows (2H per example) are gathered, dotted and scattered one by one.
//
// Multiply-adds at the paper config (p = 113, D = 128, H = 4, Dh = 32,
// F = 512, V = 115): per example 3*F*V + 12*H*(F + V) = 0.21 M (the batched
// engine: 3*(H*Dh*D + 2*D*F + D*V) = 0.49 M); per model and step 0.13 G for
// the tables (R*H*Dh*(F + V) products three times, H*Dh*D*(F + V) three
// times, F*D*V three times, the key/value tables), counted exactly by
// fastgrok.cpu_engine.flops_per_model_step. At D = 2000 a model-step is
// 1.09 GFLOP against the batched engine's 1.99.
//
// Memory and locality. Examples are sorted by (x, y) and walked in blocks of
// X_BLOCK x values. The x rows of U, UU (and their gradients) exist only for
// the current block, in L1/L2-sized buffers: they are built from V_tab when the
// block starts and turned into gradients of V_tab and W_OI/W_OUh when it ends.
// The other rows (operator, y, =) are whole tables. Within a block, tiles of
// TILE examples keep hidden, dhidden and logits (216 KB at the paper config)
// in L2 next to W_OU. The tables only needed by the examples share memory with
// the intermediate gradients of the per-step backward. At the paper config a
// thread's workspace is ~4.6 MB, so with M = 8 models on 2 threads the
// scratch adds ~1.2 MB per model to the 3.6 MB of parameters, gradients and
// moments.
//
// Threads and reproducibility: a model's x blocks are cut into MODEL_SHARDS
// shards at fixed boundaries; each shard's example sums start from zero and
// the shards are added in order. With M >= threads every thread steps whole
// models, one at a time, with its own workspace, so a model's tables stay in
// that core's caches from the forward to AdamW; with fewer models than threads
// the shards of all models are shared out. Either way the same sums are formed
// in the same order, so a model's result depends neither on the thread count
// nor on its batch-mates (the cost: one extra accumulator pass per shard,
// ~2% of a paper-config step).
#include "engine.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <new>
#include <numeric>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "gemm.hpp"
#include "vec.hpp"

namespace fastgrok {

namespace {

constexpr int X_BLOCK = TrainingSet::X_BLOCK;
// Examples per tile: a multiple of MR so the logits GEMM has no ragged rows.
constexpr int TILE = 4 * MR;

int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

template <typename Real>
void transpose(int rows, int cols, const Real* src, std::ptrdiff_t lds, Real* dst, std::ptrdiff_t ldd) {
    for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j) dst[j * ldd + i] = src[i * lds + j];
}

// A 64-byte aligned array, zero-initialised.
template <typename Real>
class Buffer {
  public:
    explicit Buffer(std::size_t count) : size_(count) {
        const std::size_t bytes = round_up(std::max<std::size_t>(count, 1) * sizeof(Real), 64);
        void* p = std::aligned_alloc(64, bytes);
        if (p == nullptr) throw std::bad_alloc();
        data_.reset(static_cast<Real*>(p));
        zero();
    }
    Real* data() { return data_.get(); }
    const Real* data() const { return data_.get(); }
    std::size_t size() const { return size_; }
    void zero() { std::fill(data_.get(), data_.get() + size_, Real(0)); }

  private:
    struct Free {
        void operator()(Real* p) const { std::free(p); }
    };
    std::unique_ptr<Real[], Free> data_;
    std::size_t size_;
};

// Consecutive 64-byte aligned pieces of one buffer, laid out by size.
class Carver {
  public:
    template <typename Real>
    std::size_t take(std::size_t count) {
        const std::size_t start = used_;
        used_ += round_up(count, 64 / sizeof(Real));
        return start;
    }
    std::size_t used() const { return used_; }

  private:
    std::size_t used_ = 0;
};

template <typename Real>
struct ParamPtrs {
    Real *W_E, *W_pos, *W_Q, *W_K, *W_V, *W_O, *W_in, *b_in, *W_out, *b_out, *W_U;
    ParamPtrs(Real* base, const ParamLayout& L)
        : W_E(base + L.W_E), W_pos(base + L.W_pos), W_Q(base + L.W_Q), W_K(base + L.W_K),
          W_V(base + L.W_V), W_O(base + L.W_O), W_in(base + L.W_in), b_in(base + L.b_in),
          W_out(base + L.W_out), b_out(base + L.b_out), W_U(base + L.W_U) {}
};

// Row r of the token table: element r at position 0 (r < n), the operator at
// position 1 (r = n), element r - n - 1 at position 2, = at position 3.
inline int row_token(int r, int n) { return r < n ? r : (r == n ? n : (r <= 2 * n ? r - n - 1 : n + 1)); }
inline int row_pos(int r, int n) { return r < n ? 0 : (r == n ? 1 : (r <= 2 * n ? 2 : 3)); }

template <typename Real>
struct Padded {
    int Fp, Vp;
    explicit Padded(const ModelShape& s)
        : Fp(int(round_up(s.F, Simd<Real>::L))), Vp(int(round_up(s.V, Simd<Real>::L))) {}
};

}  // namespace

ParamLayout::ParamLayout(const ModelShape& s) {
    const std::size_t V = s.V, D = s.D, H = s.H, Dh = s.Dh, F = s.F, T = 4;
    std::size_t at = 0;
    auto take = [&at](std::size_t count) { std::size_t start = at; at += count; return start; };
    W_E = take(V * D);
    W_pos = take(T * D);
    W_Q = take(H * D * Dh);
    W_K = take(H * D * Dh);
    W_V = take(H * D * Dh);
    W_O = take(H * Dh * D);
    W_in = take(D * F);
    b_in = take(F);
    W_out = take(F * D);
    b_out = take(D);
    W_U = take(D * V);
    P = at;
}

TrainingSet::TrainingSet(const ModelShape& shape, int M_, int N, const int64_t* xs, const int64_t* ys,
                         const int64_t* ls, const int64_t* train_size)
    : M(M_), x(M_), y(M_), labels(M_), block_start(M_) {
    const int n = shape.n;
    const int blocks = (n + X_BLOCK - 1) / X_BLOCK;
    for (int m = 0; m < M; ++m) {
        const int64_t D = train_size[m];
        if (D < 1 || D > N)
            throw std::invalid_argument("train_size[" + std::to_string(m) + "]=" + std::to_string(D) +
                                        ": must be in 1.." + std::to_string(N));
        const int64_t* xm = xs + std::size_t(m) * N;
        const int64_t* ym = ys + std::size_t(m) * N;
        const int64_t* lm = ls + std::size_t(m) * N;
        for (int64_t i = 0; i < D; ++i)
            if (xm[i] < 0 || xm[i] >= n || ym[i] < 0 || ym[i] >= n || lm[i] < 0 || lm[i] >= shape.V)
                throw std::invalid_argument(
                    "model " + std::to_string(m) + " example " + std::to_string(i) + ": (x, y, label) = (" +
                    std::to_string(xm[i]) + ", " + std::to_string(ym[i]) + ", " + std::to_string(lm[i]) +
                    "); valid: x, y in 0.." + std::to_string(n - 1) + ", label in 0.." +
                    std::to_string(shape.V - 1));
        std::vector<int64_t> order(D);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) {
            return xm[i] != xm[j] ? xm[i] < xm[j] : ym[i] < ym[j];
        });
        for (int64_t i : order) {
            x[m].push_back(int32_t(xm[i]));
            y[m].push_back(int32_t(ym[i]));
            labels[m].push_back(int32_t(lm[i]));
        }
        block_start[m].assign(blocks + 1, int(D));
        for (int b = 0, i = 0; b < blocks; ++b) {
            while (i < D && x[m][i] < b * X_BLOCK) ++i;
            block_start[m][b] = i;
        }
    }
}

// Per-step quantities of one model derived from its parameters.
template <typename Real>
struct Workspace {
    // Live through the whole step.
    Buffer<Real> R_tab;   // (R, D) residual stream of every (token, position) row
    Buffer<Real> K, Vt;   // (R, H*Dh) keys and values
    Buffer<Real> q;       // (H*Dh) query of the last position
    Buffer<Real> S;       // (R, H) scaled scores of the last position
    Buffer<Real> W_OI;    // (H, Dh, Fp) W_O[h] @ W_in
    Buffer<Real> W_OUh;   // (H, Dh, Vp) W_O[h] @ W_U
    Buffer<Real> c_bout;  // (D) c + b_out
    // Only the examples read these; the backward then reuses their memory.
    Buffer<Real> arena;
    Real *W_OU;        // (Fp, Vp) W_out @ W_U
    Real *W_OU_T;      // (Vp, Fp)
    Real *U_rest;      // (n + 2, H, Fp) rows of U other than x: operator, y, =
    Real *UU_rest;     // (n + 2, H, Vp)
    Real *base_pre;    // (Fp) c @ W_in + b_in
    Real *base_logit;  // (Vp) (c + b_out) @ W_U
    Real *dK;          // (R, H*Dh)   backward only
    Real *dR;          // (R, D)      backward only
    Real *dq, *dc;     // (H*Dh), (D) backward only
    Real *small_T;     // (max(D, V) * max(D, Dh)) transposed copies, backward only

    explicit Workspace(const ModelShape& s)
        : R_tab(std::size_t(s.R()) * s.D), K(std::size_t(s.R()) * s.HDh()), Vt(std::size_t(s.R()) * s.HDh()),
          q(s.HDh()), S(std::size_t(s.R()) * s.H), W_OI(std::size_t(s.HDh()) * Padded<Real>(s).Fp),
          W_OUh(std::size_t(s.HDh()) * Padded<Real>(s).Vp), c_bout(s.D), arena(arena_size(s)) {
        const Padded<Real> pd(s);
        const std::size_t R = s.R(), H = s.H, Fp = pd.Fp, Vp = pd.Vp, D = s.D, HDh = s.HDh();
        Carver ex, bw;
        const std::size_t o_W_OU = ex.take<Real>(Fp * Vp), o_W_OU_T = ex.take<Real>(Fp * Vp),
                          o_U = ex.take<Real>((s.n + 2) * H * Fp), o_UU = ex.take<Real>((s.n + 2) * H * Vp),
                          o_bp = ex.take<Real>(Fp), o_bl = ex.take<Real>(Vp);
        const std::size_t o_dK = bw.take<Real>(R * HDh), o_dR = bw.take<Real>(R * D),
                          o_dq = bw.take<Real>(HDh), o_dc = bw.take<Real>(D),
                          o_T = bw.take<Real>(small_T_size(s));
        Real* base = arena.data();
        W_OU = base + o_W_OU, W_OU_T = base + o_W_OU_T, U_rest = base + o_U, UU_rest = base + o_UU;
        base_pre = base + o_bp, base_logit = base + o_bl;
        dK = base + o_dK, dR = base + o_dR, dq = base + o_dq, dc = base + o_dc, small_T = base + o_T;
    }

    static std::size_t small_T_size(const ModelShape& s) {
        return std::size_t(std::max(s.D, s.V)) * std::max(s.D, s.Dh);
    }

    static std::size_t arena_size(const ModelShape& s) {
        const Padded<Real> pd(s);
        const std::size_t R = s.R(), H = s.H, Fp = pd.Fp, Vp = pd.Vp, D = s.D, HDh = s.HDh();
        Carver ex, bw;
        ex.take<Real>(Fp * Vp), ex.take<Real>(Fp * Vp), ex.take<Real>((s.n + 2) * H * Fp);
        ex.take<Real>((s.n + 2) * H * Vp), ex.take<Real>(Fp), ex.take<Real>(Vp);
        bw.take<Real>(R * HDh), bw.take<Real>(R * D), bw.take<Real>(HDh), bw.take<Real>(D);
        bw.take<Real>(small_T_size(s));
        return std::max(ex.used(), bw.used());
    }

    std::size_t bytes() const {
        std::size_t count = 0;
        for (const Buffer<Real>* b : {&R_tab, &K, &Vt, &q, &S, &W_OI, &W_OUh, &c_bout, &arena}) count += b->size();
        return count * sizeof(Real);
    }
};

// Gradients w.r.t. the per-step tables, summed over a range of examples.
template <typename Real>
struct ExampleGrads {
    Buffer<Real> dU_rest;      // (n + 2, H, Fp)
    Buffer<Real> dUU_rest;     // (n + 2, H, Vp)
    Buffer<Real> dW_OU;        // (Fp, Vp)
    Buffer<Real> dW_OI;        // (H, Dh, Fp) from the x rows so far
    Buffer<Real> dW_OUh;       // (H, Dh, Vp) from the x rows so far
    Buffer<Real> dVt;          // (R, H*Dh) x rows so far
    Buffer<Real> dS;           // (R, H) w.r.t. the scaled scores
    Buffer<Real> dbase_pre;    // (Fp)
    Buffer<Real> dbase_logit;  // (Vp)
    double loss = 0.0;         // sum of weighted example losses

    explicit ExampleGrads(const ModelShape& s)
        : dU_rest(std::size_t(s.n + 2) * s.H * Padded<Real>(s).Fp),
          dUU_rest(std::size_t(s.n + 2) * s.H * Padded<Real>(s).Vp),
          dW_OU(std::size_t(Padded<Real>(s).Fp) * Padded<Real>(s).Vp),
          dW_OI(std::size_t(s.HDh()) * Padded<Real>(s).Fp), dW_OUh(std::size_t(s.HDh()) * Padded<Real>(s).Vp),
          dVt(std::size_t(s.R()) * s.HDh()), dS(std::size_t(s.R()) * s.H), dbase_pre(Padded<Real>(s).Fp),
          dbase_logit(Padded<Real>(s).Vp) {}

    std::vector<Buffer<Real>*> buffers() {
        return {&dU_rest, &dUU_rest, &dW_OU, &dW_OI, &dW_OUh, &dVt, &dS, &dbase_pre, &dbase_logit};
    }

    void zero() {
        for (Buffer<Real>* b : buffers()) b->zero();
        loss = 0.0;
    }

    void add(ExampleGrads& other) {
        auto mine = buffers(), theirs = other.buffers();
        for (std::size_t k = 0; k < mine.size(); ++k) {
            Real* d = mine[k]->data();
            const Real* s = theirs[k]->data();
            for (std::size_t i = 0; i < mine[k]->size(); ++i) d[i] += s[i];
        }
        loss += other.loss;
    }

    std::size_t bytes() {
        std::size_t count = 0;
        for (Buffer<Real>* b : buffers()) count += b->size();
        return count * sizeof(Real);
    }
};

// Activations of one tile of examples and the x rows of the current block.
template <typename Real>
struct TileScratch {
    Buffer<Real> a;        // (TILE, 4H) attention weights, index t * H + h
    Buffer<Real> hidden;   // (TILE, Fp) relu(pre); hidden > 0 is the relu mask
    Buffer<Real> logits;   // (TILE, Vp) logits, then dlogits in place
    Buffer<Real> dhidden;  // (TILE, Fp)
    Buffer<Real> da;       // (TILE, 4H) gradients w.r.t. a
    Buffer<Real> U_x, dU_x;    // (X_BLOCK, H, Fp)
    Buffer<Real> UU_x, dUU_x;  // (X_BLOCK, H, Vp)

    explicit TileScratch(const ModelShape& s)
        : a(TILE * s.J()), hidden(TILE * Padded<Real>(s).Fp), logits(TILE * Padded<Real>(s).Vp),
          dhidden(TILE * Padded<Real>(s).Fp), da(TILE * s.J()), U_x(X_BLOCK * s.H * Padded<Real>(s).Fp),
          dU_x(X_BLOCK * s.H * Padded<Real>(s).Fp), UU_x(X_BLOCK * s.H * Padded<Real>(s).Vp),
          dUU_x(X_BLOCK * s.H * Padded<Real>(s).Vp) {}

    std::size_t bytes() const {
        std::size_t count = 0;
        for (const Buffer<Real>* b : {&a, &hidden, &logits, &dhidden, &da, &U_x, &dU_x, &UU_x, &dUU_x}) count += b->size();
        return count * sizeof(Real);
    }
};

// U and UU of every x row of one model, for evaluation (training keeps one
// x block at a time in TileScratch).
template <typename Real>
struct XRowTables {
    Buffer<Real> U;   // (n, H, Fp)
    Buffer<Real> UU;  // (n, H, Vp)
    explicit XRowTables(const ModelShape& s)
        : U(std::size_t(s.n) * s.H * Padded<Real>(s).Fp), UU(std::size_t(s.n) * s.H * Padded<Real>(s).Vp) {}
    std::size_t bytes() const { return (U.size() + UU.size()) * sizeof(Real); }
};

namespace {

template <typename Real>
void tables_forward(const ModelShape& s, const ParamPtrs<Real>& p, Workspace<Real>& ws) {
    const int R = s.R(), D = s.D, H = s.H, Dh = s.Dh, HDh = s.HDh(), F = s.F, V = s.V, n = s.n;
    const Padded<Real> pd(s);
    const int Fp = pd.Fp, Vp = pd.Vp;
    for (int r = 0; r < R; ++r) {
        const Real* e = p.W_E + std::size_t(row_token(r, n)) * D;
        const Real* pos = p.W_pos + std::size_t(row_pos(r, n)) * D;
        Real* out = ws.R_tab.data() + std::size_t(r) * D;
        for (int d = 0; d < D; ++d) out[d] = e[d] + pos[d];
    }
    const Real* c = ws.R_tab.data() + std::size_t(R - 1) * D;
    for (int h = 0; h < H; ++h) {
        const std::size_t w = std::size_t(h) * D * Dh;
        gemm(R, Dh, D, ws.R_tab.data(), D, 1, p.W_K + w, Dh, ws.K.data() + h * Dh, HDh, false);
        gemm(R, Dh, D, ws.R_tab.data(), D, 1, p.W_V + w, Dh, ws.Vt.data() + h * Dh, HDh, false);
        gemm(1, Dh, D, c, D, 1, p.W_Q + w, Dh, ws.q.data() + h * Dh, HDh, false);
    }
    const Real scale = Real(1.0 / std::sqrt(double(Dh)));
    for (int r = 0; r < R; ++r)
        for (int h = 0; h < H; ++h) {
            const Real* k = ws.K.data() + std::size_t(r) * HDh + h * Dh;
            const Real* q = ws.q.data() + h * Dh;
            Real dot = 0;
            for (int e = 0; e < Dh; ++e) dot += k[e] * q[e];
            ws.S.data()[r * H + h] = dot * scale;
        }

    // The padding columns (F..Fp, V..Vp) of every table must be zero; the
    // GEMMs write only the first F or V columns, so clear them first.
    std::fill(ws.arena.data(), ws.arena.data() + ws.arena.size(), Real(0));
    for (int h = 0; h < H; ++h) {
        const Real* W_O = p.W_O + std::size_t(h) * Dh * D;
        gemm(Dh, F, D, W_O, D, 1, p.W_in, F, ws.W_OI.data() + std::size_t(h) * Dh * Fp, Fp, false);
        gemm(Dh, V, D, W_O, D, 1, p.W_U, V, ws.W_OUh.data() + std::size_t(h) * Dh * Vp, Vp, false);
    }
    // Rows n.. of V_tab (operator, y, =) into U_rest and UU_rest.
    for (int h = 0; h < H; ++h) {
        const Real* Vt = ws.Vt.data() + std::size_t(n) * HDh + h * Dh;
        gemm(n + 2, Fp, Dh, Vt, HDh, 1, ws.W_OI.data() + std::size_t(h) * Dh * Fp, Fp,
             ws.U_rest + std::size_t(h) * Fp, std::ptrdiff_t(H) * Fp, false);
        gemm(n + 2, Vp, Dh, Vt, HDh, 1, ws.W_OUh.data() + std::size_t(h) * Dh * Vp, Vp,
             ws.UU_rest + std::size_t(h) * Vp, std::ptrdiff_t(H) * Vp, false);
    }
    gemm(F, V, D, p.W_out, D, 1, p.W_U, V, ws.W_OU, Vp, false);
    transpose(Fp, Vp, ws.W_OU, Vp, ws.W_OU_T, Fp);

    gemm(1, F, D, c, D, 1, p.W_in, F, ws.base_pre, Fp, false);
    for (int f = 0; f < F; ++f) ws.base_pre[f] += p.b_in[f];
    for (int d = 0; d < D; ++d) ws.c_bout.data()[d] = c[d] + p.b_out[d];
    gemm(1, V, D, ws.c_bout.data(), D, 1, p.W_U, V, ws.base_logit, Vp, false);
}

// out += sum_h a0[h] * rows[h] + a2[h] * rows[H + h] (positions 0 and 2, per
// head), in place; relu applied if asked. len is a multiple of the lane count.
// Eight accumulators in flight hide the FMA latency of the 2H-long chains.
template <bool Relu, typename Real>
void combine_rows(const Real* a0, const Real* a2, int H, const Real* const* rows, Real* out, int len) {
    using S = Simd<Real>;
    constexpr int L = S::L;
    int f = 0;
    for (; f + 8 * L <= len; f += 8 * L) {
        typename S::reg acc[8];
        for (int u = 0; u < 8; ++u) acc[u] = S::load(out + f + u * L);
        for (int j = 0; j < 2 * H; ++j) {
            const Real* row = rows[j] + f;
            const Real aj = j < H ? a0[j] : a2[j - H];
            for (int u = 0; u < 8; ++u) acc[u] += aj * S::load(row + u * L);
        }
        for (int u = 0; u < 8; ++u) S::store(out + f + u * L, Relu ? S::relu(acc[u]) : acc[u]);
    }
    for (; f < len; f += L) {
        auto acc = S::load(out + f);
        for (int j = 0; j < 2 * H; ++j) acc += (j < H ? a0[j] : a2[j - H]) * S::load(rows[j] + f);
        S::store(out + f, Relu ? S::relu(acc) : acc);
    }
}

// For the 2H rows of positions 0 and 2: da0/da2[h] += g . rows[j] and
// drows[j] += a * g, in one pass over g.
template <typename Real>
void dot_and_scatter(const Real* a0, const Real* a2, int H, const Real* const* rows, Real* const* drows,
                     const Real* g, int len, Real* da0, Real* da2) {
    using S = Simd<Real>;
    constexpr int JMAX = 16;  // dot accumulators kept in registers
    typename S::reg dots[JMAX];
    const int J = 2 * H;
    for (int j0 = 0; j0 < J; j0 += JMAX) {
        const int jn = std::min(JMAX, J - j0);
        Real a[JMAX];
        for (int j = 0; j < jn; ++j) a[j] = j0 + j < H ? a0[j0 + j] : a2[j0 + j - H];
        for (int j = 0; j < jn; ++j) dots[j] = S::zero();
        for (int f = 0; f < len; f += S::L) {
            const auto gf = S::load(g + f);
            for (int j = 0; j < jn; ++j) {
                dots[j] += gf * S::load(rows[j0 + j] + f);
                Real* dr = drows[j0 + j] + f;
                S::store(dr, S::load(dr) + a[j] * gf);
            }
        }
        for (int j = 0; j < jn; ++j) {
            const int jj = j0 + j;
            (jj < H ? da0[jj] : da2[jj - H]) += S::hsum(dots[j]);
        }
    }
}

// sums[0:len] += sum over rows i < count of X[i, 0:len]; len a multiple of the
// lane count. Rows innermost: one store per vector of sums, not per row.
template <typename Real>
void add_column_sums(int count, const Real* X, int len, Real* sums) {
    using S = Simd<Real>;
    for (int f = 0; f < len; f += S::L) {
        auto acc = S::load(sums + f);
        for (int i = 0; i < count; ++i) acc += S::load(X + std::size_t(i) * len + f);
        S::store(sums + f, acc);
    }
}

// Per-example cross-entropy of logits[0:V] against label, in the stable form
// of fastgrok/model.py; writes weight * dloss/dlogits over logits[0:Vp]
// (zero on the padding) and returns the unweighted loss.
template <typename Real>
Real loss_and_dlogits(Real* z, int V, int Vp, int label, Real weight) {
    using S = Simd<Real>;
    constexpr int L = S::L;
    const int Vv = V / L * L;  // whole vectors; the rest is done lane by lane
    Real zmax = z[0];
    if (Vv > 0) {
        auto vmax = S::load(z);
        for (int v = L; v < Vv; v += L) {
            const auto zv = S::load(z + v);
            vmax = zv > vmax ? zv : vmax;
        }
        for (int i = 0; i < L; ++i) zmax = std::max(zmax, vmax[i]);
    }
    for (int v = Vv; v < V; ++v) zmax = std::max(zmax, z[v]);
    const Real zy = z[label] - zmax;
    for (int v = 0; v < V; ++v) z[v] -= zmax;
    exp_inplace(z, V);
    const Real ey = z[label];
    z[label] = 0;
    auto vsum = S::zero();
    for (int v = 0; v < Vv; v += L) vsum += S::load(z + v);
    Real other = S::hsum(vsum);
    for (int v = Vv; v < V; ++v) other += z[v];
    const Real total = other + ey;
    // Where y is the argmax the loss is log1p(other), exact for a tiny other.
    const Real loss = zy == Real(0) ? std::log1p(other) : std::log(total) - zy;
    for (int v = 0; v < V; ++v) z[v] = z[v] / total * weight;
    z[label] = -other / total * weight;  // -(sum of the others), never p_y - 1
    for (int v = V; v < Vp; ++v) z[v] = 0;
    return loss;
}

// Where the rows of U and UU for position 0 (the x rows) live: row x of the
// table is U_x + (x - x0) * H * Fp. Training keeps only the current x block
// there, evaluation the whole table (x0 = 0).
template <typename Real>
struct XRows {
    const Real* U_x;
    const Real* UU_x;
    int x0;
};

// The forward pass of `count` examples (xs, ys): their token rows (4 per
// example) into rows, attention weights a (count, 4H), hidden = relu(pre)
// (count, Fp) and logits (count, Vp). Each example's values depend only on
// the example and the tables, never on its place in the tile.
template <typename Real>
void tile_forward(const ModelShape& s, const Workspace<Real>& ws, const XRows<Real>& x_rows,
                  const int32_t* xs, const int32_t* ys, int count, int* rows, Real* a_tile, Real* hidden,
                  Real* logits) {
    const int n = s.n, H = s.H, J = s.J();
    const Padded<Real> pd(s);
    const int Fp = pd.Fp, Vp = pd.Vp;
    const std::size_t row_F = std::size_t(H) * Fp, row_V = std::size_t(H) * Vp;
    const Real* Sc = ws.S.data();
    for (int i = 0; i < count; ++i) {
        int* r = rows + 4 * i;
        r[0] = xs[i];
        r[1] = n;
        r[2] = n + 1 + ys[i];
        r[3] = 2 * n + 1;
        Real* a = a_tile + std::size_t(i) * J;
        for (int t = 0; t < 4; ++t)
            for (int h = 0; h < H; ++h) a[t * H + h] = Sc[r[t] * H + h];
        for (int h = 0; h < H; ++h) {
            Real smax = a[h];
            for (int t = 1; t < 4; ++t) smax = std::max(smax, a[t * H + h]);
            for (int t = 0; t < 4; ++t) a[t * H + h] -= smax;
        }
        exp_inplace(a, J);
        for (int h = 0; h < H; ++h) {
            const Real sum = a[h] + a[H + h] + a[2 * H + h] + a[3 * H + h];
            for (int t = 0; t < 4; ++t) a[t * H + h] /= sum;
        }
        std::copy(ws.base_pre, ws.base_pre + Fp, hidden + std::size_t(i) * Fp);
        std::copy(ws.base_logit, ws.base_logit + Vp, logits + std::size_t(i) * Vp);
    }
    // Positions 1 and 3 read the same rows in every example: one GEMM per
    // tile instead of 2H gathered rows per example.
    const Real* const_U[4] = {nullptr, ws.U_rest, nullptr, ws.U_rest + (n + 1) * row_F};
    const Real* const_UU[4] = {nullptr, ws.UU_rest, nullptr, ws.UU_rest + (n + 1) * row_V};
    for (int t : {1, 3}) {
        gemm(count, Fp, H, a_tile + t * H, J, 1, const_U[t], Fp, hidden, Fp, true);
        gemm(count, Vp, H, a_tile + t * H, J, 1, const_UU[t], Vp, logits, Vp, true);
    }
    std::vector<const Real*> u_rows(2 * H), uu_rows(2 * H);
    for (int i = 0; i < count; ++i) {
        const int* r = rows + 4 * i;
        const std::size_t ix = std::size_t(r[0] - x_rows.x0), iy = std::size_t(r[2] - n);
        for (int h = 0; h < H; ++h) {
            u_rows[h] = x_rows.U_x + ix * row_F + h * Fp;
            uu_rows[h] = x_rows.UU_x + ix * row_V + h * Vp;
            u_rows[H + h] = ws.U_rest + iy * row_F + h * Fp;
            uu_rows[H + h] = ws.UU_rest + iy * row_V + h * Vp;
        }
        const Real* a = a_tile + std::size_t(i) * J;
        combine_rows<true>(a, a + 2 * H, H, u_rows.data(), hidden + std::size_t(i) * Fp, Fp);
        combine_rows<false>(a, a + 2 * H, H, uu_rows.data(), logits + std::size_t(i) * Vp, Vp);
    }
    gemm(count, Vp, Fp, hidden, Fp, 1, ws.W_OU, Vp, logits, Vp, true);
}

// U and UU of every x row (position 0) of one model: (n, H, Fp) and (n, H, Vp).
template <typename Real>
void x_row_tables(const ModelShape& s, const Workspace<Real>& ws, Real* U_x, Real* UU_x) {
    const int H = s.H, Dh = s.Dh, HDh = s.HDh();
    const Padded<Real> pd(s);
    const int Fp = pd.Fp, Vp = pd.Vp;
    for (int h = 0; h < H; ++h) {
        gemm(s.n, Fp, Dh, ws.Vt.data() + h * Dh, HDh, 1, ws.W_OI.data() + std::size_t(h) * Dh * Fp, Fp,
             U_x + std::size_t(h) * Fp, std::ptrdiff_t(H) * Fp, false);
        gemm(s.n, Vp, Dh, ws.Vt.data() + h * Dh, HDh, 1, ws.W_OUh.data() + std::size_t(h) * Dh * Vp, Vp,
             UU_x + std::size_t(h) * Vp, std::ptrdiff_t(H) * Vp, false);
    }
}

}  // namespace

template <typename Real>
Engine<Real>::Engine(const ModelShape& shape, const TrainingSet& data)
    : shape_(shape), layout_(shape), data_(data) {}

template <typename Real>
Engine<Real>::~Engine() = default;

template <typename Real>
std::size_t Engine<Real>::scratch_bytes() const {
    std::size_t bytes = 0;
    for (auto& w : workspaces_) bytes += w->bytes();
    for (auto& g : accumulators_) bytes += g->bytes();
    for (auto& t : tiles_) bytes += t->bytes();
    for (auto& e : eval_x_rows_) bytes += e->bytes();
    return bytes;
}

template <typename Real>
void Engine<Real>::examples(int m, int block_begin, int block_end, const Workspace<Real>& ws,
                            ExampleGrads<Real>& acc, TileScratch<Real>& tile) const {
    using S = Simd<Real>;
    const ModelShape& s = shape_;
    const int n = s.n, H = s.H, Dh = s.Dh, HDh = s.HDh(), J = s.J(), V = s.V;
    const Padded<Real> pd(s);
    const int Fp = pd.Fp, Vp = pd.Vp;
    const Real weight = Real(1.0 / double(data_.x[m].size()));
    const int32_t* xs = data_.x[m].data();
    const int32_t* ys = data_.y[m].data();
    const int32_t* labels = data_.labels[m].data();
    Real* dS = acc.dS.data();
    std::vector<const Real*> u_rows(2 * H), uu_rows(2 * H);
    std::vector<Real*> du_rows(2 * H), duu_rows(2 * H);
    std::vector<int> rows(4 * TILE);
    const std::size_t row_F = std::size_t(H) * Fp, row_V = std::size_t(H) * Vp;
    // Rows of the operator (position 1) and = (position 3), per head, and their gradients.
    const Real* const_U[4] = {nullptr, ws.U_rest, nullptr, ws.U_rest + (n + 1) * row_F};
    const Real* const_UU[4] = {nullptr, ws.UU_rest, nullptr, ws.UU_rest + (n + 1) * row_V};
    Real* const_dU[4] = {nullptr, acc.dU_rest.data(), nullptr, acc.dU_rest.data() + (n + 1) * row_F};
    Real* const_dUU[4] = {nullptr, acc.dUU_rest.data(), nullptr, acc.dUU_rest.data() + (n + 1) * row_V};

    for (int b = block_begin; b < block_end; ++b) {
        const int begin = data_.block_start[m][b], end = data_.block_start[m][b + 1];
        if (begin == end) continue;
        const int x0 = b * X_BLOCK, xn = std::min(X_BLOCK, n - x0);
        const Real* Vt_x = ws.Vt.data() + std::size_t(x0) * HDh;
        for (int h = 0; h < H; ++h) {
            gemm(xn, Fp, Dh, Vt_x + h * Dh, HDh, 1, ws.W_OI.data() + std::size_t(h) * Dh * Fp, Fp,
                 tile.U_x.data() + std::size_t(h) * Fp, std::ptrdiff_t(row_F), false);
            gemm(xn, Vp, Dh, Vt_x + h * Dh, HDh, 1, ws.W_OUh.data() + std::size_t(h) * Dh * Vp, Vp,
                 tile.UU_x.data() + std::size_t(h) * Vp, std::ptrdiff_t(row_V), false);
        }
        std::fill(tile.dU_x.data(), tile.dU_x.data() + xn * row_F, Real(0));
        std::fill(tile.dUU_x.data(), tile.dUU_x.data() + xn * row_V, Real(0));
        // Where the rows of positions 0 (x, the block buffers) and 2 (y, the tables) live.
        auto point_rows = [&](const int* r) {
            const std::size_t ix = std::size_t(r[0] - x0), iy = std::size_t(r[2] - n);
            for (int h = 0; h < H; ++h) {
                u_rows[h] = tile.U_x.data() + ix * row_F + h * Fp;
                uu_rows[h] = tile.UU_x.data() + ix * row_V + h * Vp;
                du_rows[h] = tile.dU_x.data() + ix * row_F + h * Fp;
                duu_rows[h] = tile.dUU_x.data() + ix * row_V + h * Vp;
                u_rows[H + h] = ws.U_rest + iy * row_F + h * Fp;
                uu_rows[H + h] = ws.UU_rest + iy * row_V + h * Vp;
                du_rows[H + h] = acc.dU_rest.data() + iy * row_F + h * Fp;
                duu_rows[H + h] = acc.dUU_rest.data() + iy * row_V + h * Vp;
            }
        };

        for (int i0 = begin; i0 < end; i0 += TILE) {
            const int count = std::min(TILE, end - i0);
            Real* hidden = tile.hidden.data();
            Real* logits = tile.logits.data();
            tile_forward(s, ws, XRows<Real>{tile.U_x.data(), tile.UU_x.data(), x0}, xs + i0, ys + i0, count,
                         rows.data(), tile.a.data(), hidden, logits);

            double tile_loss = 0.0;
            for (int i = 0; i < count; ++i)
                tile_loss += double(weight * loss_and_dlogits(logits + std::size_t(i) * Vp, V, Vp, labels[i0 + i], weight));
            acc.loss += tile_loss;

            // Backward: W_OU's gradient, then dhidden through it.
            gemm(Fp, Vp, count, hidden, 1, Fp, logits, Vp, acc.dW_OU.data(), Vp, true);
            Real* dpre = tile.dhidden.data();
            gemm(count, Fp, Vp, logits, Vp, 1, ws.W_OU_T, Fp, dpre, Fp, false);
            for (int i = 0; i < count; ++i) {
                const Real* h_i = hidden + std::size_t(i) * Fp;
                Real* d_i = dpre + std::size_t(i) * Fp;
                // relu': hidden > 0 (a NaN hidden blocks its gradient, as torch's threshold_backward).
                for (int f = 0; f < Fp; f += S::L)
                    S::store(d_i + f, S::load(h_i + f) > Real(0) ? S::load(d_i + f) : S::zero());
            }
            // Sums over the tile: the bases' gradients, and the constant rows'
            // gradients and attention-weight gradients, as GEMMs.
            add_column_sums(count, dpre, Fp, acc.dbase_pre.data());
            add_column_sums(count, logits, Vp, acc.dbase_logit.data());
            Real* da = tile.da.data();
            for (int t : {1, 3}) {
                gemm_nt(count, H, Fp, dpre, Fp, const_U[t], Fp, da + t * H, J, false);
                gemm_nt(count, H, Vp, logits, Vp, const_UU[t], Vp, da + t * H, J, true);
                gemm(H, Fp, count, tile.a.data() + t * H, 1, J, dpre, Fp, const_dU[t], Fp, true);
                gemm(H, Vp, count, tile.a.data() + t * H, 1, J, logits, Vp, const_dUU[t], Vp, true);
            }
            for (int i = 0; i < count; ++i) {
                const int* r = rows.data() + 4 * i;
                const Real* a = tile.a.data() + std::size_t(i) * J;
                Real* da_i = da + std::size_t(i) * J;
                const Real* g = dpre + std::size_t(i) * Fp;
                const Real* dlogits = logits + std::size_t(i) * Vp;
                point_rows(r);
                for (int t : {0, 2}) std::fill(da_i + t * H, da_i + (t + 1) * H, Real(0));
                dot_and_scatter(a, a + 2 * H, H, u_rows.data(), du_rows.data(), g, Fp, da_i, da_i + 2 * H);
                dot_and_scatter(a, a + 2 * H, H, uu_rows.data(), duu_rows.data(), dlogits, Vp, da_i, da_i + 2 * H);
                // Softmax over the 4 positions, per head.
                for (int h = 0; h < H; ++h) {
                    Real mean = 0;
                    for (int t = 0; t < 4; ++t) mean += a[t * H + h] * da_i[t * H + h];
                    for (int t = 0; t < 4; ++t) dS[r[t] * H + h] += a[t * H + h] * (da_i[t * H + h] - mean);
                }
            }
        }

        // The block's x rows of U and UU into gradients of V_tab, W_OI and W_OUh.
        for (int h = 0; h < H; ++h) {
            const Real* dU_x = tile.dU_x.data() + std::size_t(h) * Fp;
            const Real* dUU_x = tile.dUU_x.data() + std::size_t(h) * Vp;
            gemm(Dh, Fp, xn, Vt_x + h * Dh, 1, HDh, dU_x, std::ptrdiff_t(row_F),
                 acc.dW_OI.data() + std::size_t(h) * Dh * Fp, Fp, true);
            gemm(Dh, Vp, xn, Vt_x + h * Dh, 1, HDh, dUU_x, std::ptrdiff_t(row_V),
                 acc.dW_OUh.data() + std::size_t(h) * Dh * Vp, Vp, true);
            Real* dVt_x = acc.dVt.data() + std::size_t(x0) * HDh + h * Dh;
            gemm_nt(xn, Dh, Fp, dU_x, std::ptrdiff_t(row_F), ws.W_OI.data() + std::size_t(h) * Dh * Fp, Fp,
                    dVt_x, HDh, true);
            gemm_nt(xn, Dh, Vp, dUU_x, std::ptrdiff_t(row_V), ws.W_OUh.data() + std::size_t(h) * Dh * Vp, Vp,
                    dVt_x, HDh, true);
        }
    }
}

namespace {

template <typename Real>
void tables_backward(const ModelShape& s, const ParamPtrs<Real>& p, Workspace<Real>& ws,
                     ExampleGrads<Real>& acc, const ParamPtrs<Real>& g) {
    const int R = s.R(), D = s.D, H = s.H, Dh = s.Dh, HDh = s.HDh(), F = s.F, V = s.V, n = s.n;
    const Padded<Real> pd(s);
    const int Fp = pd.Fp, Vp = pd.Vp;
    const Real* c = ws.R_tab.data() + std::size_t(R - 1) * D;

    // Rows n.. of V_tab through U_rest = V_tab W_OI and UU_rest = V_tab W_OUh.
    for (int h = 0; h < H; ++h) {
        const Real* W_OI = ws.W_OI.data() + std::size_t(h) * Dh * Fp;
        const Real* W_OUh = ws.W_OUh.data() + std::size_t(h) * Dh * Vp;
        const Real* dU = acc.dU_rest.data() + std::size_t(h) * Fp;
        const Real* dUU = acc.dUU_rest.data() + std::size_t(h) * Vp;
        const Real* Vt = ws.Vt.data() + std::size_t(n) * HDh + h * Dh;
        Real* dVt = acc.dVt.data() + std::size_t(n) * HDh + h * Dh;
        gemm_nt(n + 2, Dh, Fp, dU, std::ptrdiff_t(H) * Fp, W_OI, Fp, dVt, HDh, false);
        gemm_nt(n + 2, Dh, Vp, dUU, std::ptrdiff_t(H) * Vp, W_OUh, Vp, dVt, HDh, true);
        gemm(Dh, Fp, n + 2, Vt, 1, HDh, dU, std::ptrdiff_t(H) * Fp, acc.dW_OI.data() + std::size_t(h) * Dh * Fp, Fp, true);
        gemm(Dh, Vp, n + 2, Vt, 1, HDh, dUU, std::ptrdiff_t(H) * Vp, acc.dW_OUh.data() + std::size_t(h) * Dh * Vp, Vp, true);
    }

    // Through W_OI = W_O W_in, W_OUh = W_O W_U, W_OU = W_out W_U and the bases.
    for (int h = 0; h < H; ++h) {
        Real* gW_O = g.W_O + std::size_t(h) * Dh * D;
        const Real* dW_OI = acc.dW_OI.data() + std::size_t(h) * Dh * Fp;
        const Real* dW_OUh = acc.dW_OUh.data() + std::size_t(h) * Dh * Vp;
        gemm_nt(Dh, D, F, dW_OI, Fp, p.W_in, F, gW_O, D, false);
        gemm_nt(Dh, D, V, dW_OUh, Vp, p.W_U, V, gW_O, D, true);
        const Real* W_O = p.W_O + std::size_t(h) * Dh * D;
        gemm(D, F, Dh, W_O, 1, D, dW_OI, Fp, g.W_in, F, h > 0);
        gemm(D, V, Dh, W_O, 1, D, dW_OUh, Vp, g.W_U, V, h > 0);
    }
    gemm(D, F, 1, c, 1, 1, acc.dbase_pre.data(), Fp, g.W_in, F, true);
    std::copy(acc.dbase_pre.data(), acc.dbase_pre.data() + F, g.b_in);
    gemm(D, V, F, p.W_out, 1, D, acc.dW_OU.data(), Vp, g.W_U, V, true);
    gemm(D, V, 1, ws.c_bout.data(), 1, 1, acc.dbase_logit.data(), Vp, g.W_U, V, true);
    Real* W_U_T = ws.small_T;  // (V, D): W_out's gradient has a short inner dimension V
    transpose(D, V, p.W_U, V, W_U_T, D);
    gemm(F, D, V, acc.dW_OU.data(), Vp, 1, W_U_T, D, g.W_out, D, false);
    // b_out and c receive dlogits @ W_U^T summed over examples; c also dpre @ W_in^T.
    gemm(1, D, V, acc.dbase_logit.data(), Vp, 1, W_U_T, D, g.b_out, D, false);
    gemm_nt(1, D, F, acc.dbase_pre.data(), Fp, p.W_in, F, ws.dc, D, false);
    for (int d = 0; d < D; ++d) ws.dc[d] += g.b_out[d];

    // Scores S = K q / sqrt(Dh), K = R_tab W_K, V_tab = R_tab W_V, q = c W_Q.
    const Real scale = Real(1.0 / std::sqrt(double(Dh)));
    std::fill(ws.dq, ws.dq + HDh, Real(0));
    for (int r = 0; r < R; ++r)
        for (int h = 0; h < H; ++h) {
            const Real ds = acc.dS.data()[r * H + h] * scale;
            const Real* k = ws.K.data() + std::size_t(r) * HDh + h * Dh;
            const Real* q = ws.q.data() + h * Dh;
            Real* dk = ws.dK + std::size_t(r) * HDh + h * Dh;
            Real* dq = ws.dq + h * Dh;
            for (int e = 0; e < Dh; ++e) {
                dk[e] = ds * q[e];
                dq[e] += ds * k[e];
            }
        }
    const Real* dVt = acc.dVt.data();
    for (int h = 0; h < H; ++h) {
        const std::size_t w = std::size_t(h) * D * Dh;
        gemm(D, Dh, R, ws.R_tab.data(), 1, D, ws.dK + h * Dh, HDh, g.W_K + w, Dh, false);
        gemm(D, Dh, R, ws.R_tab.data(), 1, D, dVt + h * Dh, HDh, g.W_V + w, Dh, false);
        gemm(D, Dh, 1, c, 1, 1, ws.dq + h * Dh, Dh, g.W_Q + w, Dh, false);
        transpose(D, Dh, p.W_K + w, Dh, ws.small_T, D);
        gemm(R, D, Dh, ws.dK + h * Dh, HDh, 1, ws.small_T, D, ws.dR, D, h > 0);
        transpose(D, Dh, p.W_V + w, Dh, ws.small_T, D);
        gemm(R, D, Dh, dVt + h * Dh, HDh, 1, ws.small_T, D, ws.dR, D, true);
        transpose(D, Dh, p.W_Q + w, Dh, ws.small_T, D);
        gemm(1, D, Dh, ws.dq + h * Dh, Dh, 1, ws.small_T, D, ws.dR + std::size_t(R - 1) * D, D, true);
    }
    Real* dR_eq = ws.dR + std::size_t(R - 1) * D;
    for (int d = 0; d < D; ++d) dR_eq[d] += ws.dc[d];

    // Rows back onto the embeddings: W_E[token(r)] and W_pos[pos(r)].
    std::fill(g.W_E, g.W_E + std::size_t(V) * D, Real(0));
    std::fill(g.W_pos, g.W_pos + std::size_t(4) * D, Real(0));
    for (int r = 0; r < R; ++r) {
        const Real* dr = ws.dR + std::size_t(r) * D;
        Real* ge = g.W_E + std::size_t(row_token(r, n)) * D;
        Real* gp = g.W_pos + std::size_t(row_pos(r, n)) * D;
        for (int d = 0; d < D; ++d) {
            ge[d] += dr[d];
            gp[d] += dr[d];
        }
    }
}

// torch.optim.AdamW's update of one model, operation for operation as the
// vectorised CPU kernel behind torch._fused_adamw_ (the batched engine's), so
// both backends update identical gradients to identical bits: scalars formed
// in double and rounded once; fused multiply-adds exactly where torch 2.13's
// AVX-512 kernel has them (found by comparing candidate orders bit for bit
// against torch._fused_adamw_), every other product and sum rounded
// separately, hence no contraction here whatever -ffp-contract says.
template <typename Real>
#if defined(__clang__)
#elif defined(__GNUC__)
__attribute__((optimize("fp-contract=off")))
#endif
void adamw(Real* param, const Real* grad, Real* exp_avg, Real* exp_avg_sq, std::size_t P, double lr,
           double weight_decay, const AdamWArgs& a) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    const double bias_correction1 = 1.0 - std::pow(a.beta1, double(a.step));
    const double bias_correction2 = 1.0 - std::pow(a.beta2, double(a.step));
    const Real decay = Real(1.0 - lr * weight_decay);
    // lerp(m, g, w) = m + w (g - m) for |w| < 0.5, else g + (w - 1) (g - m).
    const Real lerp_weight = Real(1.0 - a.beta1);
    const bool small_weight = std::abs(lerp_weight) < Real(0.5);
    const Real lerp_coeff = small_weight ? lerp_weight : lerp_weight - Real(1);
    const Real beta2 = Real(a.beta2), sq_coeff = Real(1.0 - a.beta2);
    const Real neg_step_size = Real(-(lr / bias_correction1));
    const Real bc2_sqrt = Real(std::sqrt(bias_correction2));
    const Real eps = Real(a.eps);
    for (std::size_t i = 0; i < P; ++i) {
        const Real g = grad[i];
        const Real p = weight_decay != 0.0 ? param[i] * decay : param[i];
        const Real m = std::fma(lerp_coeff, g - exp_avg[i], small_weight ? exp_avg[i] : g);
        const Real v = std::fma(sq_coeff * g, g, exp_avg_sq[i] * beta2);
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        const Real denom = std::sqrt(v) / bc2_sqrt + eps;
        param[i] = p + neg_step_size * m / denom;
    }
}

}  // namespace

template <typename Real>
void Engine<Real>::finish_model(int m, Real* params, Real* grads, Real* exp_avg, Real* exp_avg_sq,
                                const AdamWArgs* adamw_args, ExampleGrads<Real>& acc,
                                Workspace<Real>& ws, StepOutput out) const {
    const std::size_t P = layout_.P, off = std::size_t(m) * P;
    tables_backward(shape_, ParamPtrs<Real>(params + off, layout_), ws, acc, ParamPtrs<Real>(grads + off, layout_));
    // g - g is 0 for every finite g and NaN otherwise: one vectorisable pass.
    Real nonfinite = 0;
    const Real* g = grads + off;
    for (std::size_t i = 0; i < P; ++i) nonfinite += g[i] - g[i];
    const bool finite = std::isfinite(acc.loss) && nonfinite == Real(0);
    out.loss[m] = acc.loss;
    out.finite[m] = finite;
    if (adamw_args != nullptr && finite && !adamw_args->frozen[m])
        adamw(params + off, grads + off, exp_avg + off, exp_avg_sq + off, P, adamw_args->lr[m],
              adamw_args->weight_decay[m], *adamw_args);
}

template <typename Real>
void Engine<Real>::step(Real* params, Real* grads, Real* exp_avg, Real* exp_avg_sq,
                        const AdamWArgs* adamw_args, int n_threads, StepOutput out) {
    const int M = data_.M;
#ifdef _OPENMP
    const int threads = std::max(1, n_threads);
#else
    const int threads = 1;
    (void)n_threads;
#endif
    const std::size_t P = layout_.P;
    const int blocks = data_.blocks();
    // A model's x blocks are always cut into the same shards, each summed from
    // zero and added in shard order, whether one thread walks them all or
    // several share them: the sums, and so the result, are the same for any
    // thread count.
    const int shards = std::min(MODEL_SHARDS, blocks);
    auto shard_begin = [&](int s) { return blocks * s / shards; };

    if (M >= threads) {
        // Whole models per thread: shard 0 into one accumulator, each later
        // shard into a second one, added after it.
        while (int(workspaces_.size()) < threads) workspaces_.push_back(std::make_unique<Workspace<Real>>(shape_));
        while (int(accumulators_.size()) < 2 * threads) accumulators_.push_back(std::make_unique<ExampleGrads<Real>>(shape_));
        while (int(tiles_.size()) < threads) tiles_.push_back(std::make_unique<TileScratch<Real>>(shape_));
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (int m = 0; m < M; ++m) {
            const int tid = thread_id();
            Workspace<Real>& ws = *workspaces_[tid];
            ExampleGrads<Real>& acc = *accumulators_[2 * tid];
            ExampleGrads<Real>& part = *accumulators_[2 * tid + 1];
            tables_forward(shape_, ParamPtrs<Real>(params + std::size_t(m) * P, layout_), ws);
            acc.zero();
            examples(m, shard_begin(0), shard_begin(1), ws, acc, *tiles_[tid]);
            for (int s = 1; s < shards; ++s) {
                part.zero();
                examples(m, shard_begin(s), shard_begin(s + 1), ws, part, *tiles_[tid]);
                acc.add(part);
            }
            finish_model(m, params, grads, exp_avg, exp_avg_sq, adamw_args, acc, ws, out);
        }
        return;
    }

    // Fewer models than threads: the shards of all models are shared out.
    while (int(workspaces_.size()) < M) workspaces_.push_back(std::make_unique<Workspace<Real>>(shape_));
    while (int(accumulators_.size()) < M * shards) accumulators_.push_back(std::make_unique<ExampleGrads<Real>>(shape_));
    while (int(tiles_.size()) < threads) tiles_.push_back(std::make_unique<TileScratch<Real>>(shape_));
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int m = 0; m < M; ++m)
            tables_forward(shape_, ParamPtrs<Real>(params + std::size_t(m) * P, layout_), *workspaces_[m]);
#pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < M * shards; ++item) {
            const int m = item / shards, s = item % shards;
            ExampleGrads<Real>& acc = *accumulators_[item];
            acc.zero();
            examples(m, shard_begin(s), shard_begin(s + 1), *workspaces_[m], acc, *tiles_[thread_id()]);
        }
#pragma omp for schedule(dynamic, 1)
        for (int m = 0; m < M; ++m) {
            ExampleGrads<Real>& acc = *accumulators_[std::size_t(m) * shards];
            for (int s = 1; s < shards; ++s) acc.add(*accumulators_[std::size_t(m) * shards + s]);
            finish_model(m, params, grads, exp_avg, exp_avg_sq, adamw_args, acc, *workspaces_[m], out);
        }
    }
}

template <typename Real>
void Engine<Real>::logits(const Real* params, const int64_t* models, int n_models, const int32_t* x,
                          const int32_t* y, int N, Real* out, int n_threads) {
#ifdef _OPENMP
    const int threads = std::max(1, n_threads);
#else
    const int threads = 1;
    (void)n_threads;
#endif
    const ModelShape& s = shape_;
    const Padded<Real> pd(s);
    const int V = s.V, Vp = pd.Vp;
    const std::size_t P = layout_.P;
    const int tiles = (N + TILE - 1) / TILE;
    // Models `threads` at a time: their tables in parallel, then all their
    // tiles of examples. Tiles start at fixed multiples of TILE, and an
    // example's logits do not depend on its tile, so neither the thread count
    // nor the other models change them.
    const int chunk = std::min(threads, n_models);
    while (int(workspaces_.size()) < chunk) workspaces_.push_back(std::make_unique<Workspace<Real>>(shape_));
    while (int(tiles_.size()) < threads) tiles_.push_back(std::make_unique<TileScratch<Real>>(shape_));
    while (int(eval_x_rows_.size()) < chunk) eval_x_rows_.push_back(std::make_unique<XRowTables<Real>>(s));
    for (int c0 = 0; c0 < n_models; c0 += chunk) {
        const int count = std::min(chunk, n_models - c0);
#pragma omp parallel num_threads(threads)
        {
#pragma omp for schedule(dynamic, 1)
            for (int k = 0; k < count; ++k) {
                tables_forward(shape_, ParamPtrs<Real>(const_cast<Real*>(params) + std::size_t(models[c0 + k]) * P, layout_),
                               *workspaces_[k]);
                x_row_tables(s, *workspaces_[k], eval_x_rows_[k]->U.data(), eval_x_rows_[k]->UU.data());
            }
#pragma omp for schedule(dynamic, 1)
            for (int item = 0; item < count * tiles; ++item) {
                const int k = item / tiles, i0 = (item % tiles) * TILE, n_ex = std::min(TILE, N - i0);
                TileScratch<Real>& tile = *tiles_[thread_id()];
                std::vector<int> rows(4 * TILE);
                tile_forward(s, *workspaces_[k], XRows<Real>{eval_x_rows_[k]->U.data(), eval_x_rows_[k]->UU.data(), 0}, x + i0, y + i0, n_ex, rows.data(),
                             tile.a.data(), tile.hidden.data(), tile.logits.data());
                Real* dst = out + (std::size_t(c0 + k) * N + i0) * V;
                for (int i = 0; i < n_ex; ++i)
                    std::copy(tile.logits.data() + std::size_t(i) * Vp, tile.logits.data() + std::size_t(i) * Vp + V,
                              dst + std::size_t(i) * V);
            }
        }
    }
}

template class Engine<float>;
template class Engine<double>;

}  // namespace fastgrok
