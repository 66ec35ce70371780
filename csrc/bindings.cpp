// pybind11 module fastgrok._cpu_engine.
//
// Arrays cross as numpy buffers (torch's .numpy() views are zero-copy). Every
// array is checked for dtype, C-contiguity, shape and writability here and
// never converted: a silent conversion would copy, and the engine's writes
// would be lost. The engine's own checks (the layout, the token rows, the
// training data) throw std::invalid_argument, which pybind11 raises as
// ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "engine.hpp"
#include "vec.hpp"

namespace py = pybind11;
using fastgrok::Engine;
using fastgrok::ModelShape;

#ifndef FASTGROK_BUILD_FLAGS
#define FASTGROK_BUILD_FLAGS "unknown"
#endif

namespace {

std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

template <typename T>
T* checked(const py::array& a, const char* name, std::initializer_list<py::ssize_t> shape, bool writable) {
    if (!py::dtype::of<T>().is(a.dtype()))
        throw py::type_error(std::string(name) + ": dtype " + std::string(py::str(a.dtype())) + ", expected " +
                             std::string(py::str(py::dtype::of<T>())));
    bool ok = a.ndim() == py::ssize_t(shape.size());
    py::ssize_t i = 0;
    for (py::ssize_t extent : shape) ok = ok && a.shape(i++) == extent;
    if (!ok) {
        std::string want = "(";
        i = 0;
        for (py::ssize_t extent : shape) want += (i++ ? ", " : "") + std::to_string(extent);
        throw py::value_error(std::string(name) + ": shape " + shape_str(a) + ", expected " + want +
                              (shape.size() == 1 ? ",)" : ")"));
    }
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(std::string(name) + ": must be C-contiguous (call .contiguous() first)");
    if (writable && !a.writeable())
        throw py::value_error(std::string(name) + ": must be writable");
    return static_cast<T*>(const_cast<void*>(a.data()));
}

std::vector<int64_t> int64_vector(const py::array& a, const char* name) {
    if (a.ndim() != 1) throw py::value_error(std::string(name) + ": shape " + shape_str(a) + ", expected (count,)");
    const auto* data = checked<int64_t>(a, name, {a.shape(0)}, false);
    return std::vector<int64_t>(data, data + a.shape(0));
}

// The dimensions before anything is sized by them.
int checked_dims(int n, int d_vocab, int d_model, int n_heads, int d_head, int d_mlp, int n_ctx) {
    for (auto [name, value] : {std::pair{"n", n}, std::pair{"d_vocab", d_vocab}, std::pair{"d_model", d_model},
                               std::pair{"n_heads", n_heads}, std::pair{"d_head", d_head}, std::pair{"d_mlp", d_mlp},
                               std::pair{"n_ctx", n_ctx}})
        if (value < 1) throw py::value_error(std::string(name) + "=" + std::to_string(value) + ": must be >= 1");
    if (d_vocab != n + 2)
        throw py::value_error("d_vocab=" + std::to_string(d_vocab) + ": must be n + 2 = " + std::to_string(n + 2) +
                              " (the n elements, the operator and =)");
    return n;
}

fastgrok::Precision parse_precision(const std::string& name) {
    if (name == "fp32") return fastgrok::Precision::fp32;
    if (name == "tf32") return fastgrok::Precision::tf32;
    if (name == "bf16") return fastgrok::Precision::bf16;
    if (name == "bf16x3") return fastgrok::Precision::bf16x3;
    throw py::value_error("precision='" + name + "'; valid: fp32, tf32, bf16, bf16x3");
}

// x rounded to `bits` explicit mantissa bits on its bit pattern (a new array
// of x's dtype and shape): the engine's rounding, for the test against
// fastgrok.precision.round_mantissa.
template <typename Real>
py::array round_mantissa_array(const py::array& x, int bits) {
    if (!(x.flags() & py::array::c_style))
        throw py::value_error("x: must be C-contiguous");
    py::array_t<Real> out(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    const Real* src = static_cast<const Real*>(x.data());
    {
        py::gil_scoped_release release;
        fastgrok::round_mantissa(src, out.mutable_data(), std::size_t(x.size()), bits);
    }
    return out;
}

py::array round_mantissa(const py::array& x, int bits) {
    const bool f64 = py::dtype::of<double>().is(x.dtype());
    if (!f64 && !py::dtype::of<float>().is(x.dtype()))
        throw py::type_error("x: dtype " + std::string(py::str(x.dtype())) + ", expected float32 or float64");
    const int mantissa = f64 ? 52 : 23;
    if (bits < 0 || bits > mantissa)
        throw py::value_error("bits=" + std::to_string(bits) + ": must be in 0.." + std::to_string(mantissa));
    return f64 ? round_mantissa_array<double>(x, bits) : round_mantissa_array<float>(x, bits);
}

std::string name_of(fastgrok::Precision p) {
    switch (p) {
        case fastgrok::Precision::tf32: return "tf32";
        case fastgrok::Precision::bf16: return "bf16";
        case fastgrok::Precision::bf16x3: return "bf16x3";
        default: return "fp32";
    }
}

class PyEngine {
  public:
    // The dimensions, fastgrok.layout's ParamLayout (param_offsets: the offsets
    // in PARAM_NAMES order, then P) and TokenRows (row_token, row_pos, op_row,
    // first_y_row, eq_row), and every model's training data.
    PyEngine(int n, int d_vocab, int d_model, int n_heads, int d_head, int d_mlp, int n_ctx,
             const py::array& param_offsets, const py::array& row_token, const py::array& row_pos, int op_row,
             int first_y_row, int eq_row, const py::array& x, const py::array& y, const py::array& labels,
             const py::array& train_size, const std::string& precision)
        : precision_(parse_precision(precision)),
          shape_(checked_dims(n, d_vocab, d_model, n_heads, d_head, d_mlp, n_ctx), d_vocab, d_model, n_heads, d_head,
                 d_mlp, n_ctx,
                 fastgrok::TokenRows(n, d_vocab, n_ctx, int64_vector(row_token, "row_token"),
                                     int64_vector(row_pos, "row_pos"), op_row, first_y_row, eq_row)),
          layout_(shape_, int64_vector(param_offsets, "param_offsets")) {
        if (x.ndim() != 2) throw py::value_error("x: shape " + shape_str(x) + ", expected (M, N)");
        const py::ssize_t M = x.shape(0), N = x.shape(1);
        const auto* xs = checked<int64_t>(x, "x", {M, N}, false);
        const auto* ys = checked<int64_t>(y, "y", {M, N}, false);
        const auto* ls = checked<int64_t>(labels, "labels", {M, N}, false);
        const auto* ts = checked<int64_t>(train_size, "train_size", {M}, false);
        data_ = std::make_unique<fastgrok::TrainingSet>(shape_, int(M), int(N), xs, ys, ls, ts);
    }

    py::tuple step(const py::array& params, const py::array& grads, const py::array& exp_avg,
                   const py::array& exp_avg_sq, py::object lr, py::object weight_decay, py::object frozen,
                   int64_t step, double beta1, double beta2, double eps, int n_threads) {
        if (py::dtype::of<double>().is(params.dtype()))
            return run<double>(f64_, params, grads, exp_avg, exp_avg_sq, lr, weight_decay, frozen, step, beta1,
                               beta2, eps, n_threads);
        return run<float>(f32_, params, grads, exp_avg, exp_avg_sq, lr, weight_decay, frozen, step, beta1, beta2,
                          eps, n_threads);
    }

    py::array logits(const py::array& params, const py::array& models, const py::array& x, const py::array& y,
                     int n_threads) {
        if (py::dtype::of<double>().is(params.dtype()))
            return eval_logits<double>(f64_, params, models, x, y, n_threads);
        return eval_logits<float>(f32_, params, models, x, y, n_threads);
    }

    std::string precision() const { return name_of(precision_); }

  private:
    fastgrok::Precision precision_;
    ModelShape shape_;
    fastgrok::ParamLayout layout_;
    std::unique_ptr<fastgrok::TrainingSet> data_;
    std::unique_ptr<Engine<float>> f32_;
    std::unique_ptr<Engine<double>> f64_;

    template <typename Real>
    py::array eval_logits(std::unique_ptr<Engine<Real>>& engine, const py::array& params, const py::array& models,
                          const py::array& x, const py::array& y, int n_threads) {
        const py::ssize_t M = data_->M, P = py::ssize_t(layout_.P);
        const Real* p = checked<Real>(params, "params", {M, P}, false);
        if (models.ndim() != 1) throw py::value_error("models: shape " + shape_str(models) + ", expected (K,)");
        const py::ssize_t K = models.shape(0);
        const auto* ms = checked<int64_t>(models, "models", {K}, false);
        for (py::ssize_t k = 0; k < K; ++k)
            if (ms[k] < 0 || ms[k] >= M)
                throw py::value_error("models[" + std::to_string(k) + "]=" + std::to_string(ms[k]) +
                                      ": valid models are 0.." + std::to_string(M - 1));
        if (x.ndim() != 1) throw py::value_error("x: shape " + shape_str(x) + ", expected (N,)");
        const py::ssize_t N = x.shape(0);
        const auto* xs = checked<int64_t>(x, "x", {N}, false);
        const auto* ys = checked<int64_t>(y, "y", {N}, false);
        std::vector<int32_t> x32(N), y32(N);
        for (py::ssize_t i = 0; i < N; ++i) {
            if (xs[i] < 0 || xs[i] >= shape_.n || ys[i] < 0 || ys[i] >= shape_.n)
                throw py::value_error("example " + std::to_string(i) + ": (x, y) = (" + std::to_string(xs[i]) + ", " +
                                      std::to_string(ys[i]) + "); valid: 0.." + std::to_string(shape_.n - 1));
            x32[i] = int32_t(xs[i]);
            y32[i] = int32_t(ys[i]);
        }
        if (n_threads < 1) throw py::value_error("n_threads=" + std::to_string(n_threads) + ": must be >= 1");
        if (!engine) engine = std::make_unique<Engine<Real>>(shape_, layout_, *data_, precision_);
        py::array_t<Real> out({K, N, py::ssize_t(shape_.V)});
        {
            py::gil_scoped_release release;
            engine->logits(p, ms, int(K), x32.data(), y32.data(), int(N), out.mutable_data(), n_threads);
        }
        return out;
    }

    template <typename Real>
    py::tuple run(std::unique_ptr<Engine<Real>>& engine, const py::array& params, const py::array& grads,
                  const py::array& exp_avg, const py::array& exp_avg_sq, py::object lr, py::object weight_decay,
                  py::object frozen, int64_t step, double beta1, double beta2, double eps, int n_threads) {
        const py::ssize_t M = data_->M, P = py::ssize_t(layout_.P);
        Real* p = checked<Real>(params, "params", {M, P}, true);
        Real* g = checked<Real>(grads, "grads", {M, P}, true);
        Real* m = checked<Real>(exp_avg, "exp_avg", {M, P}, true);
        Real* v = checked<Real>(exp_avg_sq, "exp_avg_sq", {M, P}, true);
        const bool update = !lr.is_none();
        fastgrok::AdamWArgs args{};
        py::array lr_a, wd_a, frozen_a;
        if (update) {
            lr_a = lr.cast<py::array>();
            wd_a = weight_decay.cast<py::array>();
            frozen_a = frozen.cast<py::array>();
            args.lr = checked<double>(lr_a, "lr", {M}, false);
            args.weight_decay = checked<double>(wd_a, "weight_decay", {M}, false);
            args.frozen = reinterpret_cast<const uint8_t*>(checked<bool>(frozen_a, "frozen", {M}, false));
            if (step < 1) throw py::value_error("step=" + std::to_string(step) + ": the optimiser step is 1-based");
            args.step = step;
            args.beta1 = beta1;
            args.beta2 = beta2;
            args.eps = eps;
        }
        if (n_threads < 1) throw py::value_error("n_threads=" + std::to_string(n_threads) + ": must be >= 1");
        if (!engine) engine = std::make_unique<Engine<Real>>(shape_, layout_, *data_, precision_);
        py::array_t<double> loss(M);
        py::array_t<bool> finite(M);
        fastgrok::StepOutput out{loss.mutable_data(), reinterpret_cast<uint8_t*>(finite.mutable_data())};
        {
            py::gil_scoped_release release;
            engine->step(p, g, m, v, update ? &args : nullptr, n_threads, out);
        }
        return py::make_tuple(loss, finite);
    }
};

}  // namespace

PYBIND11_MODULE(_cpu_engine, mod) {
    mod.doc() = "Fused C++ CPU training step for fastgrok populations (see csrc/engine.cpp).";
    py::class_<PyEngine>(mod, "Engine")
        .def(py::init<int, int, int, int, int, int, int, const py::array&, const py::array&, const py::array&, int,
                      int, int, const py::array&, const py::array&, const py::array&, const py::array&,
                      const std::string&>(),
             py::kw_only(), py::arg("n"), py::arg("d_vocab"), py::arg("d_model"), py::arg("n_heads"),
             py::arg("d_head"), py::arg("d_mlp"), py::arg("n_ctx"), py::arg("param_offsets"), py::arg("row_token"),
             py::arg("row_pos"), py::arg("op_row"), py::arg("first_y_row"), py::arg("eq_row"), py::arg("x"),
             py::arg("y"), py::arg("labels"), py::arg("train_size"), py::arg("precision") = "fp32",
             "The engine of one population: its dimensions, fastgrok.layout's parameter offsets (int64 (12,): "
             "W_E..W_U in PARAM_NAMES order, then P) and token rows (row_token, row_pos int64 (R,), op_row, "
             "first_y_row, eq_row), checked against the structure the engine relies on (ValueError naming the "
             "value), every model's training data x, y, labels (M, N) int64 with train_size (M,), and the "
             "matmul precision (fastgrok.precision: fp32, tf32, bf16, bf16x3).")
        .def_property_readonly("precision", &PyEngine::precision)
        .def("step", &PyEngine::step, py::arg("params"), py::arg("grads"), py::arg("exp_avg"),
             py::arg("exp_avg_sq"), py::arg("lr"), py::arg("weight_decay"), py::arg("frozen"), py::arg("step"),
             py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("n_threads"),
             "Loss and gradients of every model (float32 or float64 state, as given); with lr given (not "
             "None), AdamW on each model that is neither frozen nor non-finite. Returns (loss float64 (M,), "
             "finite bool (M,)).")
        .def("logits", &PyEngine::logits, py::arg("params"), py::arg("models"), py::arg("x"), py::arg("y"),
             py::arg("n_threads"),
             "Last-position logits (K, N, V) of models (K,) on the examples x, y (N,), in the dtype of params; "
             "a model's logits do not depend on n_threads or on the other models listed.");
    mod.def("round_mantissa", &round_mantissa, py::arg("x"), py::arg("bits"),
            "x (float32 or float64, C-contiguous) rounded to `bits` explicit mantissa bits, nearest, ties to "
            "even, NaN kept: the engine's operand rounding (csrc/precision.hpp), a new array.");
    mod.def("build_info", []() {
        py::dict info;
        info["flags"] = FASTGROK_BUILD_FLAGS;
        info["vector_bits"] = fastgrok::VECTOR_BYTES * 8;
        info["gemm_tile_float32"] = std::to_string(fastgrok::MR) + "x" + std::to_string(fastgrok::Simd<float>::NR);
#ifdef _OPENMP
        info["openmp"] = _OPENMP;
#else
        info["openmp"] = py::none();
#endif
        return info;
    });
}
