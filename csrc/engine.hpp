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
// are F and V rounded up to the GEMM strip width so that every row of the
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
    int Fp() const;
    int Vp() const;
};

// Offsets of each parameter in a model's flat vector, in PARAM_NAMES order.
struct ParamLayout {
    explicit ParamLayout(const ModelShape& s);
    std::size_t W_E, W_pos, W_Q, W_K, W_V, W_O, W_in, b_in, W_out, b_out, W_U, P;
};

// A 64-byte aligned float array, zero-initialised.
class Buffer {
  public:
    Buffer() = default;
    explicit Buffer(std::size_t count);
    float* data() { return data_.get(); }
    const float* data() const { return data_.get(); }
    std::size_t size() const { return size_; }
    void zero();

  private:
    struct Free { void operator()(float* p) const; };
    std::unique_ptr<float[], Free> data_;
    std::size_t size_ = 0;
};

struct Tables;
struct ExampleGrads;
struct TileScratch;
struct BackwardScratch;

struct StepOutput {
    float* loss;       // (M,) mean training loss
    uint8_t* finite;   // (M,) 1 if the loss and every gradient are finite
};

struct AdamWArgs {
    const double* lr;            // (M,) learning rate of this step (warm-up applied)
    const double* weight_decay;  // (M,)
    const uint8_t* frozen;       // (M,) 1 = a frozen model: gradients computed, no update
    int64_t step;                // 1-based optimiser step for the bias corrections
    double beta1, beta2, eps;
};

class Engine {
  public:
    // x, y, labels: (M, N) row-major; train_size: (M,). Model m trains on its
    // first train_size[m] slots; the rest is padding and never read.
    Engine(const ModelShape& shape, int M, int N, const int64_t* x, const int64_t* y,
           const int64_t* labels, const int64_t* train_size);
    ~Engine();

    // Loss and gradients of every model into grads (M, P); with adamw set, an
    // AdamW update of params, exp_avg and exp_avg_sq for each model that is
    // neither frozen nor non-finite. All state arrays are (M, P) row-major.
    void step(float* params, float* grads, float* exp_avg, float* exp_avg_sq,
              const AdamWArgs* adamw, int n_threads, StepOutput out);

    std::size_t scratch_bytes() const;  // workspace currently allocated
    int M() const { return M_; }
    const ModelShape& shape() const { return shape_; }
    const ParamLayout& layout() const { return layout_; }

  private:
    struct Workspace;

    ModelShape shape_;
    ParamLayout layout_;
    int M_;
    // Per model, its training examples sorted by (x, y): examples sharing x
    // reuse the same table rows while those rows are in L1.
    std::vector<std::vector<int32_t>> x_, y_, labels_;

    std::vector<std::unique_ptr<Workspace>> workspaces_;
    std::vector<std::unique_ptr<ExampleGrads>> shard_grads_;
    std::vector<std::unique_ptr<TileScratch>> tiles_;

    void examples(const float* params, const Tables& tb, int m, int begin, int end,
                  ExampleGrads& acc, TileScratch& tile) const;
    void finish_model(int m, float* params, float* grads, float* exp_avg, float* exp_avg_sq,
                      const AdamWArgs* adamw, const ExampleGrads& acc, Workspace& ws,
                      StepOutput out) const;
};

std::size_t workspace_bytes(const ModelShape& s);

}  // namespace fastgrok
