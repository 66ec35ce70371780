// The fused CPU engine: one training step of a population, model by model.
//
// Algorithm (notation of fastgrok/engine.py; t indexes the 4 positions, r_t
// the token row an example reads there, a[t, h] its attention weights at the
// last position, c = W_E[=] + W_pos[3]).
//
// The MLP input and the logits are linear in the attention weights:
//   pre    = c @ W_in + b_in        + sum_{t,h} a[t,h] U[r_t, h]
//   logits = (c + b_out) @ W_U      + sum_{t,h} a[t,h] UU[r_t, h] + relu(pre) @ W_OU
// with per-step tables U[r, h] = V_tab[r, h] @ (W_O[h] @ W_in) (R x H x F),
// UU[r, h] = V_tab[r, h] @ (W_O[h] @ W_U) (R x H x V) and W_OU = W_out @ W_U
// (F x V). So an example costs 4H gathered rows of U and UU and one F x V
// product forward, instead of the H*Dh*D + 2*D*F + D*V multiply-adds of
// z @ W_O, the two MLP layers and the unembedding.
//
// Backward per example, with dlogits from the loss:
//   dW_OU += relu(pre)^T dlogits;  dpre = (dlogits @ W_OU^T) * [pre > 0]
//   da[t,h] = dpre . U[r_t,h] + dlogits . UU[r_t,h]
//   dU[r_t,h] += a[t,h] dpre;  dUU[r_t,h] += a[t,h] dlogits
//   dS[r_t,h] += softmax backward of da
// and per step the chain rule back through the table products to W_O, W_in,
// W_out, W_U, V_tab, then the key/value/query tables as in the batched engine.
//
// Multiply-adds at the paper config (p = 113, D = 128, H = 4, Dh = 32,
// F = 512, V = 115): per example 3*F*V + 4*4H*F + 4*4H*V ~ 0.21 M (the
// batched engine: 3*(H*Dh*D + 2*D*F + D*V) ~ 0.49 M); per model and step
// ~ 95 M for the tables (three H*Dh*D*F and three R*H*Dh*F products, three
// F*D*V ones, the key/value tables). At D = 2000 a model-step is ~1.0 GFLOP
// against the batched engine's ~2.0.
//
// Examples are processed in tiles of TILE so the tile's activations (hidden,
// dhidden, logits: TILE * (2 Fp + Vp) floats, 216 KB at the paper config)
// stay in L2 next to W_OU; the gathered table rows are re-read from L2.
//
// Threads: with M >= threads every thread steps whole models, one at a time,
// with its own workspace, so a model's tables stay in that core's caches from
// the forward to AdamW. With fewer models than threads each model's examples
// are split into shards with their own gradient accumulators, summed in shard
// order afterwards; the result then depends on the number of shards (not on
// scheduling), which is max(1, ceil(threads / M)).
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

// Examples per tile: a multiple of MR so the logits GEMM has no ragged rows.
constexpr int TILE = 4 * MR;

void transpose(int rows, int cols, const float* src, std::ptrdiff_t lds, float* dst,
               std::ptrdiff_t ldd) {
    for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j) dst[j * ldd + i] = src[i * lds + j];
}

struct ParamPtrs {
    const float *W_E, *W_pos, *W_Q, *W_K, *W_V, *W_O, *W_in, *b_in, *W_out, *b_out, *W_U;
    ParamPtrs(const float* base, const ParamLayout& L)
        : W_E(base + L.W_E), W_pos(base + L.W_pos), W_Q(base + L.W_Q), W_K(base + L.W_K),
          W_V(base + L.W_V), W_O(base + L.W_O), W_in(base + L.W_in), b_in(base + L.b_in),
          W_out(base + L.W_out), b_out(base + L.b_out), W_U(base + L.W_U) {}
};

struct GradPtrs {
    float *W_E, *W_pos, *W_Q, *W_K, *W_V, *W_O, *W_in, *b_in, *W_out, *b_out, *W_U;
    GradPtrs(float* base, const ParamLayout& L)
        : W_E(base + L.W_E), W_pos(base + L.W_pos), W_Q(base + L.W_Q), W_K(base + L.W_K),
          W_V(base + L.W_V), W_O(base + L.W_O), W_in(base + L.W_in), b_in(base + L.b_in),
          W_out(base + L.W_out), b_out(base + L.b_out), W_U(base + L.W_U) {}
};

}  // namespace

int ModelShape::Fp() const { return static_cast<int>(round_up(F, NR)); }
int ModelShape::Vp() const { return static_cast<int>(round_up(V, NR)); }

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

Buffer::Buffer(std::size_t count) : size_(count) {
    const std::size_t bytes = round_up(std::max<std::size_t>(count, 1) * sizeof(float), 64);
    void* p = std::aligned_alloc(64, bytes);
    if (p == nullptr) throw std::bad_alloc();
    data_.reset(static_cast<float*>(p));
    zero();
}

void Buffer::Free::operator()(float* p) const { std::free(p); }

void Buffer::zero() { std::fill(data_.get(), data_.get() + size_, 0.0f); }

// Per-step, per-model quantities derived from the parameters.
struct Tables {
    Buffer R_tab;      // (R, D) residual stream of every (token, position) row
    Buffer K, Vt;      // (R, H*Dh) keys and values
    Buffer q;          // (H*Dh) query of the last position
    Buffer S;          // (R, H) scaled scores of the last position
    Buffer W_OI;       // (H, Dh, Fp) W_O[h] @ W_in
    Buffer W_OUh;      // (H, Dh, Vp) W_O[h] @ W_U
    Buffer W_OU;       // (Fp, Vp) W_out @ W_U
    Buffer W_OU_T;     // (Vp, Fp)
    Buffer U;          // (R, H, Fp) V_tab[r, h] @ W_OI[h]
    Buffer UU;         // (R, H, Vp) V_tab[r, h] @ W_OUh[h]
    Buffer base_pre;   // (Fp) c @ W_in + b_in
    Buffer c_bout;     // (D) c + b_out
    Buffer base_logit; // (Vp) (c + b_out) @ W_U

    explicit Tables(const ModelShape& s)
        : R_tab(s.R() * s.D), K(s.R() * s.HDh()), Vt(s.R() * s.HDh()), q(s.HDh()),
          S(s.R() * s.H), W_OI(s.HDh() * s.Fp()), W_OUh(s.HDh() * s.Vp()),
          W_OU(s.Fp() * s.Vp()), W_OU_T(s.Vp() * s.Fp()), U(std::size_t(s.R()) * s.H * s.Fp()),
          UU(std::size_t(s.R()) * s.H * s.Vp()), base_pre(s.Fp()), c_bout(s.D),
          base_logit(s.Vp()) {}
};

// Gradients w.r.t. the per-step tables, summed over a range of examples.
struct ExampleGrads {
    Buffer dU;          // (R, H, Fp)
    Buffer dUU;         // (R, H, Vp)
    Buffer dW_OU;       // (Fp, Vp)
    Buffer dS;          // (R, H) w.r.t. the scaled scores
    Buffer dbase_pre;   // (Fp)
    Buffer dbase_logit; // (Vp)
    double loss = 0.0;  // sum of weighted example losses

    explicit ExampleGrads(const ModelShape& s)
        : dU(std::size_t(s.R()) * s.H * s.Fp()), dUU(std::size_t(s.R()) * s.H * s.Vp()),
          dW_OU(s.Fp() * s.Vp()), dS(s.R() * s.H), dbase_pre(s.Fp()), dbase_logit(s.Vp()) {}

    void zero() {
        for (Buffer* b : {&dU, &dUU, &dW_OU, &dS, &dbase_pre, &dbase_logit}) b->zero();
        loss = 0.0;
    }

    void add(const ExampleGrads& other) {
        for (auto [dst, src] : {std::pair{&dU, &other.dU}, std::pair{&dUU, &other.dUU},
                                std::pair{&dW_OU, &other.dW_OU}, std::pair{&dS, &other.dS},
                                std::pair{&dbase_pre, &other.dbase_pre},
                                std::pair{&dbase_logit, &other.dbase_logit}}) {
            float* d = dst->data();
            const float* s = src->data();
            for (std::size_t i = 0; i < dst->size(); ++i) d[i] += s[i];
        }
        loss += other.loss;
    }
};

// Activations of one tile of examples.
struct TileScratch {
    Buffer a;        // (TILE, 4H) attention weights, index t * H + h
    Buffer hidden;   // (TILE, Fp) relu(pre); hidden > 0 is the relu mask
    Buffer logits;   // (TILE, Vp) logits, then dlogits in place
    Buffer dhidden;  // (TILE, Fp)
    std::vector<int32_t> rows;  // (TILE, 4) token row read at each position

    explicit TileScratch(const ModelShape& s)
        : a(TILE * s.J()), hidden(TILE * s.Fp()), logits(TILE * s.Vp()),
          dhidden(TILE * s.Fp()), rows(TILE * 4) {}
};

// Intermediate gradients of the per-step backward.
struct BackwardScratch {
    Buffer dVt, dK;       // (R, H*Dh)
    Buffer dq;            // (H*Dh)
    Buffer dR;            // (R, D)
    Buffer dc;            // (D)
    Buffer dW_OI;         // (H, Dh, Fp)
    Buffer dW_OUh;        // (H, Dh, Vp)
    Buffer head_T;        // (max(Fp, Vp, D), Dh) a transposed per-head matrix
    Buffer W_in_T;        // (F, D)
    Buffer W_U_T;         // (V, D)

    explicit BackwardScratch(const ModelShape& s)
        : dVt(s.R() * s.HDh()), dK(s.R() * s.HDh()), dq(s.HDh()), dR(s.R() * s.D), dc(s.D),
          dW_OI(s.HDh() * s.Fp()), dW_OUh(s.HDh() * s.Vp()),
          head_T(std::max({s.Fp(), s.Vp(), s.D}) * s.Dh), W_in_T(s.F * s.D),
          W_U_T(s.V * s.D) {}
};

struct Engine::Workspace {
    Tables tables;
    ExampleGrads grads;
    BackwardScratch backward;
    explicit Workspace(const ModelShape& s) : tables(s), grads(s), backward(s) {}
};

std::size_t workspace_bytes(const ModelShape& s) {
    const std::size_t R = s.R(), H = s.H, Fp = s.Fp(), Vp = s.Vp(), D = s.D, HDh = s.HDh();
    const std::size_t tables = R * D + 3 * R * HDh + HDh + R * H + HDh * (Fp + Vp) + 2 * Fp * Vp +
                               R * H * (Fp + Vp) + Fp + D + Vp;
    const std::size_t grads = R * H * (Fp + Vp) + Fp * Vp + R * H + Fp + Vp;
    const std::size_t backward = 2 * R * HDh + HDh + R * D + D + HDh * (Fp + Vp) +
                                 std::max({Fp, Vp, D}) * s.Dh + 2 * std::size_t(s.F + s.V) * D;
    return sizeof(float) * (tables + grads + backward);
}

namespace {

// Row r of the token table: element r at position 0 (r < n), the operator at
// position 1 (r = n), element r - n - 1 at position 2, = at position 3.
inline int row_token(int r, int n) { return r < n ? r : (r == n ? n : (r <= 2 * n ? r - n - 1 : n + 1)); }
inline int row_pos(int r, int n) { return r < n ? 0 : (r == n ? 1 : (r <= 2 * n ? 2 : 3)); }

void tables_forward(const ModelShape& s, const ParamPtrs& p, Tables& tb) {
    const int R = s.R(), D = s.D, H = s.H, Dh = s.Dh, HDh = s.HDh(), F = s.F, V = s.V;
    const int Fp = s.Fp(), Vp = s.Vp();
    for (int r = 0; r < R; ++r) {
        const float* e = p.W_E + std::size_t(row_token(r, s.n)) * D;
        const float* pos = p.W_pos + std::size_t(row_pos(r, s.n)) * D;
        float* out = tb.R_tab.data() + std::size_t(r) * D;
        for (int d = 0; d < D; ++d) out[d] = e[d] + pos[d];
    }
    const float* c = tb.R_tab.data() + std::size_t(R - 1) * D;
    for (int h = 0; h < H; ++h) {
        const std::size_t w = std::size_t(h) * D * Dh;
        gemm(R, Dh, D, tb.R_tab.data(), D, 1, p.W_K + w, Dh, tb.K.data() + h * Dh, HDh, false);
        gemm(R, Dh, D, tb.R_tab.data(), D, 1, p.W_V + w, Dh, tb.Vt.data() + h * Dh, HDh, false);
        gemm(1, Dh, D, c, D, 1, p.W_Q + w, Dh, tb.q.data() + h * Dh, HDh, false);
    }
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(Dh)));
    for (int r = 0; r < R; ++r)
        for (int h = 0; h < H; ++h) {
            const float* k = tb.K.data() + std::size_t(r) * HDh + h * Dh;
            const float* q = tb.q.data() + h * Dh;
            float dot = 0.0f;
            for (int e = 0; e < Dh; ++e) dot += k[e] * q[e];
            tb.S.data()[r * H + h] = dot * scale;
        }

    // Padding columns (F..Fp, V..Vp) of every table stay zero from allocation:
    // the GEMMs below write only the first F or V columns.
    for (int h = 0; h < H; ++h) {
        const float* W_O = p.W_O + std::size_t(h) * Dh * D;
        gemm(Dh, F, D, W_O, D, 1, p.W_in, F, tb.W_OI.data() + std::size_t(h) * Dh * Fp, Fp, false);
        gemm(Dh, V, D, W_O, D, 1, p.W_U, V, tb.W_OUh.data() + std::size_t(h) * Dh * Vp, Vp, false);
    }
    for (int h = 0; h < H; ++h) {
        gemm(R, Fp, Dh, tb.Vt.data() + h * Dh, HDh, 1, tb.W_OI.data() + std::size_t(h) * Dh * Fp,
             Fp, tb.U.data() + std::size_t(h) * Fp, std::ptrdiff_t(H) * Fp, false);
        gemm(R, Vp, Dh, tb.Vt.data() + h * Dh, HDh, 1, tb.W_OUh.data() + std::size_t(h) * Dh * Vp,
             Vp, tb.UU.data() + std::size_t(h) * Vp, std::ptrdiff_t(H) * Vp, false);
    }
    gemm(F, V, D, p.W_out, D, 1, p.W_U, V, tb.W_OU.data(), Vp, false);
    transpose(Fp, Vp, tb.W_OU.data(), Vp, tb.W_OU_T.data(), Fp);

    gemm(1, F, D, c, D, 1, p.W_in, F, tb.base_pre.data(), Fp, false);
    for (int f = 0; f < F; ++f) tb.base_pre.data()[f] += p.b_in[f];
    for (int d = 0; d < D; ++d) tb.c_bout.data()[d] = c[d] + p.b_out[d];
    gemm(1, V, D, tb.c_bout.data(), D, 1, p.W_U, V, tb.base_logit.data(), Vp, false);
}

// out = base + sum_j a[j] * rows[j], len a multiple of VL; relu applied if asked.
// Eight accumulators in flight hide the FMA latency of the 4H-long chains.
template <bool Relu>
inline void combine_rows(int J, const float* a, const float* const* rows, const float* base,
                         float* out, int len) {
    int f = 0;
    for (; f + 8 * VL <= len; f += 8 * VL) {
        vreg acc[8];
        for (int u = 0; u < 8; ++u) acc[u] = load(base + f + u * VL);
        for (int j = 0; j < J; ++j) {
            const float* row = rows[j] + f;
            const float aj = a[j];
            for (int u = 0; u < 8; ++u) acc[u] += aj * load(row + u * VL);
        }
        for (int u = 0; u < 8; ++u) store(out + f + u * VL, Relu ? relu(acc[u]) : acc[u]);
    }
    for (; f < len; f += VL) {
        vreg acc = load(base + f);
        for (int j = 0; j < J; ++j) acc += a[j] * load(rows[j] + f);
        store(out + f, Relu ? relu(acc) : acc);
    }
}

// For each j: da[j] += g . rows[j];  drows[j] += a[j] * g.  One pass over g.
inline void dot_and_scatter(int J, const float* a, const float* const* rows, float* const* drows,
                            const float* g, int len, float* da) {
    constexpr int JMAX = 64;
    vreg dots[JMAX];
    for (int j0 = 0; j0 < J; j0 += JMAX) {
        const int jn = std::min(JMAX, J - j0);
        for (int j = 0; j < jn; ++j) dots[j] = vreg{};
        for (int f = 0; f < len; f += VL) {
            const vreg gf = load(g + f);
            for (int j = 0; j < jn; ++j) {
                dots[j] += gf * load(rows[j0 + j] + f);
                float* dr = drows[j0 + j] + f;
                store(dr, load(dr) + a[j0 + j] * gf);
            }
        }
        for (int j = 0; j < jn; ++j) da[j0 + j] += hsum(dots[j]);
    }
}

// Per-example cross-entropy of logits[0:V] against label, in the stable form
// of fastgrok/model.py; writes weight * dloss/dlogits over logits[0:Vp]
// (zero on the padding) and returns the unweighted loss.
inline float loss_and_dlogits(float* z, int V, int Vp, int label, float weight) {
    float zmax = z[0];
    for (int v = 1; v < V; ++v) zmax = std::max(zmax, z[v]);
    const float zy = z[label] - zmax;
    for (int v = 0; v < V; ++v) z[v] -= zmax;
    exp_inplace(z, V);
    const float ey = z[label];
    z[label] = 0.0f;
    float other = 0.0f;
    for (int v = 0; v < V; ++v) other += z[v];
    const float total = other + ey;
    const float loss = zy == 0.0f ? std::log1p(other) : std::log(total) - zy;
    for (int v = 0; v < V; ++v) z[v] = z[v] / total * weight;
    z[label] = -other / total * weight;
    for (int v = V; v < Vp; ++v) z[v] = 0.0f;
    // max() above skips NaN logits; make sure a NaN anywhere reaches the loss.
    return std::isnan(zmax) ? zmax : loss;
}

}  // namespace

Engine::Engine(const ModelShape& shape, int M, int N, const int64_t* x, const int64_t* y,
               const int64_t* labels, const int64_t* train_size)
    : shape_(shape), layout_(shape), M_(M), x_(M), y_(M), labels_(M) {
    const int n = shape.n;
    for (int m = 0; m < M; ++m) {
        const int64_t D = train_size[m];
        if (D < 1 || D > N)
            throw std::invalid_argument("train_size[" + std::to_string(m) + "]=" + std::to_string(D) +
                                        ": must be in 1.." + std::to_string(N));
        const int64_t* xm = x + std::size_t(m) * N;
        const int64_t* ym = y + std::size_t(m) * N;
        const int64_t* lm = labels + std::size_t(m) * N;
        for (int64_t i = 0; i < D; ++i) {
            if (xm[i] < 0 || xm[i] >= n || ym[i] < 0 || ym[i] >= n || lm[i] < 0 || lm[i] >= shape.V)
                throw std::invalid_argument(
                    "model " + std::to_string(m) + " example " + std::to_string(i) + ": (x, y, label) = (" +
                    std::to_string(xm[i]) + ", " + std::to_string(ym[i]) + ", " + std::to_string(lm[i]) +
                    ") must have x, y in 0.." + std::to_string(n - 1) + " and label in 0.." +
                    std::to_string(shape.V - 1));
        }
        std::vector<int64_t> order(D);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) {
            return xm[i] != xm[j] ? xm[i] < xm[j] : ym[i] < ym[j];
        });
        for (int64_t i : order) {
            x_[m].push_back(static_cast<int32_t>(xm[i]));
            y_[m].push_back(static_cast<int32_t>(ym[i]));
            labels_[m].push_back(static_cast<int32_t>(lm[i]));
        }
    }
}

Engine::~Engine() = default;

std::size_t Engine::scratch_bytes() const {
    const ModelShape& s = shape_;
    const std::size_t R = s.R(), H = s.H, Fp = s.Fp(), Vp = s.Vp();
    const std::size_t grads = sizeof(float) * (R * H * (Fp + Vp) + Fp * Vp + R * H + Fp + Vp);
    const std::size_t tile = sizeof(float) * TILE * (s.J() + 2 * Fp + Vp) + sizeof(int32_t) * TILE * 4;
    return workspaces_.size() * workspace_bytes(s) + shard_grads_.size() * grads + tiles_.size() * tile;
}

void Engine::examples(const float* params, const Tables& tb, int m, int begin, int end,
                      ExampleGrads& acc, TileScratch& tile) const {
    const ModelShape& s = shape_;
    const int n = s.n, H = s.H, J = s.J(), V = s.V, Fp = s.Fp(), Vp = s.Vp();
    (void)params;
    const float weight = static_cast<float>(1.0 / static_cast<double>(x_[m].size()));
    const int32_t* xs = x_[m].data();
    const int32_t* ys = y_[m].data();
    const int32_t* labels = labels_[m].data();
    const float* U = tb.U.data();
    const float* UU = tb.UU.data();
    const float* S = tb.S.data();
    float* dU = acc.dU.data();
    float* dUU = acc.dUU.data();
    float* dS = acc.dS.data();
    std::vector<const float*> u_rows(J), uu_rows(J);
    std::vector<float*> du_rows(J), duu_rows(J);
    std::vector<float> da(J);

    for (int i0 = begin; i0 < end; i0 += TILE) {
        const int count = std::min(TILE, end - i0);
        // Forward up to the hidden layer; logits get their table part.
        for (int i = 0; i < count; ++i) {
            int* r = tile.rows.data() + 4 * i;
            r[0] = xs[i0 + i];
            r[1] = n;
            r[2] = n + 1 + ys[i0 + i];
            r[3] = 2 * n + 1;
            float* a = tile.a.data() + std::size_t(i) * J;
            for (int t = 0; t < 4; ++t)
                for (int h = 0; h < H; ++h) a[t * H + h] = S[r[t] * H + h];
            for (int h = 0; h < H; ++h) {
                float smax = a[h];
                for (int t = 1; t < 4; ++t) smax = std::max(smax, a[t * H + h]);
                for (int t = 0; t < 4; ++t) a[t * H + h] -= smax;
            }
            exp_inplace(a, J);
            for (int h = 0; h < H; ++h) {
                const float sum = a[h] + a[H + h] + a[2 * H + h] + a[3 * H + h];
                for (int t = 0; t < 4; ++t) a[t * H + h] /= sum;
            }
            for (int t = 0; t < 4; ++t)
                for (int h = 0; h < H; ++h) {
                    const std::size_t row = std::size_t(r[t]) * H + h;
                    u_rows[t * H + h] = U + row * Fp;
                    uu_rows[t * H + h] = UU + row * Vp;
                }
            combine_rows<true>(J, a, u_rows.data(), tb.base_pre.data(),
                               tile.hidden.data() + std::size_t(i) * Fp, Fp);
            combine_rows<false>(J, a, uu_rows.data(), tb.base_logit.data(),
                                tile.logits.data() + std::size_t(i) * Vp, Vp);
        }
        gemm(count, Vp, Fp, tile.hidden.data(), Fp, 1, tb.W_OU.data(), Vp, tile.logits.data(), Vp, true);

        float tile_loss = 0.0f;
        for (int i = 0; i < count; ++i)
            tile_loss += weight * loss_and_dlogits(tile.logits.data() + std::size_t(i) * Vp, V, Vp,
                                                   labels[i0 + i], weight);
        acc.loss += tile_loss;

        // Backward: W_OU's gradient, then dhidden through it.
        gemm(Fp, Vp, count, tile.hidden.data(), 1, Fp, tile.logits.data(), Vp, acc.dW_OU.data(), Vp, true);
        gemm(count, Fp, Vp, tile.logits.data(), Vp, 1, tb.W_OU_T.data(), Fp, tile.dhidden.data(), Fp, false);

        for (int i = 0; i < count; ++i) {
            const int* r = tile.rows.data() + 4 * i;
            const float* a = tile.a.data() + std::size_t(i) * J;
            const float* hidden = tile.hidden.data() + std::size_t(i) * Fp;
            float* dpre = tile.dhidden.data() + std::size_t(i) * Fp;
            const float* dlogits = tile.logits.data() + std::size_t(i) * Vp;
            for (int f = 0; f < Fp; f += VL) {
                const vreg g = load(hidden + f) > 0.0f ? load(dpre + f) : vreg{};
                store(dpre + f, g);
                store(acc.dbase_pre.data() + f, load(acc.dbase_pre.data() + f) + g);
            }
            for (int v = 0; v < Vp; v += VL)
                store(acc.dbase_logit.data() + v, load(acc.dbase_logit.data() + v) + load(dlogits + v));
            for (int t = 0; t < 4; ++t)
                for (int h = 0; h < H; ++h) {
                    const std::size_t row = std::size_t(r[t]) * H + h;
                    u_rows[t * H + h] = U + row * Fp;
                    uu_rows[t * H + h] = UU + row * Vp;
                    du_rows[t * H + h] = dU + row * Fp;
                    duu_rows[t * H + h] = dUU + row * Vp;
                }
            std::fill(da.begin(), da.end(), 0.0f);
            dot_and_scatter(J, a, u_rows.data(), du_rows.data(), dpre, Fp, da.data());
            dot_and_scatter(J, a, uu_rows.data(), duu_rows.data(), dlogits, Vp, da.data());
            // Softmax over the 4 positions, per head.
            for (int h = 0; h < H; ++h) {
                float mean = 0.0f;
                for (int t = 0; t < 4; ++t) mean += a[t * H + h] * da[t * H + h];
                for (int t = 0; t < 4; ++t) dS[r[t] * H + h] += a[t * H + h] * (da[t * H + h] - mean);
            }
        }
    }
}

namespace {

void tables_backward(const ModelShape& s, const ParamPtrs& p, const Tables& tb,
                     const ExampleGrads& acc, BackwardScratch& bw, const GradPtrs& g) {
    const int R = s.R(), D = s.D, H = s.H, Dh = s.Dh, HDh = s.HDh(), F = s.F, V = s.V;
    const int Fp = s.Fp(), Vp = s.Vp();
    const float* c = tb.R_tab.data() + std::size_t(R - 1) * D;

    // Through U = V_tab W_OI and UU = V_tab W_OUh.
    for (int h = 0; h < H; ++h) {
        const float* W_OI = tb.W_OI.data() + std::size_t(h) * Dh * Fp;
        const float* W_OUh = tb.W_OUh.data() + std::size_t(h) * Dh * Vp;
        const float* dU = acc.dU.data() + std::size_t(h) * Fp;
        const float* dUU = acc.dUU.data() + std::size_t(h) * Vp;
        const float* Vt = tb.Vt.data() + h * Dh;
        transpose(Dh, Fp, W_OI, Fp, bw.head_T.data(), Dh);
        gemm(R, Dh, Fp, dU, std::ptrdiff_t(H) * Fp, 1, bw.head_T.data(), Dh, bw.dVt.data() + h * Dh, HDh, false);
        transpose(Dh, Vp, W_OUh, Vp, bw.head_T.data(), Dh);
        gemm(R, Dh, Vp, dUU, std::ptrdiff_t(H) * Vp, 1, bw.head_T.data(), Dh, bw.dVt.data() + h * Dh, HDh, true);
        gemm(Dh, Fp, R, Vt, 1, HDh, dU, std::ptrdiff_t(H) * Fp, bw.dW_OI.data() + std::size_t(h) * Dh * Fp, Fp, false);
        gemm(Dh, Vp, R, Vt, 1, HDh, dUU, std::ptrdiff_t(H) * Vp, bw.dW_OUh.data() + std::size_t(h) * Dh * Vp, Vp, false);
    }

    // Through W_OI = W_O W_in, W_OUh = W_O W_U, W_OU = W_out W_U and the bases.
    transpose(D, F, p.W_in, F, bw.W_in_T.data(), D);
    transpose(D, V, p.W_U, V, bw.W_U_T.data(), D);
    for (int h = 0; h < H; ++h) {
        float* gW_O = g.W_O + std::size_t(h) * Dh * D;
        gemm(Dh, D, F, bw.dW_OI.data() + std::size_t(h) * Dh * Fp, Fp, 1, bw.W_in_T.data(), D, gW_O, D, false);
        gemm(Dh, D, V, bw.dW_OUh.data() + std::size_t(h) * Dh * Vp, Vp, 1, bw.W_U_T.data(), D, gW_O, D, true);
        const float* W_O = p.W_O + std::size_t(h) * Dh * D;
        gemm(D, F, Dh, W_O, 1, D, bw.dW_OI.data() + std::size_t(h) * Dh * Fp, Fp, g.W_in, F, h > 0);
        gemm(D, V, Dh, W_O, 1, D, bw.dW_OUh.data() + std::size_t(h) * Dh * Vp, Vp, g.W_U, V, h > 0);
    }
    gemm(D, F, 1, c, 1, 1, acc.dbase_pre.data(), Fp, g.W_in, F, true);
    std::copy(acc.dbase_pre.data(), acc.dbase_pre.data() + F, g.b_in);
    gemm(D, V, F, p.W_out, 1, D, acc.dW_OU.data(), Vp, g.W_U, V, true);
    gemm(D, V, 1, tb.c_bout.data(), 1, 1, acc.dbase_logit.data(), Vp, g.W_U, V, true);
    gemm(F, D, V, acc.dW_OU.data(), Vp, 1, bw.W_U_T.data(), D, g.W_out, D, false);
    // b_out and c receive dlogits @ W_U^T summed over examples; c also dpre @ W_in^T.
    gemm(1, D, V, acc.dbase_logit.data(), Vp, 1, bw.W_U_T.data(), D, g.b_out, D, false);
    gemm(1, D, F, acc.dbase_pre.data(), Fp, 1, bw.W_in_T.data(), D, bw.dc.data(), D, false);
    for (int d = 0; d < D; ++d) bw.dc.data()[d] += g.b_out[d];

    // Scores S = K q / sqrt(Dh), K = R_tab W_K, V_tab = R_tab W_V, q = c W_Q.
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(Dh)));
    std::fill(bw.dq.data(), bw.dq.data() + HDh, 0.0f);
    for (int r = 0; r < R; ++r)
        for (int h = 0; h < H; ++h) {
            const float ds = acc.dS.data()[r * H + h] * scale;
            const float* k = tb.K.data() + std::size_t(r) * HDh + h * Dh;
            const float* q = tb.q.data() + h * Dh;
            float* dk = bw.dK.data() + std::size_t(r) * HDh + h * Dh;
            float* dq = bw.dq.data() + h * Dh;
            for (int e = 0; e < Dh; ++e) {
                dk[e] = ds * q[e];
                dq[e] += ds * k[e];
            }
        }
    for (int h = 0; h < H; ++h) {
        const std::size_t w = std::size_t(h) * D * Dh;
        gemm(D, Dh, R, tb.R_tab.data(), 1, D, bw.dK.data() + h * Dh, HDh, g.W_K + w, Dh, false);
        gemm(D, Dh, R, tb.R_tab.data(), 1, D, bw.dVt.data() + h * Dh, HDh, g.W_V + w, Dh, false);
        gemm(D, Dh, 1, c, 1, 1, bw.dq.data() + h * Dh, Dh, g.W_Q + w, Dh, false);
        transpose(D, Dh, p.W_K + w, Dh, bw.head_T.data(), D);
        gemm(R, D, Dh, bw.dK.data() + h * Dh, HDh, 1, bw.head_T.data(), D, bw.dR.data(), D, h > 0);
        transpose(D, Dh, p.W_V + w, Dh, bw.head_T.data(), D);
        gemm(R, D, Dh, bw.dVt.data() + h * Dh, HDh, 1, bw.head_T.data(), D, bw.dR.data(), D, true);
        transpose(D, Dh, p.W_Q + w, Dh, bw.head_T.data(), D);
        gemm(1, D, Dh, bw.dq.data() + h * Dh, Dh, 1, bw.head_T.data(), D, bw.dR.data() + std::size_t(R - 1) * D, D, true);
    }
    float* dR_eq = bw.dR.data() + std::size_t(R - 1) * D;
    for (int d = 0; d < D; ++d) dR_eq[d] += bw.dc.data()[d];

    // Rows back onto the embeddings: W_E[token(r)] and W_pos[pos(r)].
    std::fill(g.W_E, g.W_E + std::size_t(V) * D, 0.0f);
    std::fill(g.W_pos, g.W_pos + std::size_t(4) * D, 0.0f);
    for (int r = 0; r < R; ++r) {
        const float* dr = bw.dR.data() + std::size_t(r) * D;
        float* ge = g.W_E + std::size_t(row_token(r, s.n)) * D;
        float* gp = g.W_pos + std::size_t(row_pos(r, s.n)) * D;
        for (int d = 0; d < D; ++d) {
            ge[d] += dr[d];
            gp[d] += dr[d];
        }
    }
}

// torch.optim.AdamW's update (decoupled decay, bias corrections) of one model.
void adamw(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, std::size_t P,
           double lr, double weight_decay, const AdamWArgs& a) {
    const double bias_correction1 = 1.0 - std::pow(a.beta1, static_cast<double>(a.step));
    const double bias_correction2 = 1.0 - std::pow(a.beta2, static_cast<double>(a.step));
    const float decay = static_cast<float>(1.0 - lr * weight_decay);
    const float one_minus_b1 = static_cast<float>(1.0 - a.beta1);
    const float b2 = static_cast<float>(a.beta2), one_minus_b2 = static_cast<float>(1.0 - a.beta2);
    const float step_size = static_cast<float>(lr / bias_correction1);
    const float bc2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
    const float eps = static_cast<float>(a.eps);
    for (std::size_t i = 0; i < P; ++i) {
        const float g = grad[i];
        const float m = exp_avg[i] + one_minus_b1 * (g - exp_avg[i]);
        const float v = exp_avg_sq[i] * b2 + one_minus_b2 * g * g;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        const float denom = std::sqrt(v) / bc2_sqrt + eps;
        param[i] = param[i] * decay - step_size * (m / denom);
    }
}

}  // namespace

void Engine::finish_model(int m, float* params, float* grads, float* exp_avg, float* exp_avg_sq,
                          const AdamWArgs* adamw_args, const ExampleGrads& acc, Workspace& ws,
                          StepOutput out) const {
    const std::size_t P = layout_.P, off = std::size_t(m) * P;
    tables_backward(shape_, ParamPtrs(params + off, layout_), ws.tables, acc, ws.backward,
                    GradPtrs(grads + off, layout_));
    const float loss = static_cast<float>(acc.loss);
    // g - g is 0 for every finite g and NaN otherwise: one vectorisable pass.
    float nonfinite = 0.0f;
    const float* g = grads + off;
    for (std::size_t i = 0; i < P; ++i) nonfinite += g[i] - g[i];
    const bool finite = std::isfinite(loss) && nonfinite == 0.0f;
    out.loss[m] = loss;
    out.finite[m] = finite;
    if (adamw_args != nullptr && finite && !adamw_args->frozen[m])
        adamw(params + off, grads + off, exp_avg + off, exp_avg_sq + off, P, adamw_args->lr[m],
              adamw_args->weight_decay[m], *adamw_args);
}

void Engine::step(float* params, float* grads, float* exp_avg, float* exp_avg_sq,
                  const AdamWArgs* adamw_args, int n_threads, StepOutput out) {
    const int M = M_;
#ifdef _OPENMP
    const int threads = std::max(1, n_threads);
#else
    const int threads = 1;
    (void)n_threads;
#endif
    const std::size_t P = layout_.P;

    if (M >= threads) {
        // Whole models per thread.
        while (int(workspaces_.size()) < threads) workspaces_.push_back(std::make_unique<Workspace>(shape_));
        while (int(tiles_.size()) < threads) tiles_.push_back(std::make_unique<TileScratch>(shape_));
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (int m = 0; m < M; ++m) {
#ifdef _OPENMP
            const int tid = omp_get_thread_num();
#else
            const int tid = 0;
#endif
            Workspace& ws = *workspaces_[tid];
            const ParamPtrs p(params + std::size_t(m) * P, layout_);
            tables_forward(shape_, p, ws.tables);
            ws.grads.zero();
            examples(params + std::size_t(m) * P, ws.tables, m, 0, int(x_[m].size()), ws.grads, *tiles_[tid]);
            finish_model(m, params, grads, exp_avg, exp_avg_sq, adamw_args, ws.grads, ws, out);
        }
        return;
    }

    // Fewer models than threads: shards of examples per model.
    const int shards = (threads + M - 1) / M;
    while (int(workspaces_.size()) < M) workspaces_.push_back(std::make_unique<Workspace>(shape_));
    while (int(shard_grads_.size()) < M * (shards - 1))
        shard_grads_.push_back(std::make_unique<ExampleGrads>(shape_));
    while (int(tiles_.size()) < threads) tiles_.push_back(std::make_unique<TileScratch>(shape_));
    auto shard_acc = [&](int m, int s) -> ExampleGrads& {
        return s == 0 ? workspaces_[m]->grads : *shard_grads_[std::size_t(m) * (shards - 1) + s - 1];
    };
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num();
#else
        const int tid = 0;
#endif
#pragma omp for schedule(dynamic, 1)
        for (int m = 0; m < M; ++m)
            tables_forward(shape_, ParamPtrs(params + std::size_t(m) * P, layout_), workspaces_[m]->tables);
#pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < M * shards; ++item) {
            const int m = item / shards, s = item % shards;
            const int D = int(x_[m].size());
            // Shard boundaries on tile multiples keep the tiles full.
            const int tiles = (D + TILE - 1) / TILE;
            const int begin = std::min(D, tiles * s / shards * TILE);
            const int end = std::min(D, tiles * (s + 1) / shards * TILE);
            ExampleGrads& acc = shard_acc(m, s);
            acc.zero();
            examples(params + std::size_t(m) * P, workspaces_[m]->tables, m, begin, end, acc, *tiles_[tid]);
        }
#pragma omp for schedule(dynamic, 1)
        for (int m = 0; m < M; ++m) {
            ExampleGrads& acc = shard_acc(m, 0);
            for (int s = 1; s < shards; ++s) acc.add(shard_acc(m, s));
            finish_model(m, params, grads, exp_avg, exp_avg_sq, adamw_args, acc, *workspaces_[m], out);
        }
    }
}

}  // namespace fastgrok
