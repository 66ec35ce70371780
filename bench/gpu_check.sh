#!/usr/bin/env bash
# The prepared GPU check of the triton backend: one command, about 5-8 minutes on one H100/H200.
#
# Needs only the project's own install on a machine with an NVIDIA GPU (sm_80 or sm_90):
#   pip install torch          # a CUDA build (it brings triton; else: pip install triton)
#   pip install -e '.[test]'
# Nothing is downloaded while it runs.
#
#   bench/gpu_check.sh [OUT_DIR]        # default: $OUT, else ./gpu_check_out
#
# Writes into OUT_DIR:
#   tests.log                  the kernel tests on the GPU for each precision (tests/kernels/test_gpu.py:
#                              triton against the torch backend at the same precision, NaN freezing,
#                              two runs bitwise equal, a model alone and among others bitwise equal),
#                              then the interpreter's kernel and conformance tests (-k triton)
#   static_M<M>.csv            the static model's estimates (bench/sass_model.py) at M models, D = 2000
#   speed.csv                  MEASURED model-steps/s and device memory per model of the triton backend
#                              (each precision) and the torch backend (fp32, and TF32 through
#                              torch.backends.cuda.matmul.allow_tf32) at M = 8, 64, 200, 2000, D = 2000,
#                              each row beside the static model's estimate (bench/bench_gpu.py)
#   summary.txt                pass/fail of each part
# Exit status: 0 only if every part passed.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
status=0
: > "$OUT_DIR/summary.txt"
note() { echo "$*" | tee -a "$OUT_DIR/summary.txt"; }

python -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA GPU'; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT_DIR/summary.txt" || { note "FAIL: no usable CUDA GPU"; exit 1; }

# The static model only compiles (CPU): its four runs go in the background, beside the GPU work.
pids=()
for M in 8 64 200 2000; do
    timeout 420 python bench/sass_model.py --models "$M" --train-size 2000 --csv "$OUT_DIR/static_M$M.csv" \
        > "$OUT_DIR/static_M$M.txt" 2>&1 &
    pids+=($!)
done

if timeout 240 python -m pytest -p no:cacheprovider -q tests/kernels/test_gpu.py > "$OUT_DIR/tests.log" 2>&1; then
    note "PASS: kernel tests on the GPU, every precision"
else
    note "FAIL: kernel tests on the GPU (tests.log)"; status=1
fi
if timeout 150 python -m pytest -p no:cacheprovider -q tests/kernels >> "$OUT_DIR/tests.log" 2>&1 \
        && timeout 90 python -m pytest -p no:cacheprovider -q tests/test_conformance.py -k triton \
        >> "$OUT_DIR/tests.log" 2>&1; then
    note "PASS: interpreter kernel and conformance tests"
else
    note "FAIL: interpreter kernel and conformance tests (tests.log)"; status=1
fi

for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { note "FAIL: static model run ${i} (static_M*.txt)"; status=1; }
done
if timeout 240 python bench/bench_gpu.py --models 8 64 200 2000 --sizes 2000:2000 --steps 5 --repeats 3 \
        --predictions "$OUT_DIR"/static_M*.csv --csv "$OUT_DIR/speed.csv" > "$OUT_DIR/speed.txt" 2>&1; then
    note "PASS: speed measured (speed.csv)"
else
    note "FAIL: speed measurement (speed.txt)"; status=1
fi
cat "$OUT_DIR/speed.txt"
note "results in $OUT_DIR; exit status $status"
exit $status
