// pybind11 module fastgrok._cpu_engine.
//
// Arrays cross as numpy buffers (torch's .numpy() views are zero-copy). Every
// array is checked for dtype, C-contiguity, shape and writability here and
// never converted: a silent conversion would copy, and the engine's writes
// would be lost.
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

class PyEngine {
  public:
    PyEngine(int n, int d_vocab, int d_model, int n_heads, int d_head, int d_mlp, const py::array& x,
             const py::array& y, const py::array& labels, const py::array& train_size) {
        for (auto [name, value] : {std::pair{"n", n}, std::pair{"d_vocab", d_vocab}, std::pair{"d_model", d_model},
                                   std::pair{"n_heads", n_heads}, std::pair{"d_head", d_head},
                                   std::pair{"d_mlp", d_mlp}})
            if (value < 1) throw py::value_error(std::string(name) + "=" + std::to_string(value) + ": must be >= 1");
        if (d_vocab != n + 2)
            throw py::value_error("d_vocab=" + std::to_string(d_vocab) + ": must be n + 2 = " + std::to_string(n + 2));
        if (x.ndim() != 2) throw py::value_error("x: shape " + shape_str(x) + ", expected (M, N)");
        const py::ssize_t M = x.shape(0), N = x.shape(1);
        const auto* xs = checked<int64_t>(x, "x", {M, N}, false);
        const auto* ys = checked<int64_t>(y, "y", {M, N}, false);
        const auto* ls = checked<int64_t>(labels, "labels", {M, N}, false);
        const auto* ts = checked<int64_t>(train_size, "train_size", {M}, false);
        ModelShape shape{n, d_vocab, d_model, n_heads, d_head, d_mlp};
        py::gil_scoped_release release;
        engine_ = std::make_unique<Engine>(shape, int(M), int(N), xs, ys, ls, ts);
    }

    py::tuple step(const py::array& params, const py::array& grads, const py::array& exp_avg,
                   const py::array& exp_avg_sq, py::object lr, py::object weight_decay, py::object frozen,
                   int64_t step, double beta1, double beta2, double eps, int n_threads) {
        const py::ssize_t M = engine_->M(), P = py::ssize_t(engine_->layout().P);
        float* p = checked<float>(params, "params", {M, P}, true);
        float* g = checked<float>(grads, "grads", {M, P}, true);
        float* m = checked<float>(exp_avg, "exp_avg", {M, P}, true);
        float* v = checked<float>(exp_avg_sq, "exp_avg_sq", {M, P}, true);
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
        py::array_t<float> loss(M);
        py::array_t<bool> finite(M);
        fastgrok::StepOutput out{loss.mutable_data(), reinterpret_cast<uint8_t*>(finite.mutable_data())};
        {
            py::gil_scoped_release release;
            engine_->step(p, g, m, v, update ? &args : nullptr, n_threads, out);
        }
        return py::make_tuple(loss, finite);
    }

    std::size_t scratch_bytes() const { return engine_->scratch_bytes(); }
    std::size_t n_params() const { return engine_->layout().P; }

  private:
    std::unique_ptr<Engine> engine_;
};

}  // namespace

PYBIND11_MODULE(_cpu_engine, mod) {
    mod.doc() = "Fused C++ CPU training step for fastgrok populations (see csrc/engine.cpp).";
    py::class_<PyEngine>(mod, "Engine")
        .def(py::init<int, int, int, int, int, int, const py::array&, const py::array&, const py::array&,
                      const py::array&>(),
             py::arg("n"), py::arg("d_vocab"), py::arg("d_model"), py::arg("n_heads"), py::arg("d_head"),
             py::arg("d_mlp"), py::arg("x"), py::arg("y"), py::arg("labels"), py::arg("train_size"))
        .def("step", &PyEngine::step, py::arg("params"), py::arg("grads"), py::arg("exp_avg"),
             py::arg("exp_avg_sq"), py::arg("lr"), py::arg("weight_decay"), py::arg("frozen"), py::arg("step"),
             py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("n_threads"),
             "Loss and gradients of every model; with lr given (not None), AdamW on each model that is "
             "neither frozen nor non-finite. Returns (loss float32 (M,), finite bool (M,)).")
        .def_property_readonly("scratch_bytes", &PyEngine::scratch_bytes)
        .def_property_readonly("n_params", &PyEngine::n_params);
    mod.def("build_info", []() {
        py::dict info;
        info["flags"] = FASTGROK_BUILD_FLAGS;
        info["vector_bits"] = fastgrok::VL * 32;
        info["gemm_tile"] = std::to_string(fastgrok::MR) + "x" + std::to_string(fastgrok::NR);
#ifdef _OPENMP
        info["openmp"] = _OPENMP;
#else
        info["openmp"] = py::none();
#endif
        return info;
    });
}
