// The fused CPU training step of a population of 1-layer transformers.
//
// The same function as fastgrok/backends/torch_engine.py (the batched PyTorch
// engine): loss at the last position only, keys/values/scores tabulated per
// (token, position) row, stable log-softmax with the correct-class gradient
// -(sum of the other probabilities), AdamW with per-model lr and weight decay.
// It computes that function exactly with less arithmetic, using that the MLP
// input is linear in the attention weights (engine.cpp: the derivation, the
// costs).
//
// Dimensions: M models, N example slots, T positions (n_ctx), R token rows,
// D d_model, H heads, Dh d_head, F d_mlp, V d_vocab, P parameters per model;
// Fp and Vp are F and V rounded up to the vector width so that every row of
// the internal F- and V-wide tables is a whole number of vector registers.
// n_train is a model's training-set size (D is d_model).
//
// The engine derives neither the parameter layout nor the token rows: both
// come from fastgrok/layout.py through the binding, and the constructors
// below check that they have the structure the algorithm relies on.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "precision.hpp"

namespace fastgrok {

// fastgrok/layout.py's TokenRows: row r of the per-step tables holds token[r]
// at position pos[r]. The algorithm relies on their order -- the n x rows
// first (row x is element x, so the x rows are cut into blocks by x), then
// the operator row, the n y rows and the = row contiguous (one "rest" table
// of R - op_row rows, indexed from op_row) -- and on the = row sitting at the
// last position, where the loss is read. The constructor checks all of it and
// names the first value that breaks it (std::invalid_argument).
struct TokenRows {
    TokenRows(int n, int d_vocab, int n_ctx, std::vector<int64_t> token, std::vector<int64_t> pos, int op_row,
              int first_y_row, int eq_row);
    std::vector<int> token, pos;  // (R,)
    int op_row, first_y_row, eq_row;
    int pos_x, pos_op, pos_y, pos_eq;  // the position of each kind of row

    int R() const { return static_cast<int>(token.size()); }
    int rest() const { return R() - op_row; }  // rows op_row..R-1: the operator, y and = rows
};

struct ModelShape {
    ModelShape(int n, int d_vocab, int d_model, int n_heads, int d_head, int d_mlp, int n_ctx, TokenRows rows);
    int n;   // task elements
    int V, D, H, Dh, F, T;
    TokenRows rows;

    int R() const { return rows.R(); }
    int HDh() const { return H * Dh; }
    int J() const { return T * H; }  // attention weights per example: T positions x H heads
};

// Offsets of each parameter in a model's flat row, in PARAM_NAMES order, and
// P: fastgrok/layout.py's ParamLayout as received. The constructor checks
// that they are contiguous from 0 and that each size is its shape's
// (offsets: COUNT + 1 values, the last one P).
struct ParamLayout {
    static constexpr int COUNT = 11;
    ParamLayout(const ModelShape& s, const std::vector<int64_t>& offsets);
    std::size_t W_E, W_pos, W_Q, W_K, W_V, W_O, W_in, b_in, W_out, b_out, W_U, P;
};

// Every model's training examples, sorted by (x, y) and cut into blocks of
// X_BLOCK consecutive x values: a block's x rows of the per-step tables are
// built, used and turned into gradients while they sit in L1/L2.
struct TrainingSet {
    static constexpr int X_BLOCK = 8;
    // x, y, labels: (M, N) row-major; train_size: (M,). Model m trains on its
    // first n_train = train_size[m] slots; the rest is padding and never read.
    TrainingSet(const ModelShape& shape, int M, int N, const int64_t* x, const int64_t* y,
                const int64_t* labels, const int64_t* train_size);
    int M;
    std::vector<std::vector<int32_t>> x, y, labels;  // per model, sorted
    std::vector<std::vector<int>> block_start;       // per model, (blocks + 1) offsets
    int blocks() const { return static_cast<int>(block_start[0].size()) - 1; }
};

struct AdamWArgs {
    const double* lr;            // (M,) learning rate of this step (warm-up applied)
    const double* weight_decay;  // (M,)
    const uint8_t* frozen;       // (M,) 1 = a frozen model: gradients computed, no update
    int64_t step;                // 1-based optimiser step for the bias corrections
    double beta1, beta2, eps;
};

struct StepOutput {
    double* loss;      // (M,) mean training loss
    uint8_t* finite;   // (M,) 1 if the loss and every gradient are finite
};

template <typename Real> struct Workspace;
template <typename Real> struct ExampleGrads;
template <typename Real> struct TileScratch;
template <typename Real> struct XRowTables;
template <typename Real> struct DirectWeights;
template <typename Real> struct DirectTile;
template <typename Real> struct DirectGrads;

// precision: how the per-example products with W_O, W_in, W_out and W_U take
// their operands (precision.hpp). fp32 computes the function through the
// rewrite of engine.cpp, in which those products do not exist; every other mode
// computes them directly, as the batched engine does (engine.cpp, "The
// direct path").
template <typename Real>
class Engine {
  public:
    Engine(const ModelShape& shape, const ParamLayout& layout, const TrainingSet& data,
           Precision precision = Precision::fp32);
    ~Engine();

    // Loss and gradients of every model into grads (M, P); with adamw set, an
    // AdamW update of params, exp_avg and exp_avg_sq for each model that is
    // neither frozen nor non-finite. All state arrays are (M, P) row-major.
    void step(Real* params, Real* grads, Real* exp_avg, Real* exp_avg_sq, const AdamWArgs* adamw,
              int n_threads, StepOutput out);

    // Last-position logits of the given models on N examples (x, y): out is
    // (n_models, N, V) row-major. No training state changes; a model's logits
    // do not depend on the thread count or on the other models listed.
    void logits(const Real* params, const int64_t* models, int n_models, const int32_t* x, const int32_t* y,
                int N, Real* out, int n_threads);

  private:
    ModelShape shape_;
    ParamLayout layout_;
    const TrainingSet& data_;
    Precision precision_;
    std::vector<std::unique_ptr<Workspace<Real>>> workspaces_;
    // Example-gradient sums, one per thread.
    std::vector<std::unique_ptr<ExampleGrads<Real>>> accumulators_;
    std::vector<std::unique_ptr<TileScratch<Real>>> tiles_;
    std::vector<std::unique_ptr<XRowTables<Real>>> eval_x_rows_;  // every x row of U and UU, for logits()
    // The direct path (precision other than fp32): rounded weights per
    // workspace, activations and example-gradient sums per thread.
    std::vector<std::unique_ptr<DirectWeights<Real>>> direct_weights_;
    std::vector<std::unique_ptr<DirectTile<Real>>> direct_tiles_;
    std::vector<std::unique_ptr<DirectGrads<Real>>> direct_grads_;

    // The examples of model m in x blocks block_begin..block_end-1: loss and
    // gradients w.r.t. the per-step tables into acc.
    void examples(int m, int block_begin, int block_end, const Workspace<Real>& ws,
                  ExampleGrads<Real>& acc, TileScratch<Real>& tile) const;
    void finish_model(int m, Real* params, Real* grads, Real* exp_avg, Real* exp_avg_sq,
                      const AdamWArgs* adamw, ExampleGrads<Real>& acc, Workspace<Real>& ws,
                      StepOutput out) const;
    // The finite check and AdamW of model m, its gradients and loss complete.
    void update_model(int m, Real* params, Real* grads, Real* exp_avg, Real* exp_avg_sq,
                      const AdamWArgs* adamw, double loss, StepOutput out) const;
    // Model m's whole step on the direct path, from its tables to grads.
    void direct_model(int m, Real* params, Real* grads, Workspace<Real>& ws, DirectWeights<Real>& w,
                      DirectTile<Real>& tile, DirectGrads<Real>& acc) const;
};

extern template class Engine<float>;
extern template class Engine<double>;

}  // namespace fastgrok
