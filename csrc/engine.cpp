// The fused CPU engine: one training step of a population, model by model.
//
// Algorithm in the fp32 precision (notation of
// fastgrok/backends/torch_engine.py; t indexes the T = 4 positions, r_t the
// token row an example reads there, a[t, h] its attention weights at the last
// position, c = W_E[=] + W_pos[3], the = row's residual; the other precisions:
// "The direct path" below).
// The rows and the parameter offsets are fastgrok/layout.py's, received
// through the constructor (engine.hpp says what is checked).
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
// The operator and = rows (positions 1 and 3) are the same for every example,
// so their share of the sums above is a GEMM per tile of examples; only the
// x and y rows (2H per example) are gathered, dotted and scattered one by one.
//
// Multiply-adds at the paper config (p = 113, D = 128, H = 4, Dh = 32,
// F = 512, V = 115): per example 3*F*V + 12*H*(F + V) = 0.21 M (the batched
// engine: 3*(H*Dh*D + 2*D*F + D*V) = 0.49 M); per model and step 0.13 G for
// the tables (R*H*Dh*(F + V) products three times, H*Dh*D*(F + V) three
// times, F*D*V three times, the key/value tables), counted exactly by
// fastgrok.backends.cpu_engine.CpuBackend.flops_per_model_step. At
// n_train = 2000 a model-step is 1.09 GFLOP against the batched engine's 1.99.
//
// Memory and locality. Examples are sorted by (x, y) and walked in blocks of
// X_BLOCK x values (Engine::examples: block_tables, then per tile
// tile_forward, tile_loss and tile_backward, then block_gradients). The x
// rows of U, UU (and their gradients) exist only for the current block, in
// L1/L2-sized buffers: they are built from V_tab when the block starts and
// turned into gradients of V_tab and W_OI/W_OUh when it ends. The other rows
// (operator, y, =) are whole tables. Within a block, tiles of TILE examples
// keep hidden, dhidden and logits (216 KB at the paper config) in L2 next to
// W_OU. The tables only needed by the examples share memory with the
// intermediate gradients of the per-step backward. At the paper config a
// thread's workspace is ~4.6 MB, so with M = 8 models on 2 threads the
// scratch adds ~1.2 MB per model to the 3.6 MB of parameters, gradients and
// moments.
//
// The direct path (precision tf32, bf16, bf16x3). A precision mode rounds
// both operands of the per-example products with W_O, W_in, W_out and W_U,
// forward and backward (fastgrok/precision.py); the rewrite above has no such
// products (its U, UU and W_OU fold them into per-step tables), and rounding
// its own operands would emulate no GPU. So these modes compute the batched
// engine's chain instead (torch_engine.py, examples_forward and
// examples_backward), per tile of examples, on the same GEMM micro-kernels:
//   per step    the attention tables (as fp32), and the four weights and
//               their transposes rounded once (DirectWeights)
//   forward     a, z = sum_t a_t V_tab[r_t]; resid_mid = c + z @ W_O;
//               hidden = relu(resid_mid @ W_in + b_in);
//               resid_fin = hidden @ W_out + b_out + resid_mid;
//               logits = resid_fin @ W_U, each product's activation rounded
//               as it enters (precision.hpp, integer operations on the bits)
//   backward    dW_U, dresid, dW_out, dpre, dW_in, dresid += dpre @ W_in^T,
//               dW_O, dz: every operand rounded, the activations' rounded
//               copies kept from the forward; then da, the softmax backward
//               and dV_tab, dS per example on its four token rows
//   per step    the attention tables' backward, shared with fp32.
// Multiply-adds per example: 3 * (H*Dh*D + 2*D*F + D*V) = 0.49 M at the paper
// config (the rewrite: 0.21 M), three times that in bf16x3 (three GEMMs per
// product, see product()), plus the rounding passes. The table products (keys,
// values, query, scores) and the attention arithmetic stay unrounded.
//
// Threads and reproducibility: each model's step is computed by one thread,
// from its tables to AdamW, with its own workspace, so a model's tables stay
// in that core's caches and its sums are formed in one order whatever the
// thread count or the other models: threads only decide which models run at
// the same time, and a population uses at most M of them. (Splitting a model's
// examples over threads at fixed boundaries keeps that too, but the extra
// accumulator pass cost 2-3% of every step, measured, for the sake of
// populations smaller than the core count.)
#include "engine.hpp"

#include <algorithm>
#include <array>
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
#include "precision.hpp"
#include "vec.hpp"

namespace fastgrok {

namespace {

constexpr int X_BLOCK = TrainingSet::X_BLOCK;
// Examples per tile: a multiple of MR so the logits GEMM has no ragged rows.
constexpr int TILE = 4 * MR;
// Examples per tile of the direct path. A tile streams all rounded weights
// (1.3 MB in tf32 and bf16 at the paper config, 3.8 MB in bf16x3: hi, lo,
// hi + lo) from L3 once forward and once backward, and its activations and
// their rounded copies (~3.4 K values per example in tf32, 6.8 K in bf16x3)
// should stay in L2 (512 KB on Zen 3). Measured at the paper config on one
// core: 48 examples are fastest in tf32 (8% over 24 and 96), 24 in bf16x3
// (6% over 48).
inline int direct_tile(Precision p) { return p == Precision::bf16x3 ? 4 * MR : 8 * MR; }

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

template <typename Real>
struct Padded {
    int Fp, Vp;
    explicit Padded(const ModelShape& s)
        : Fp(int(round_up(s.F, Simd<Real>::L))), Vp(int(round_up(s.V, Simd<Real>::L))) {}
};

}  // namespace

namespace {

std::string str(int64_t v) { return std::to_string(v); }

[[noreturn]] void bad(const std::string& message) { throw std::invalid_argument(message); }

}  // namespace

TokenRows::TokenRows(int n, int d_vocab, int n_ctx, std::vector<int64_t> token_, std::vector<int64_t> pos_,
                     int op_row_, int first_y_row_, int eq_row_)
    : op_row(op_row_), first_y_row(first_y_row_), eq_row(eq_row_) {
    const int64_t R = int64_t(token_.size());
    if (int64_t(pos_.size()) != R)
        bad("row_pos: " + str(int64_t(pos_.size())) + " rows, row_token has " + str(R));
    for (int64_t r = 0; r < R; ++r) {
        if (token_[r] < 0 || token_[r] >= d_vocab)
            bad("row_token[" + str(r) + "]=" + str(token_[r]) + ": tokens are 0.." + str(d_vocab - 1));
        if (pos_[r] < 0 || pos_[r] >= n_ctx)
            bad("row_pos[" + str(r) + "]=" + str(pos_[r]) + ": positions are 0.." + str(n_ctx - 1) + " (n_ctx=" +
                str(n_ctx) + ")");
    }
    // The order the algorithm relies on (engine.hpp).
    if (op_row != n)
        bad("op_row=" + str(op_row) + ": the n=" + str(n) + " x rows come first, so the operator row must be " +
            str(n));
    if (first_y_row != op_row + 1)
        bad("first_y_row=" + str(first_y_row) + ": the y rows must follow the operator row, at " + str(op_row + 1));
    if (eq_row != first_y_row + n)
        bad("eq_row=" + str(eq_row) + ": the = row must follow the n=" + str(n) + " y rows, at " +
            str(first_y_row + n));
    if (R != int64_t(eq_row) + 1)
        bad("row_token: " + str(R) + " rows; the = row " + str(eq_row) + " must be the last, so R=" +
            str(int64_t(eq_row) + 1));
    for (int x = 0; x < n; ++x)
        if (token_[x] != x)
            bad("row_token[" + str(x) + "]=" + str(token_[x]) + ": x row " + str(x) + " must hold element " + str(x));
    for (int y = 0; y < n; ++y)
        if (token_[first_y_row + y] != y)
            bad("row_token[" + str(first_y_row + y) + "]=" + str(token_[first_y_row + y]) + ": y row " +
                str(first_y_row + y) + " must hold element " + str(y));
    for (int r = 1; r < n; ++r)
        if (pos_[r] != pos_[0])
            bad("row_pos[" + str(r) + "]=" + str(pos_[r]) + ": every x row must be at the x position row_pos[0]=" +
                str(pos_[0]));
    for (int r = first_y_row + 1; r < eq_row; ++r)
        if (pos_[r] != pos_[first_y_row])
            bad("row_pos[" + str(r) + "]=" + str(pos_[r]) + ": every y row must be at the y position row_pos[" +
                str(first_y_row) + "]=" + str(pos_[first_y_row]));
    pos_x = int(pos_[0]), pos_op = int(pos_[op_row]), pos_y = int(pos_[first_y_row]), pos_eq = int(pos_[eq_row]);
    // A sequence is <x> <op> <y> <=>: each position holds exactly one kind of row.
    if (n_ctx != 4) bad("n_ctx=" + str(n_ctx) + ": a sequence <x> <op> <y> <=> has 4 positions");
    if (pos_eq != n_ctx - 1)
        bad("row_pos[" + str(eq_row) + "]=" + str(pos_eq) + ": the = row must be at the last position, " +
            str(n_ctx - 1) + ", where the loss is read");
    const int kinds[] = {pos_x, pos_op, pos_y};
    const int rows_of_kind[] = {0, op_row, first_y_row};
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < i; ++j)
            if (kinds[i] == kinds[j])
                bad("row_pos[" + str(rows_of_kind[i]) + "]=" + str(kinds[i]) + ": the x, operator and y rows " +
                    "need distinct positions; row " + str(rows_of_kind[j]) + " is there already");
    token.assign(token_.begin(), token_.end());
    pos.assign(pos_.begin(), pos_.end());
}

ModelShape::ModelShape(int n_, int d_vocab, int d_model, int n_heads, int d_head, int d_mlp, int n_ctx,
                       TokenRows rows_)
    : n(n_), V(d_vocab), D(d_model), H(n_heads), Dh(d_head), F(d_mlp), T(n_ctx), rows(std::move(rows_)) {}

ParamLayout::ParamLayout(const ModelShape& s, const std::vector<int64_t>& offsets) {
    static const char* const names[COUNT + 1] = {"W_E", "W_pos", "W_Q",  "W_K",   "W_V",   "W_O",
                                                 "W_in", "b_in", "W_out", "b_out", "W_U", "P"};
    const int64_t V = s.V, D = s.D, H = s.H, Dh = s.Dh, F = s.F, T = s.T;
    struct Shape {
        const char* dims;
        std::vector<int64_t> extents;
    };
    const Shape shapes[COUNT] = {{"(V, D)", {V, D}},       {"(T, D)", {T, D}},       {"(H, D, Dh)", {H, D, Dh}},
                                 {"(H, D, Dh)", {H, D, Dh}}, {"(H, D, Dh)", {H, D, Dh}}, {"(H, Dh, D)", {H, Dh, D}},
                                 {"(D, F)", {D, F}},       {"(F,)", {F}},            {"(F, D)", {F, D}},
                                 {"(D,)", {D}},            {"(D, V)", {D, V}}};
    if (offsets.size() != std::size_t(COUNT + 1))
        bad("param_offsets: " + str(int64_t(offsets.size())) + " values; expected " + str(COUNT + 1) +
            " (the offsets of W_E..W_U in PARAM_NAMES order, then P)");
    std::size_t* fields[COUNT + 1] = {&W_E, &W_pos, &W_Q, &W_K, &W_V, &W_O, &W_in, &b_in, &W_out, &b_out, &W_U, &P};
    int64_t expected = 0;
    for (int i = 0; i <= COUNT; ++i) {
        if (offsets[i] != expected) {
            std::string why = "the row starts with W_E";
            if (i > 0) {
                const Shape& prev = shapes[i - 1];
                std::string extents;
                for (std::size_t k = 0; k < prev.extents.size(); ++k)
                    extents += (k ? ", " : "") + str(prev.extents[k]);
                why = std::string(names[i - 1]) + " " + prev.dims + " = (" + extents +
                      (prev.extents.size() == 1 ? ",)" : ")") + " spans " + str(offsets[i - 1]) + ".." +
                      str(expected);
            }
            bad("param_offsets[" + str(i) + "] (" + names[i] + ")=" + str(offsets[i]) + ": expected " +
                str(expected) + ", " + why);
        }
        *fields[i] = std::size_t(expected);
        if (i < COUNT) {
            int64_t size = 1;
            for (int64_t e : shapes[i].extents) size *= e;
            expected += size;
        }
    }
}

TrainingSet::TrainingSet(const ModelShape& shape, int M_, int N, const int64_t* xs, const int64_t* ys,
                         const int64_t* ls, const int64_t* train_size)
    : M(M_), x(M_), y(M_), labels(M_), block_start(M_) {
    const int n = shape.n;
    const int blocks = (n + X_BLOCK - 1) / X_BLOCK;
    for (int m = 0; m < M; ++m) {
        const int64_t n_train = train_size[m];
        if (n_train < 1 || n_train > N)
            throw std::invalid_argument("train_size[" + std::to_string(m) + "]=" + std::to_string(n_train) +
                                        ": must be in 1.." + std::to_string(N));
        const int64_t* xm = xs + std::size_t(m) * N;
        const int64_t* ym = ys + std::size_t(m) * N;
        const int64_t* lm = ls + std::size_t(m) * N;
        for (int64_t i = 0; i < n_train; ++i)
            if (xm[i] < 0 || xm[i] >= n || ym[i] < 0 || ym[i] >= n || lm[i] < 0 || lm[i] >= shape.V)
                throw std::invalid_argument(
                    "model " + std::to_string(m) + " example " + std::to_string(i) + ": (x, y, label) = (" +
                    std::to_string(xm[i]) + ", " + std::to_string(ym[i]) + ", " + std::to_string(lm[i]) +
                    "); valid: x, y in 0.." + std::to_string(n - 1) + ", label in 0.." +
                    std::to_string(shape.V - 1));
        std::vector<int64_t> order(n_train);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) {
            return xm[i] != xm[j] ? xm[i] < xm[j] : ym[i] < ym[j];
        });
        for (int64_t i : order) {
            x[m].push_back(int32_t(xm[i]));
            y[m].push_back(int32_t(ym[i]));
            labels[m].push_back(int32_t(lm[i]));
        }
        block_start[m].assign(blocks + 1, int(n_train));
        for (int b = 0, i = 0; b < blocks; ++b) {
            while (i < n_train && x[m][i] < b * X_BLOCK) ++i;
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
    Real *U_rest;      // (R - op_row, H, Fp) rows of U other than x: operator, y, =
    Real *UU_rest;     // (R - op_row, H, Vp)
    Real *base_pre;    // (Fp) c @ W_in + b_in
    Real *base_logit;  // (Vp) (c + b_out) @ W_U
    Real *dK;          // (R, H*Dh)   backward only
    Real *dR;          // (R, D)      backward only
    Real *dq, *dc;     // (H*Dh), (D) backward only
    Real *small_T;     // (max(D, V) * max(D, Dh)) transposed copies, backward only

    // Where each arena table starts: the examples' tables and the backward's
    // from 0 each, so the arena is as large as the larger of the two.
    struct ArenaPlan {
        std::size_t W_OU, W_OU_T, U_rest, UU_rest, base_pre, base_logit;
        std::size_t dK, dR, dq, dc, small_T;
        std::size_t size;
    };

    // rewrite: the fp32 path's tables; the direct path needs only the
    // attention tables and the backward's scratch.
    static ArenaPlan plan(const ModelShape& s, bool rewrite) {
        const Padded<Real> pd(s);
        const std::size_t R = s.R(), rest = s.rows.rest(), H = s.H, Fp = pd.Fp, Vp = pd.Vp, D = s.D,
                          HDh = s.HDh();
        Carver ex, bw;
        ArenaPlan a{};
        if (rewrite) {
            a.W_OU = ex.take<Real>(Fp * Vp), a.W_OU_T = ex.take<Real>(Fp * Vp);
            a.U_rest = ex.take<Real>(rest * H * Fp), a.UU_rest = ex.take<Real>(rest * H * Vp);
            a.base_pre = ex.take<Real>(Fp), a.base_logit = ex.take<Real>(Vp);
        }
        a.dK = bw.take<Real>(R * HDh), a.dR = bw.take<Real>(R * D), a.dq = bw.take<Real>(HDh);
        a.dc = bw.take<Real>(D), a.small_T = bw.take<Real>(std::size_t(std::max(s.D, s.V)) * std::max(s.D, s.Dh));
        a.size = std::max(ex.used(), bw.used());
        return a;
    }

    explicit Workspace(const ModelShape& s, bool rewrite = true)
        : R_tab(std::size_t(s.R()) * s.D), K(std::size_t(s.R()) * s.HDh()), Vt(std::size_t(s.R()) * s.HDh()),
          q(s.HDh()), S(std::size_t(s.R()) * s.H), W_OI(rewrite ? std::size_t(s.HDh()) * Padded<Real>(s).Fp : 0),
          W_OUh(rewrite ? std::size_t(s.HDh()) * Padded<Real>(s).Vp : 0), c_bout(s.D),
          arena(plan(s, rewrite).size) {
        const ArenaPlan a = plan(s, rewrite);
        Real* base = arena.data();
        W_OU = base + a.W_OU, W_OU_T = base + a.W_OU_T, U_rest = base + a.U_rest, UU_rest = base + a.UU_rest;
        base_pre = base + a.base_pre, base_logit = base + a.base_logit;
        dK = base + a.dK, dR = base + a.dR, dq = base + a.dq, dc = base + a.dc, small_T = base + a.small_T;
    }
};

// Gradients w.r.t. the per-step tables, summed over a range of examples.
template <typename Real>
struct ExampleGrads {
    Buffer<Real> dU_rest;      // (R - op_row, H, Fp)
    Buffer<Real> dUU_rest;     // (R - op_row, H, Vp)
    Buffer<Real> dW_OU;        // (Fp, Vp)
    Buffer<Real> dW_OI;        // (H, Dh, Fp) from the x rows so far
    Buffer<Real> dW_OUh;       // (H, Dh, Vp) from the x rows so far
    Buffer<Real> dVt;          // (R, H*Dh) x rows so far
    Buffer<Real> dS;           // (R, H) w.r.t. the scaled scores
    Buffer<Real> dbase_pre;    // (Fp)
    Buffer<Real> dbase_logit;  // (Vp)
    double loss = 0.0;         // sum of weighted example losses

    explicit ExampleGrads(const ModelShape& s)
        : dU_rest(std::size_t(s.rows.rest()) * s.H * Padded<Real>(s).Fp),
          dUU_rest(std::size_t(s.rows.rest()) * s.H * Padded<Real>(s).Vp),
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
};

// Activations of one tile of examples and the x rows of the current block.
template <typename Real>
struct TileScratch {
    std::vector<int> rows;  // (TILE, T) the token row each example reads at each position
    Buffer<Real> a;         // (TILE, T*H) attention weights, index t * H + h
    Buffer<Real> hidden;    // (TILE, Fp) relu(pre); hidden > 0 is the relu mask
    Buffer<Real> logits;    // (TILE, Vp) logits, then dlogits in place
    Buffer<Real> dhidden;   // (TILE, Fp)
    Buffer<Real> da;        // (TILE, T*H) gradients w.r.t. a
    Buffer<Real> U_x, dU_x;    // (X_BLOCK, H, Fp)
    Buffer<Real> UU_x, dUU_x;  // (X_BLOCK, H, Vp)

    explicit TileScratch(const ModelShape& s)
        : rows(std::size_t(TILE) * s.T), a(TILE * s.J()), hidden(TILE * Padded<Real>(s).Fp),
          logits(TILE * Padded<Real>(s).Vp), dhidden(TILE * Padded<Real>(s).Fp), da(TILE * s.J()),
          U_x(X_BLOCK * s.H * Padded<Real>(s).Fp), dU_x(X_BLOCK * s.H * Padded<Real>(s).Fp),
          UU_x(X_BLOCK * s.H * Padded<Real>(s).Vp), dUU_x(X_BLOCK * s.H * Padded<Real>(s).Vp) {}
};

// U and UU of every x row of one model, for evaluation (training keeps one
// x block at a time in TileScratch).
template <typename Real>
struct XRowTables {
    Buffer<Real> U;   // (n, H, Fp)
    Buffer<Real> UU;  // (n, H, Vp)
    explicit XRowTables(const ModelShape& s)
        : U(std::size_t(s.n) * s.H * Padded<Real>(s).Fp), UU(std::size_t(s.n) * s.H * Padded<Real>(s).Vp) {}
};

// The direct path (engine.cpp, "The direct path"): its per-thread and
// per-step buffers.

// An operand as a precision takes it: hi, and for bf16x3 lo (empty otherwise).
template <typename Real>
struct RoundedOperand {
    Buffer<Real> hi, lo;
    RoundedOperand(std::size_t count, Precision p) : hi(count), lo(p == Precision::bf16x3 ? count : 0) {}
    // hi (lo) = x[0:n] at precision p.
    void take(Precision p, const Real* x, std::size_t n) { round_operand(p, x, hi.data(), lo.data(), n); }
};

// The four weights as the products take them, rounded once per step: the
// forward operands (k, n) and, for the backward's d_act = d_out @ W^T, their
// transposes, since the GEMM reads B with unit column stride. Rows and
// columns padded to Fp and Vp are zero.
template <typename Real>
struct DirectWeights {
    RoundedOperand<Real> W_O, W_O_T;      // (H*Dh, D), (D, H*Dh)
    RoundedOperand<Real> W_in, W_in_T;    // (D, Fp), (Fp, D)
    RoundedOperand<Real> W_out, W_out_T;  // (Fp, D), (D, Fp)
    RoundedOperand<Real> W_U, W_U_T;      // (D, Vp), (Vp, D)
    Buffer<Real> staging;                 // the largest of them before rounding

    DirectWeights(const ModelShape& s, Precision p)
        : W_O(std::size_t(s.HDh()) * s.D, p), W_O_T(std::size_t(s.HDh()) * s.D, p),
          W_in(std::size_t(s.D) * Padded<Real>(s).Fp, p), W_in_T(std::size_t(s.D) * Padded<Real>(s).Fp, p),
          W_out(std::size_t(s.D) * Padded<Real>(s).Fp, p), W_out_T(std::size_t(s.D) * Padded<Real>(s).Fp, p),
          W_U(std::size_t(s.D) * Padded<Real>(s).Vp, p), W_U_T(std::size_t(s.D) * Padded<Real>(s).Vp, p),
          staging(std::size_t(s.D) * std::max({Padded<Real>(s).Fp, Padded<Real>(s).Vp, s.HDh()})) {}

    void prepare(const ModelShape& s, const ParamPtrs<Real>& p, Precision prec) {
        const int D = s.D, HDh = s.HDh(), F = s.F, V = s.V;
        const Padded<Real> pd(s);
        const int Fp = pd.Fp, Vp = pd.Vp;
        Real* x = staging.data();
        // The padding of the staging copy is zero: each matrix below fills
        // the whole (rows, cols) extent it rounds, zeros included.
        auto put = [&](RoundedOperand<Real>& op, const Real* src, int rows, int cols, int ld_src, bool transposed,
                       int rows_p, int cols_p) {
            std::fill(x, x + std::size_t(rows_p) * cols_p, Real(0));
            if (transposed) {
                transpose(cols, rows, src, ld_src, x, cols_p);
            } else {
                for (int i = 0; i < rows; ++i)
                    std::copy(src + std::size_t(i) * ld_src, src + std::size_t(i) * ld_src + cols,
                              x + std::size_t(i) * cols_p);
            }
            op.take(prec, x, std::size_t(rows_p) * cols_p);
        };
        put(W_O, p.W_O, HDh, D, D, false, HDh, D);
        put(W_O_T, p.W_O, D, HDh, D, true, D, HDh);
        put(W_in, p.W_in, D, F, F, false, D, Fp);
        put(W_in_T, p.W_in, F, D, F, true, Fp, D);
        put(W_out, p.W_out, F, D, D, false, Fp, D);
        put(W_out_T, p.W_out, D, F, D, true, D, Fp);
        put(W_U, p.W_U, D, V, V, false, D, Vp);
        put(W_U_T, p.W_U, V, D, V, true, Vp, D);
    }
};

// Activations of one tile of DTILE examples and their rounded copies, which
// the backward products read again.
template <typename Real>
struct DirectTile {
    int size;               // DTILE: examples per tile, direct_tile(precision)
    std::vector<int> rows;  // (DTILE, T) the token row each example reads at each position
    Buffer<Real> a;         // (DTILE, T*H) attention weights, index t * H + h
    Buffer<Real> z;         // (DTILE, H*Dh) attention output
    Buffer<Real> resid_mid; // (DTILE, D)
    Buffer<Real> hidden;    // (DTILE, Fp) relu output; hidden > 0 is the relu mask
    Buffer<Real> resid_fin; // (DTILE, D)
    Buffer<Real> logits;    // (DTILE, Vp) logits, then dlogits in place
    Buffer<Real> dresid;    // (DTILE, D) d resid_fin, then d resid_mid
    Buffer<Real> dpre;      // (DTILE, Fp)
    Buffer<Real> dz;        // (DTILE, H*Dh)
    RoundedOperand<Real> z_r, resid_mid_r, hidden_r, resid_fin_r, dlogits_r, dresid_r, dpre_r;

    DirectTile(const ModelShape& s, Precision p, int tile)
        : size(tile), rows(std::size_t(tile) * s.T), a(std::size_t(tile) * s.J()), z(std::size_t(tile) * s.HDh()),
          resid_mid(std::size_t(tile) * s.D), hidden(std::size_t(tile) * Padded<Real>(s).Fp),
          resid_fin(std::size_t(tile) * s.D), logits(std::size_t(tile) * Padded<Real>(s).Vp),
          dresid(std::size_t(tile) * s.D), dpre(std::size_t(tile) * Padded<Real>(s).Fp),
          dz(std::size_t(tile) * s.HDh()), z_r(z.size(), p), resid_mid_r(resid_mid.size(), p),
          hidden_r(hidden.size(), p), resid_fin_r(resid_fin.size(), p), dlogits_r(logits.size(), p),
          dresid_r(dresid.size(), p), dpre_r(dpre.size(), p) {}
};

// Gradient sums of one model over its examples on the direct path; W_O's
// and W_out's go straight into the model's gradient row.
template <typename Real>
struct DirectGrads {
    Buffer<Real> dW_in;   // (D, Fp)
    Buffer<Real> dW_U;    // (D, Vp)
    Buffer<Real> db_in;   // (Fp)
    Buffer<Real> db_out;  // (D)
    Buffer<Real> dc;      // (D) the = row's residual, through the residual connection
    Buffer<Real> dVt;     // (R, H*Dh)
    Buffer<Real> dS;      // (R, H) w.r.t. the scaled scores
    double loss = 0.0;

    explicit DirectGrads(const ModelShape& s)
        : dW_in(std::size_t(s.D) * Padded<Real>(s).Fp), dW_U(std::size_t(s.D) * Padded<Real>(s).Vp),
          db_in(Padded<Real>(s).Fp), db_out(s.D), dc(s.D), dVt(std::size_t(s.R()) * s.HDh()),
          dS(std::size_t(s.R()) * s.H) {}

    void zero() {
        for (Buffer<Real>* b : {&dW_in, &dW_U, &db_in, &db_out, &dc, &dVt, &dS}) b->zero();
        loss = 0.0;
    }
};

namespace {

// The residual, key, value and score tables of every (token, position) row,
// and the query: R_tab, K, Vt, q, S of the workspace. Both paths.
template <typename Real>
void attention_tables(const ModelShape& s, const ParamPtrs<Real>& p, Workspace<Real>& ws) {
    const TokenRows& rows = s.rows;
    const int R = s.R(), D = s.D, H = s.H, Dh = s.Dh, HDh = s.HDh();
    for (int r = 0; r < R; ++r) {
        const Real* e = p.W_E + std::size_t(rows.token[r]) * D;
        const Real* pos = p.W_pos + std::size_t(rows.pos[r]) * D;
        Real* out = ws.R_tab.data() + std::size_t(r) * D;
        for (int d = 0; d < D; ++d) out[d] = e[d] + pos[d];
    }
    const Real* c = ws.R_tab.data() + std::size_t(rows.eq_row) * D;
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
}

// The per-step tables of the fp32 path: the attention tables, then W_OI,
// W_OUh, W_OU, U_rest, UU_rest and the bases.
template <typename Real>
void tables_forward(const ModelShape& s, const ParamPtrs<Real>& p, Workspace<Real>& ws) {
    const TokenRows& rows = s.rows;
    const int D = s.D, H = s.H, Dh = s.Dh, HDh = s.HDh(), F = s.F, V = s.V;
    const Padded<Real> pd(s);
    const int Fp = pd.Fp, Vp = pd.Vp;
    attention_tables(s, p, ws);
    const Real* c = ws.R_tab.data() + std::size_t(rows.eq_row) * D;

    // The padding columns (F..Fp, V..Vp) of every table must be zero; the
    // GEMMs write only the first F or V columns, so clear them first.
    std::fill(ws.arena.data(), ws.arena.data() + ws.arena.size(), Real(0));
    for (int h = 0; h < H; ++h) {
        const Real* W_O = p.W_O + std::size_t(h) * Dh * D;
        gemm(Dh, F, D, W_O, D, 1, p.W_in, F, ws.W_OI.data() + std::size_t(h) * Dh * Fp, Fp, false);
        gemm(Dh, V, D, W_O, D, 1, p.W_U, V, ws.W_OUh.data() + std::size_t(h) * Dh * Vp, Vp, false);
    }
    // Rows op_row.. of V_tab (operator, y, =) into U_rest and UU_rest.
    for (int h = 0; h < H; ++h) {
        const Real* Vt = ws.Vt.data() + std::size_t(rows.op_row) * HDh + h * Dh;
        gemm(rows.rest(), Fp, Dh, Vt, HDh, 1, ws.W_OI.data() + std::size_t(h) * Dh * Fp, Fp,
             ws.U_rest + std::size_t(h) * Fp, std::ptrdiff_t(H) * Fp, false);
        gemm(rows.rest(), Vp, Dh, Vt, HDh, 1, ws.W_OUh.data() + std::size_t(h) * Dh * Vp, Vp,
             ws.UU_rest + std::size_t(h) * Vp, std::ptrdiff_t(H) * Vp, false);
    }
    gemm(F, V, D, p.W_out, D, 1, p.W_U, V, ws.W_OU, Vp, false);
    transpose(Fp, Vp, ws.W_OU, Vp, ws.W_OU_T, Fp);

    gemm(1, F, D, c, D, 1, p.W_in, F, ws.base_pre, Fp, false);
    for (int f = 0; f < F; ++f) ws.base_pre[f] += p.b_in[f];
    for (int d = 0; d < D; ++d) ws.c_bout.data()[d] = c[d] + p.b_out[d];
    gemm(1, V, D, ws.c_bout.data(), D, 1, p.W_U, V, ws.base_logit, Vp, false);
}

// out += sum_h a_x[h] * rows[h] + a_y[h] * rows[H + h] (the x and y
// positions, per head), in place; relu applied if asked. len is a multiple of
// the lane count. Eight accumulators in flight hide the FMA latency of the
// 2H-long chains.
template <bool Relu, typename Real>
void combine_rows(const Real* a_x, const Real* a_y, int H, const Real* const* rows, Real* out, int len) {
    using S = Simd<Real>;
    constexpr int L = S::L;
    int f = 0;
    for (; f + 8 * L <= len; f += 8 * L) {
        typename S::reg acc[8];
        for (int u = 0; u < 8; ++u) acc[u] = S::load(out + f + u * L);
        for (int j = 0; j < 2 * H; ++j) {
            const Real* row = rows[j] + f;
            const Real aj = j < H ? a_x[j] : a_y[j - H];
            for (int u = 0; u < 8; ++u) acc[u] += aj * S::load(row + u * L);
        }
        for (int u = 0; u < 8; ++u) S::store(out + f + u * L, Relu ? S::relu(acc[u]) : acc[u]);
    }
    for (; f < len; f += L) {
        auto acc = S::load(out + f);
        for (int j = 0; j < 2 * H; ++j) acc += (j < H ? a_x[j] : a_y[j - H]) * S::load(rows[j] + f);
        S::store(out + f, Relu ? S::relu(acc) : acc);
    }
}

// For the 2H rows of the x and y positions: da_x/da_y[h] += g . rows[j] and
// drows[j] += a * g, in one pass over g.
template <typename Real>
void dot_and_scatter(const Real* a_x, const Real* a_y, int H, const Real* const* rows, Real* const* drows,
                     const Real* g, int len, Real* da_x, Real* da_y) {
    using S = Simd<Real>;
    constexpr int JMAX = 16;  // dot accumulators kept in registers
    typename S::reg dots[JMAX];
    const int J = 2 * H;
    for (int j0 = 0; j0 < J; j0 += JMAX) {
        const int jn = std::min(JMAX, J - j0);
        Real a[JMAX];
        for (int j = 0; j < jn; ++j) a[j] = j0 + j < H ? a_x[j0 + j] : a_y[j0 + j - H];
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
            (jj < H ? da_x[jj] : da_y[jj - H]) += S::hsum(dots[j]);
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

// Where the rows of U and UU for the x position live: row x of the table is
// U_x + (x - x0) * H * Fp. Training keeps only the current x block there,
// evaluation the whole table (x0 = 0).
template <typename Real>
struct XRows {
    const Real* U_x;
    const Real* UU_x;
    int x0;
};

// A row that every example reads at the same position (the operator, =): its
// position and its index in the rest tables (U_rest, UU_rest and their
// gradients), in position order.
struct ConstRow {
    int pos;
    std::size_t rest;
};

std::array<ConstRow, 2> const_rows(const TokenRows& tr) {
    return {{{tr.pos_op, 0}, {tr.pos_eq, std::size_t(tr.eq_row - tr.op_row)}}};
}

// An example's token rows r (T) and attention weights a (T*H, index t * H +
// h): the softmax over the T positions of its scores in S (R, H), per head.
template <typename Real>
void attention_weights(int H, int T, const Real* S, const int* r, Real* a) {
    for (int t = 0; t < T; ++t)
        for (int h = 0; h < H; ++h) a[t * H + h] = S[r[t] * H + h];
    for (int h = 0; h < H; ++h) {
        Real smax = a[h];
        for (int t = 1; t < T; ++t) smax = std::max(smax, a[t * H + h]);
        for (int t = 0; t < T; ++t) a[t * H + h] -= smax;
    }
    exp_inplace(a, T * H);
    for (int h = 0; h < H; ++h) {
        Real sum = a[h];
        for (int t = 1; t < T; ++t) sum += a[t * H + h];
        for (int t = 0; t < T; ++t) a[t * H + h] /= sum;
    }
}

// An example's token row at each position: x, operator, y, = (rows: T).
inline void example_rows(const TokenRows& tr, int x, int y, int* r) {
    r[tr.pos_x] = x;  // the x rows come first: row x is element x
    r[tr.pos_op] = tr.op_row;
    r[tr.pos_y] = tr.first_y_row + y;
    r[tr.pos_eq] = tr.eq_row;
}

// The forward pass of `count` examples (xs, ys): their token rows (T per
// example) into rows, attention weights a (count, T*H), hidden = relu(pre)
// (count, Fp) and logits (count, Vp). Each example's values depend only on
// the example and the tables, never on its place in the tile.
template <typename Real>
void tile_forward(const ModelShape& s, const Workspace<Real>& ws, const XRows<Real>& x_rows,
                  const int32_t* xs, const int32_t* ys, int count, int* rows, Real* a_tile, Real* hidden,
                  Real* logits) {
    const TokenRows& tr = s.rows;
    const int H = s.H, T = s.T, J = s.J();
    const Padded<Real> pd(s);
    const int Fp = pd.Fp, Vp = pd.Vp;
    const std::size_t row_F = std::size_t(H) * Fp, row_V = std::size_t(H) * Vp;
    const Real* Sc = ws.S.data();
    for (int i = 0; i < count; ++i) {
        int* r = rows + std::size_t(i) * T;
        example_rows(tr, xs[i], ys[i], r);
        attention_weights(H, T, Sc, r, a_tile + std::size_t(i) * J);
        std::copy(ws.base_pre, ws.base_pre + Fp, hidden + std::size_t(i) * Fp);
        std::copy(ws.base_logit, ws.base_logit + Vp, logits + std::size_t(i) * Vp);
    }
    // The operator and = rows are the same in every example: one GEMM per
    // tile instead of 2H gathered rows per example.
    for (const ConstRow& c : const_rows(tr)) {
        gemm(count, Fp, H, a_tile + c.pos * H, J, 1, ws.U_rest + c.rest * row_F, Fp, hidden, Fp, true);
        gemm(count, Vp, H, a_tile + c.pos * H, J, 1, ws.UU_rest + c.rest * row_V, Vp, logits, Vp, true);
    }
    std::vector<const Real*> u_rows(2 * H), uu_rows(2 * H);
    for (int i = 0; i < count; ++i) {
        const int* r = rows + std::size_t(i) * T;
        const std::size_t ix = std::size_t(r[tr.pos_x] - x_rows.x0), iy = std::size_t(r[tr.pos_y] - tr.op_row);
        for (int h = 0; h < H; ++h) {
            u_rows[h] = x_rows.U_x + ix * row_F + h * Fp;
            uu_rows[h] = x_rows.UU_x + ix * row_V + h * Vp;
            u_rows[H + h] = ws.U_rest + iy * row_F + h * Fp;
            uu_rows[H + h] = ws.UU_rest + iy * row_V + h * Vp;
        }
        const Real* a = a_tile + std::size_t(i) * J;
        combine_rows<true>(a + tr.pos_x * H, a + tr.pos_y * H, H, u_rows.data(), hidden + std::size_t(i) * Fp, Fp);
        combine_rows<false>(a + tr.pos_x * H, a + tr.pos_y * H, H, uu_rows.data(), logits + std::size_t(i) * Vp, Vp);
    }
    gemm(count, Vp, Fp, hidden, Fp, 1, ws.W_OU, Vp, logits, Vp, true);
}

// U and UU of the x rows x0..x0+xn-1 of one model: (xn, H, Fp) and (xn, H, Vp).
template <typename Real>
void x_row_tables(const ModelShape& s, const Workspace<Real>& ws, int x0, int xn, Real* U_x, Real* UU_x) {
    const int H = s.H, Dh = s.Dh, HDh = s.HDh();
    const Padded<Real> pd(s);
    const int Fp = pd.Fp, Vp = pd.Vp;
    const Real* Vt_x = ws.Vt.data() + std::size_t(x0) * HDh;
    for (int h = 0; h < H; ++h) {
        gemm(xn, Fp, Dh, Vt_x + h * Dh, HDh, 1, ws.W_OI.data() + std::size_t(h) * Dh * Fp, Fp,
             U_x + std::size_t(h) * Fp, std::ptrdiff_t(H) * Fp, false);
        gemm(xn, Vp, Dh, Vt_x + h * Dh, HDh, 1, ws.W_OUh.data() + std::size_t(h) * Dh * Vp, Vp,
             UU_x + std::size_t(h) * Vp, std::ptrdiff_t(H) * Vp, false);
    }
}

// The phases of Engine::examples, per block of X_BLOCK x values and per tile
// of TILE examples within it:
//   block_tables     the block's x rows of U and UU; their gradients zeroed
//   tile_forward     attention weights, hidden and logits (above)
//   tile_loss        the loss and dlogits
//   tile_backward    gradients w.r.t. W_OU, the bases, the rows and the scores
//   block_gradients  the block's x-row gradients into V_tab, W_OI and W_OUh

template <typename Real>
void block_tables(const ModelShape& s, const Workspace<Real>& ws, int x0, int xn, TileScratch<Real>& tile) {
    const Padded<Real> pd(s);
    const std::size_t row_F = std::size_t(s.H) * pd.Fp, row_V = std::size_t(s.H) * pd.Vp;
    x_row_tables(s, ws, x0, xn, tile.U_x.data(), tile.UU_x.data());
    std::fill(tile.dU_x.data(), tile.dU_x.data() + xn * row_F, Real(0));
    std::fill(tile.dUU_x.data(), tile.dUU_x.data() + xn * row_V, Real(0));
}

// The weighted loss of `count` examples whose logits are in `logits`
// (count, Vp), replaced in place by weight * dloss/dlogits.
template <typename Real>
double tile_loss(const ModelShape& s, Real* logits, const int32_t* labels, int count, Real weight) {
    const int Vp = Padded<Real>(s).Vp;
    double loss = 0.0;
    for (int i = 0; i < count; ++i)
        loss += double(weight * loss_and_dlogits(logits + std::size_t(i) * Vp, s.V, Vp, labels[i], weight));
    return loss;
}

// The backward pass of a tile after tile_forward and tile_loss (dlogits in
// tile.logits): W_OU's gradient, dhidden through it, the bases' gradients,
// the rows' gradients (the rest rows into acc, the block's x rows into the
// tile's), and the scores' gradients into acc.dS.
template <typename Real>
void tile_backward(const ModelShape& s, const Workspace<Real>& ws, int x0, int count, TileScratch<Real>& tile,
                   ExampleGrads<Real>& acc) {
    using S = Simd<Real>;
    const TokenRows& tr = s.rows;
    const int H = s.H, T = s.T, J = s.J();
    const Padded<Real> pd(s);
    const int Fp = pd.Fp, Vp = pd.Vp;
    const std::size_t row_F = std::size_t(H) * Fp, row_V = std::size_t(H) * Vp;
    const Real* hidden = tile.hidden.data();
    const Real* dlogits = tile.logits.data();
    const Real* a_tile = tile.a.data();

    gemm(Fp, Vp, count, hidden, 1, Fp, dlogits, Vp, acc.dW_OU.data(), Vp, true);
    Real* dpre = tile.dhidden.data();
    gemm(count, Fp, Vp, dlogits, Vp, 1, ws.W_OU_T, Fp, dpre, Fp, false);
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
    add_column_sums(count, dlogits, Vp, acc.dbase_logit.data());
    Real* da = tile.da.data();
    for (const ConstRow& c : const_rows(tr)) {
        gemm_nt(count, H, Fp, dpre, Fp, ws.U_rest + c.rest * row_F, Fp, da + c.pos * H, J, false);
        gemm_nt(count, H, Vp, dlogits, Vp, ws.UU_rest + c.rest * row_V, Vp, da + c.pos * H, J, true);
        gemm(H, Fp, count, a_tile + c.pos * H, 1, J, dpre, Fp, acc.dU_rest.data() + c.rest * row_F, Fp, true);
        gemm(H, Vp, count, a_tile + c.pos * H, 1, J, dlogits, Vp, acc.dUU_rest.data() + c.rest * row_V, Vp, true);
    }
    // The x and y rows, example by example: the x rows in the block buffers,
    // the y rows in the rest tables.
    std::vector<const Real*> u_rows(2 * H), uu_rows(2 * H);
    std::vector<Real*> du_rows(2 * H), duu_rows(2 * H);
    Real* dS = acc.dS.data();
    for (int i = 0; i < count; ++i) {
        const int* r = tile.rows.data() + std::size_t(i) * T;
        const Real* a = a_tile + std::size_t(i) * J;
        Real* da_i = da + std::size_t(i) * J;
        const Real* g = dpre + std::size_t(i) * Fp;
        const Real* dlogits_i = dlogits + std::size_t(i) * Vp;
        const std::size_t ix = std::size_t(r[tr.pos_x] - x0), iy = std::size_t(r[tr.pos_y] - tr.op_row);
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
        Real* da_x = da_i + tr.pos_x * H;
        Real* da_y = da_i + tr.pos_y * H;
        std::fill(da_x, da_x + H, Real(0));
        std::fill(da_y, da_y + H, Real(0));
        dot_and_scatter(a + tr.pos_x * H, a + tr.pos_y * H, H, u_rows.data(), du_rows.data(), g, Fp, da_x, da_y);
        dot_and_scatter(a + tr.pos_x * H, a + tr.pos_y * H, H, uu_rows.data(), duu_rows.data(), dlogits_i, Vp,
                        da_x, da_y);
        // Softmax over the T positions, per head.
        for (int h = 0; h < H; ++h) {
            Real mean = 0;
            for (int t = 0; t < T; ++t) mean = fma_scalar(a[t * H + h], da_i[t * H + h], mean);
            for (int t = 0; t < T; ++t)
                dS[r[t] * H + h] = fma_scalar(a[t * H + h], da_i[t * H + h] - mean, dS[r[t] * H + h]);
        }
    }
}

template <typename Real>
void block_gradients(const ModelShape& s, const Workspace<Real>& ws, int x0, int xn, const TileScratch<Real>& tile,
                     ExampleGrads<Real>& acc) {
    const int H = s.H, Dh = s.Dh, HDh = s.HDh();
    const Padded<Real> pd(s);
    const int Fp = pd.Fp, Vp = pd.Vp;
    const std::size_t row_F = std::size_t(H) * Fp, row_V = std::size_t(H) * Vp;
    const Real* Vt_x = ws.Vt.data() + std::size_t(x0) * HDh;
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

// The direct path, per tile of DTILE examples (Engine::direct_model):
//   direct_forward   attention weights, z, then z @ W_O, the MLP and the
//                    unembedding, each product's operands rounded
//   tile_loss        the loss and dlogits (above)
//   direct_backward  the eight backward products, their operands rounded;
//                    then the scores' and values' gradients from dz

// C (+)= A @ B with the operands as precision p took them: hi @ hi (tf32,
// bf16); for bf16x3 the three products of bf16 operands a tensor core would
// compute, the small cross terms first so that they are not lost under the
// large one: hi_a @ lo_b, lo_a @ hi_b, hi_a @ hi_b (as the torch engine).
// A is read through strides as in gemm.
template <typename Real>
void product(Precision p, int m, int n, int k, const RoundedOperand<Real>& A, std::ptrdiff_t rsa,
             std::ptrdiff_t csa, const RoundedOperand<Real>& B, std::ptrdiff_t ldb, Real* C, std::ptrdiff_t ldc,
             bool accumulate) {
    if (p != Precision::bf16x3) return gemm(m, n, k, A.hi.data(), rsa, csa, B.hi.data(), ldb, C, ldc, accumulate);
    gemm(m, n, k, A.hi.data(), rsa, csa, B.lo.data(), ldb, C, ldc, accumulate);
    gemm(m, n, k, A.lo.data(), rsa, csa, B.hi.data(), ldb, C, ldc, true);
    gemm(m, n, k, A.hi.data(), rsa, csa, B.hi.data(), ldb, C, ldc, true);
}

// sums[0:len] += sum over rows i < count of X[i, 0:len] (rows at ld).
template <typename Real>
void column_sums(int count, const Real* X, std::ptrdiff_t ld, int len, Real* sums) {
    for (int i = 0; i < count; ++i)
        for (int f = 0; f < len; ++f) sums[f] += X[i * ld + f];
}

// Forward of `count` examples (xs, ys) into the tile: rows, a, z, resid_mid,
// hidden, resid_fin and the logits (count, Vp), as the batched engine's
// examples_forward; the rounded operands stay for the backward. An example's
// values depend only on the example and the model.
template <typename Real>
void direct_forward(const ModelShape& s, const ParamPtrs<Real>& p, const Workspace<Real>& ws,
                    const DirectWeights<Real>& w, Precision prec, const int32_t* xs, const int32_t* ys, int count,
                    DirectTile<Real>& t) {
    using S = Simd<Real>;
    const TokenRows& tr = s.rows;
    const int D = s.D, H = s.H, Dh = s.Dh, HDh = s.HDh(), T = s.T, J = s.J(), F = s.F;
    const Padded<Real> pd(s);
    const int Fp = pd.Fp, Vp = pd.Vp;
    const Real* c = ws.R_tab.data() + std::size_t(tr.eq_row) * D;
    // z = sum_t a_t v_t, summed in the batched engine's order: x, y, operator, =.
    const int order[4] = {tr.pos_x, tr.pos_y, tr.pos_op, tr.pos_eq};
    for (int i = 0; i < count; ++i) {
        int* r = t.rows.data() + std::size_t(i) * T;
        example_rows(tr, xs[i], ys[i], r);
        Real* a = t.a.data() + std::size_t(i) * J;
        attention_weights(H, T, ws.S.data(), r, a);
        Real* z = t.z.data() + std::size_t(i) * HDh;
        for (int h = 0; h < H; ++h) {
            const Real* v[4];
            Real at[4];
            for (int k = 0; k < 4; ++k) {
                v[k] = ws.Vt.data() + std::size_t(r[order[k]]) * HDh + h * Dh;
                at[k] = a[order[k] * H + h];
            }
            Real* zh = z + h * Dh;
            for (int e = 0; e < Dh; ++e)
                zh[e] = fma_scalar(at[3], v[3][e],
                                   fma_scalar(at[2], v[2][e], fma_scalar(at[1], v[1][e], at[0] * v[0][e])));
        }
        std::copy(c, c + D, t.resid_mid.data() + std::size_t(i) * D);
        Real* hidden = t.hidden.data() + std::size_t(i) * Fp;
        std::copy(p.b_in, p.b_in + F, hidden);
        std::fill(hidden + F, hidden + Fp, Real(0));  // a NaN there must not outlive this tile
        std::copy(p.b_out, p.b_out + D, t.resid_fin.data() + std::size_t(i) * D);
    }
    const std::size_t nD = std::size_t(count) * D, nF = std::size_t(count) * Fp;
    t.z_r.take(prec, t.z.data(), std::size_t(count) * HDh);
    product(prec, count, D, HDh, t.z_r, HDh, 1, w.W_O, D, t.resid_mid.data(), D, true);  // c + z @ W_O
    t.resid_mid_r.take(prec, t.resid_mid.data(), nD);
    product(prec, count, Fp, D, t.resid_mid_r, D, 1, w.W_in, Fp, t.hidden.data(), Fp, true);
    Real* hidden = t.hidden.data();
    for (std::size_t f = 0; f < nF; f += S::L) S::store(hidden + f, S::relu(S::load(hidden + f)));
    t.hidden_r.take(prec, hidden, nF);
    product(prec, count, D, Fp, t.hidden_r, Fp, 1, w.W_out, D, t.resid_fin.data(), D, true);
    Real* resid_fin = t.resid_fin.data();
    const Real* resid_mid = t.resid_mid.data();
    for (std::size_t d = 0; d < nD; ++d) resid_fin[d] += resid_mid[d];
    t.resid_fin_r.take(prec, resid_fin, nD);
    product(prec, count, Vp, D, t.resid_fin_r, D, 1, w.W_U, Vp, t.logits.data(), Vp, false);
}

// Backward of the tile after direct_forward and tile_loss (dlogits in
// t.logits), as the batched engine's examples_backward: dW_U, dW_in, the
// biases, the = row's residual and the scores' and values' gradients into
// acc, dW_out and dW_O into the model's gradient row g.
template <typename Real>
void direct_backward(const ModelShape& s, const Workspace<Real>& ws, const DirectWeights<Real>& w, Precision prec,
                     int count, DirectTile<Real>& t, DirectGrads<Real>& acc, const ParamPtrs<Real>& g) {
    using S = Simd<Real>;
    const int D = s.D, H = s.H, Dh = s.Dh, HDh = s.HDh(), T = s.T, J = s.J(), F = s.F;
    const Padded<Real> pd(s);
    const int Fp = pd.Fp, Vp = pd.Vp;
    const std::size_t nD = std::size_t(count) * D, nF = std::size_t(count) * Fp;
    Real* dresid = t.dresid.data();
    Real* dpre = t.dpre.data();

    // Unembedding and MLP.
    t.dlogits_r.take(prec, t.logits.data(), std::size_t(count) * Vp);
    product(prec, D, Vp, count, t.resid_fin_r, 1, D, t.dlogits_r, Vp, acc.dW_U.data(), Vp, true);
    product(prec, count, D, Vp, t.dlogits_r, Vp, 1, w.W_U_T, D, dresid, D, false);
    column_sums(count, dresid, D, D, acc.db_out.data());
    t.dresid_r.take(prec, dresid, nD);
    product(prec, F, D, count, t.hidden_r, 1, Fp, t.dresid_r, D, g.W_out, D, true);
    product(prec, count, Fp, D, t.dresid_r, D, 1, w.W_out_T, Fp, dpre, Fp, false);
    const Real* hidden = t.hidden.data();
    // relu': hidden > 0 (a NaN hidden blocks its gradient, as torch's threshold_backward).
    for (std::size_t f = 0; f < nF; f += S::L)
        S::store(dpre + f, S::load(hidden + f) > Real(0) ? S::load(dpre + f) : S::zero());
    column_sums(count, dpre, Fp, Fp, acc.db_in.data());
    t.dpre_r.take(prec, dpre, nF);
    product(prec, D, Fp, count, t.resid_mid_r, 1, D, t.dpre_r, Fp, acc.dW_in.data(), Fp, true);
    product(prec, count, D, Fp, t.dpre_r, Fp, 1, w.W_in_T, D, dresid, D, true);  // d resid_mid
    column_sums(count, dresid, D, D, acc.dc.data());

    // Attention output: resid_mid = c + z @ W_O.
    t.dresid_r.take(prec, dresid, nD);
    product(prec, HDh, D, count, t.z_r, 1, HDh, t.dresid_r, D, g.W_O, D, true);
    product(prec, count, HDh, D, t.dresid_r, D, 1, w.W_O_T, HDh, t.dz.data(), HDh, false);

    // z = sum_t a_t v_t over the four positions, then the softmax, per head;
    // the gradients land on the example's token rows.
    Real* dS = acc.dS.data();
    for (int i = 0; i < count; ++i) {
        const int* r = t.rows.data() + std::size_t(i) * T;
        const Real* a = t.a.data() + std::size_t(i) * J;
        const Real* dz = t.dz.data() + std::size_t(i) * HDh;
        for (int h = 0; h < H; ++h) {
            const Real* v[4];
            Real* dv[4];
            for (int k = 0; k < 4; ++k) {
                v[k] = ws.Vt.data() + std::size_t(r[k]) * HDh + h * Dh;
                dv[k] = acc.dVt.data() + std::size_t(r[k]) * HDh + h * Dh;
            }
            const Real* dzh = dz + h * Dh;
            Real da[4] = {0, 0, 0, 0};
            for (int e = 0; e < Dh; ++e)
                for (int k = 0; k < 4; ++k) da[k] = fma_scalar(dzh[e], v[k][e], da[k]);
            Real mean = 0;
            for (int k = 0; k < 4; ++k) mean = fma_scalar(a[k * H + h], da[k], mean);
            for (int k = 0; k < 4; ++k) {
                dS[r[k] * H + h] = fma_scalar(a[k * H + h], da[k] - mean, dS[r[k] * H + h]);
                const Real ak = a[k * H + h];
                for (int e = 0; e < Dh; ++e) dv[k][e] = fma_scalar(ak, dzh[e], dv[k][e]);
            }
        }
    }
}

}  // namespace

template <typename Real>
Engine<Real>::Engine(const ModelShape& shape, const ParamLayout& layout, const TrainingSet& data,
                     Precision precision)
    : shape_(shape), layout_(layout), data_(data), precision_(precision) {}

template <typename Real>
Engine<Real>::~Engine() = default;

template <typename Real>
void Engine<Real>::examples(int m, int block_begin, int block_end, const Workspace<Real>& ws,
                            ExampleGrads<Real>& acc, TileScratch<Real>& tile) const {
    const Real weight = Real(1.0 / double(data_.x[m].size()));
    const int32_t* xs = data_.x[m].data();
    const int32_t* ys = data_.y[m].data();
    const int32_t* labels = data_.labels[m].data();
    for (int b = block_begin; b < block_end; ++b) {
        const int begin = data_.block_start[m][b], end = data_.block_start[m][b + 1];
        if (begin == end) continue;
        const int x0 = b * X_BLOCK, xn = std::min(X_BLOCK, shape_.n - x0);
        block_tables(shape_, ws, x0, xn, tile);
        for (int i0 = begin; i0 < end; i0 += TILE) {
            const int count = std::min(TILE, end - i0);
            tile_forward(shape_, ws, XRows<Real>{tile.U_x.data(), tile.UU_x.data(), x0}, xs + i0, ys + i0, count,
                         tile.rows.data(), tile.a.data(), tile.hidden.data(), tile.logits.data());
            acc.loss += tile_loss(shape_, tile.logits.data(), labels + i0, count, weight);
            tile_backward(shape_, ws, x0, count, tile, acc);
        }
        block_gradients(shape_, ws, x0, xn, tile, acc);
    }
}

namespace {

// Gradients of W_E, W_pos, W_Q, W_K and W_V from those of the scaled scores
// dS (R, H), the values dVt (R, H*Dh) and the = row's residual dc (D), which
// reaches it through the residual connection. Both paths.
template <typename Real>
void attention_tables_backward(const ModelShape& s, const ParamPtrs<Real>& p, Workspace<Real>& ws,
                               const Real* dS, const Real* dVt, const Real* dc, const ParamPtrs<Real>& g) {
    const TokenRows& rows = s.rows;
    const int R = s.R(), D = s.D, H = s.H, Dh = s.Dh, HDh = s.HDh(), V = s.V;
    const Real* c = ws.R_tab.data() + std::size_t(rows.eq_row) * D;

    // Scores S = K q / sqrt(Dh), K = R_tab W_K, V_tab = R_tab W_V, q = c W_Q.
    const Real scale = Real(1.0 / std::sqrt(double(Dh)));
    std::fill(ws.dq, ws.dq + HDh, Real(0));
    for (int r = 0; r < R; ++r)
        for (int h = 0; h < H; ++h) {
            const Real ds = dS[r * H + h] * scale;
            const Real* k = ws.K.data() + std::size_t(r) * HDh + h * Dh;
            const Real* q = ws.q.data() + h * Dh;
            Real* dk = ws.dK + std::size_t(r) * HDh + h * Dh;
            Real* dq = ws.dq + h * Dh;
            for (int e = 0; e < Dh; ++e) {
                dk[e] = ds * q[e];
                dq[e] += ds * k[e];
            }
        }
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
        gemm(1, D, Dh, ws.dq + h * Dh, Dh, 1, ws.small_T, D, ws.dR + std::size_t(rows.eq_row) * D, D, true);
    }
    Real* dR_eq = ws.dR + std::size_t(rows.eq_row) * D;
    for (int d = 0; d < D; ++d) dR_eq[d] += dc[d];

    // Rows back onto the embeddings: W_E[token(r)] and W_pos[pos(r)].
    std::fill(g.W_E, g.W_E + std::size_t(V) * D, Real(0));
    std::fill(g.W_pos, g.W_pos + std::size_t(s.T) * D, Real(0));
    for (int r = 0; r < R; ++r) {
        const Real* dr = ws.dR + std::size_t(r) * D;
        Real* ge = g.W_E + std::size_t(rows.token[r]) * D;
        Real* gp = g.W_pos + std::size_t(rows.pos[r]) * D;
        for (int d = 0; d < D; ++d) {
            ge[d] += dr[d];
            gp[d] += dr[d];
        }
    }
}

// The fp32 path's per-step backward: the rows' gradients through U_rest,
// UU_rest and the block sums, through W_OI, W_OUh, W_OU and the bases to W_O,
// W_in, W_out, W_U and their biases, then the attention tables.
template <typename Real>
void tables_backward(const ModelShape& s, const ParamPtrs<Real>& p, Workspace<Real>& ws,
                     ExampleGrads<Real>& acc, const ParamPtrs<Real>& g) {
    const TokenRows& rows = s.rows;
    const int D = s.D, H = s.H, Dh = s.Dh, HDh = s.HDh(), F = s.F, V = s.V, rest = rows.rest();
    const Padded<Real> pd(s);
    const int Fp = pd.Fp, Vp = pd.Vp;
    const Real* c = ws.R_tab.data() + std::size_t(rows.eq_row) * D;

    // Rows op_row.. of V_tab through U_rest = V_tab W_OI and UU_rest = V_tab W_OUh.
    for (int h = 0; h < H; ++h) {
        const Real* W_OI = ws.W_OI.data() + std::size_t(h) * Dh * Fp;
        const Real* W_OUh = ws.W_OUh.data() + std::size_t(h) * Dh * Vp;
        const Real* dU = acc.dU_rest.data() + std::size_t(h) * Fp;
        const Real* dUU = acc.dUU_rest.data() + std::size_t(h) * Vp;
        const Real* Vt = ws.Vt.data() + std::size_t(rows.op_row) * HDh + h * Dh;
        Real* dVt = acc.dVt.data() + std::size_t(rows.op_row) * HDh + h * Dh;
        gemm_nt(rest, Dh, Fp, dU, std::ptrdiff_t(H) * Fp, W_OI, Fp, dVt, HDh, false);
        gemm_nt(rest, Dh, Vp, dUU, std::ptrdiff_t(H) * Vp, W_OUh, Vp, dVt, HDh, true);
        gemm(Dh, Fp, rest, Vt, 1, HDh, dU, std::ptrdiff_t(H) * Fp, acc.dW_OI.data() + std::size_t(h) * Dh * Fp, Fp, true);
        gemm(Dh, Vp, rest, Vt, 1, HDh, dUU, std::ptrdiff_t(H) * Vp, acc.dW_OUh.data() + std::size_t(h) * Dh * Vp, Vp, true);
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
    attention_tables_backward(s, p, ws, acc.dS.data(), acc.dVt.data(), ws.dc, g);
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
void Engine<Real>::direct_model(int m, Real* params, Real* grads, Workspace<Real>& ws, DirectWeights<Real>& w,
                                DirectTile<Real>& tile, DirectGrads<Real>& acc) const {
    const ModelShape& s = shape_;
    const int D = s.D, HDh = s.HDh(), F = s.F, V = s.V;
    const Padded<Real> pd(s);
    const std::size_t off = std::size_t(m) * layout_.P;
    const ParamPtrs<Real> p(params + off, layout_), g(grads + off, layout_);
    attention_tables(s, p, ws);
    w.prepare(s, p, precision_);
    acc.zero();
    std::fill(g.W_O, g.W_O + std::size_t(HDh) * D, Real(0));
    std::fill(g.W_out, g.W_out + std::size_t(F) * D, Real(0));
    const int n = int(data_.x[m].size());
    const Real weight = Real(1.0 / double(n));
    const int32_t* xs = data_.x[m].data();
    const int32_t* ys = data_.y[m].data();
    const int32_t* labels = data_.labels[m].data();
    for (int i0 = 0; i0 < n; i0 += tile.size) {
        const int count = std::min(tile.size, n - i0);
        direct_forward(s, p, ws, w, precision_, xs + i0, ys + i0, count, tile);
        acc.loss += tile_loss(s, tile.logits.data(), labels + i0, count, weight);
        direct_backward(s, ws, w, precision_, count, tile, acc, g);
    }
    for (int d = 0; d < D; ++d) {
        std::copy(acc.dW_in.data() + std::size_t(d) * pd.Fp, acc.dW_in.data() + std::size_t(d) * pd.Fp + F,
                  g.W_in + std::size_t(d) * F);
        std::copy(acc.dW_U.data() + std::size_t(d) * pd.Vp, acc.dW_U.data() + std::size_t(d) * pd.Vp + V,
                  g.W_U + std::size_t(d) * V);
    }
    std::copy(acc.db_in.data(), acc.db_in.data() + F, g.b_in);
    std::copy(acc.db_out.data(), acc.db_out.data() + D, g.b_out);
    attention_tables_backward(s, p, ws, acc.dS.data(), acc.dVt.data(), acc.dc.data(), g);
}

template <typename Real>
void Engine<Real>::finish_model(int m, Real* params, Real* grads, Real* exp_avg, Real* exp_avg_sq,
                                const AdamWArgs* adamw_args, ExampleGrads<Real>& acc,
                                Workspace<Real>& ws, StepOutput out) const {
    const std::size_t P = layout_.P, off = std::size_t(m) * P;
    tables_backward(shape_, ParamPtrs<Real>(params + off, layout_), ws, acc, ParamPtrs<Real>(grads + off, layout_));
    update_model(m, params, grads, exp_avg, exp_avg_sq, adamw_args, acc.loss, out);
}

template <typename Real>
void Engine<Real>::update_model(int m, Real* params, Real* grads, Real* exp_avg, Real* exp_avg_sq,
                                const AdamWArgs* adamw_args, double loss, StepOutput out) const {
    const std::size_t P = layout_.P, off = std::size_t(m) * P;
    // g - g is 0 for every finite g and NaN otherwise: one vectorisable pass.
    Real nonfinite = 0;
    const Real* g = grads + off;
    for (std::size_t i = 0; i < P; ++i) nonfinite += g[i] - g[i];
    const bool finite = std::isfinite(loss) && nonfinite == Real(0);
    out.loss[m] = loss;
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
    // One thread per model at a time: more threads than models would idle.
    const int threads = std::max(1, std::min(n_threads, M));
#else
    const int threads = 1;
    (void)n_threads;
#endif
    const std::size_t P = layout_.P;
    const bool direct = precision_ != Precision::fp32;
    while (int(workspaces_.size()) < threads)
        workspaces_.push_back(std::make_unique<Workspace<Real>>(shape_, !direct));
    if (direct) {
        while (int(direct_weights_.size()) < threads)
            direct_weights_.push_back(std::make_unique<DirectWeights<Real>>(shape_, precision_));
        while (int(direct_tiles_.size()) < threads)
            direct_tiles_.push_back(std::make_unique<DirectTile<Real>>(shape_, precision_, direct_tile(precision_)));
        while (int(direct_grads_.size()) < threads)
            direct_grads_.push_back(std::make_unique<DirectGrads<Real>>(shape_));
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (int m = 0; m < M; ++m) {
            const int tid = thread_id();
            DirectGrads<Real>& acc = *direct_grads_[tid];
            direct_model(m, params, grads, *workspaces_[tid], *direct_weights_[tid], *direct_tiles_[tid], acc);
            update_model(m, params, grads, exp_avg, exp_avg_sq, adamw_args, acc.loss, out);
        }
        return;
    }
    while (int(accumulators_.size()) < threads) accumulators_.push_back(std::make_unique<ExampleGrads<Real>>(shape_));
    while (int(tiles_.size()) < threads) tiles_.push_back(std::make_unique<TileScratch<Real>>(shape_));
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int m = 0; m < M; ++m) {
        const int tid = thread_id();
        Workspace<Real>& ws = *workspaces_[tid];
        ExampleGrads<Real>& acc = *accumulators_[tid];
        tables_forward(shape_, ParamPtrs<Real>(params + std::size_t(m) * P, layout_), ws);
        acc.zero();
        examples(m, 0, data_.blocks(), ws, acc, *tiles_[tid]);
        finish_model(m, params, grads, exp_avg, exp_avg_sq, adamw_args, acc, ws, out);
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
    const bool direct = precision_ != Precision::fp32;
    while (int(workspaces_.size()) < chunk) workspaces_.push_back(std::make_unique<Workspace<Real>>(shape_, !direct));
    if (direct) {
        while (int(direct_weights_.size()) < chunk)
            direct_weights_.push_back(std::make_unique<DirectWeights<Real>>(shape_, precision_));
        while (int(direct_tiles_.size()) < threads)
            direct_tiles_.push_back(std::make_unique<DirectTile<Real>>(shape_, precision_, direct_tile(precision_)));
        const int DTILE = direct_tile(precision_), dtiles = (N + DTILE - 1) / DTILE;
        for (int c0 = 0; c0 < n_models; c0 += chunk) {
            const int count = std::min(chunk, n_models - c0);
#pragma omp parallel num_threads(threads)
            {
#pragma omp for schedule(dynamic, 1)
                for (int k = 0; k < count; ++k) {
                    const ParamPtrs<Real> p(const_cast<Real*>(params) + std::size_t(models[c0 + k]) * P, layout_);
                    attention_tables(s, p, *workspaces_[k]);
                    direct_weights_[k]->prepare(s, p, precision_);
                }
#pragma omp for schedule(dynamic, 1)
                for (int item = 0; item < count * dtiles; ++item) {
                    const int k = item / dtiles, i0 = (item % dtiles) * DTILE, n_ex = std::min(DTILE, N - i0);
                    DirectTile<Real>& tile = *direct_tiles_[thread_id()];
                    const ParamPtrs<Real> p(const_cast<Real*>(params) + std::size_t(models[c0 + k]) * P, layout_);
                    direct_forward(s, p, *workspaces_[k], *direct_weights_[k], precision_, x + i0, y + i0, n_ex, tile);
                    Real* dst = out + (std::size_t(c0 + k) * N + i0) * V;
                    for (int i = 0; i < n_ex; ++i)
                        std::copy(tile.logits.data() + std::size_t(i) * Vp,
                                  tile.logits.data() + std::size_t(i) * Vp + V, dst + std::size_t(i) * V);
                }
            }
        }
        return;
    }
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
                x_row_tables(s, *workspaces_[k], 0, s.n, eval_x_rows_[k]->U.data(), eval_x_rows_[k]->UU.data());
            }
#pragma omp for schedule(dynamic, 1)
            for (int item = 0; item < count * tiles; ++item) {
                const int k = item / tiles, i0 = (item % tiles) * TILE, n_ex = std::min(TILE, N - i0);
                TileScratch<Real>& tile = *tiles_[thread_id()];
                const XRows<Real> x_rows{eval_x_rows_[k]->U.data(), eval_x_rows_[k]->UU.data(), 0};
                tile_forward(s, *workspaces_[k], x_rows, x + i0, y + i0, n_ex, tile.rows.data(),
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
