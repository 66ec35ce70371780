// The fused CPU training step of a population of 1-layer transformers.
//
// The same function as fastgrok/engine.py (the batched PyTorch engine): loss
// at the last position only, keys/values/scores tabulated per (token,
// position) row, stable log-softmax with the correct-class gradient
// -(sum of the other probabilities), AdamW with per-model lr and weight decay.
// It does exactly less arithmetic by using that the MLP input is linear in
// the attention weights (see engine.cpp for the derivation and the costs).
//
// Dimensions: M models, N example slots, R = 2n + 2 token rows, D d_model,
// H heads, Dh d_head, F d_mlp, V d_vocab, P parameters per model; Fp and Vp
// are F and V rounded up to the vector width so that every row of the
// internal F- and V-wide tables is a whole number of vector registers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace fastgrok {

struct ModelShape {
    int n;   // task elements; tokens n (operator) and n + 1 (=) follow
    int V, D, H, Dh, F;

    int R() const { return 2 * n + 2; }
    int HDh() const { return H * Dh; }
    int J() const { return 4 * H; }  // attention weights per example: 4 positions x H heads
};

// Offsets of each parameter in a model's flat vector, in PARAM_NAMES order.
struct ParamLayout {
    explicit ParamLayout(const ModelShape& s);
    std::size_t W_E, W_pos, W_Q, W_K, W_V, W_O, W_in, b_in, W_out, b_out, W_U, P;
};

// Every model's training examples, sorted by (x, y) and cut into blocks of
// X_BLOCK consecutive x values: a block's x rows of the per-step tables are
// built, used and turned into gradients while they sit in L1/L2.
struct TrainingSet {
    static constexpr int X_BLOCK = 8;
    // x, y, labels: (M, N) row-major; train_size: (M,). Model m trains on its
    // first train_size[m] slots; the rest is padding and never read.
    TrainingSet(const ModelShape& shape, int M, int N, const int64_t* x, const int64_t* y,
                const int64_t* labels, const int64_t* train_size);
    int M;
    std::vector<std::vector<int32_t>> x, y, labels;  // per model, sorted
    std::vector<std::vector<int>> block_start;       // per model, (blocks + 1) offsets
    int blocks() const { return static_cast<int>(block_start[0].size()) - 1; }
};

// Each model's examples are summed in this many shards, whatever the thread
// count (engine.cpp, "Threads and reproducibility"): a single model still
// uses two cores, and the result is the same on one.
constexpr int MODEL_SHARDS = 2;

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

template <typename Real>
class Engine {
  public:
    Engine(const ModelShape& shape, const TrainingSet& data);
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

    std::size_t scratch_bytes() const;  // workspace currently allocated

  private:
    ModelShape shape_;
    ParamLayout layout_;
    const TrainingSet& data_;
    std::vector<std::unique_ptr<Workspace<Real>>> workspaces_;
    // Example-gradient sums: two per thread, or one per (model, shard) when models < threads.
    std::vector<std::unique_ptr<ExampleGrads<Real>>> accumulators_;
    std::vector<std::unique_ptr<TileScratch<Real>>> tiles_;
    std::vector<std::unique_ptr<XRowTables<Real>>> eval_x_rows_;  // every x row of U and UU, for logits()

    void examples(int m, int block_begin, int block_end, const Workspace<Real>& ws,
                  ExampleGrads<Real>& acc, TileScratch<Real>& tile) const;
    void finish_model(int m, Real* params, Real* grads, Real* exp_avg, Real* exp_avg_sq,
                      const AdamWArgs* adamw, ExampleGrads<Real>& acc, Workspace<Real>& ws,
                      StepOutput out) const;
};

extern template class Engine<float>;
extern template class Engine<double>;

}  // namespace fastgrok
