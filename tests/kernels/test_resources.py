"""Every kernel of the fused step, compiled ahead of time for sm_80 and sm_90.

No GPU is needed: triton.compile with a GPUTarget runs the whole pipeline down
to the cubin (fastgrok.kernels.aot). At the paper config, in every precision,
no kernel may spill registers or ask for more shared memory per block than the
architecture allows (163 KB on sm_80, 227 KB on sm_90); and, disassembled, no
kernel of the training path may hold a floating-point atomic (a sum whose
order the hardware picks: runs would differ in the last bits) or a float
max/min that drops NaN (a NaN model must turn NaN and be frozen, as on the
CPU). tests/kernels/test_sass_model.py shows the atomic check finds one.
Slow (a few seconds to half a minute per kernel): run with
``pytest -m slow tests/kernels/test_resources.py``.
"""
import pytest

from fastgrok.config import get_preset
from fastgrok.kernels.aot import (SHARED_LIMIT, disassemble, float_atomics, nan_dropping_float_max_min,
                                  step_kernels, tables_backward_kernel_compiled)
from fastgrok.kernels.layout import PRECISIONS

KERNELS = ["tables_forward_kernel", "examples_kernel", "reduce_kernel", "adamw_kernel"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(SHARED_LIMIT))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_paper_config_compiles_without_spills_atomics_or_nan_dropping_max(arch, precision):
    cfg = get_preset("paper").model
    kernels = step_kernels(cfg, arch, precision)
    assert [r.kernel for _, r in kernels] == KERNELS
    kernels.append(tables_backward_kernel_compiled(cfg, arch))
    problems = [f"{r.kernel}: {p}" for _, r in kernels for p in r.problems()]
    for compiled, r in kernels:
        sass = disassemble(compiled)
        assert "EXIT" in sass, f"{r.kernel}: no SASS disassembled"
        problems += [f"{r.kernel}: float atomic {line}" for line in float_atomics(sass)]
        problems += [f"{r.kernel}: NaN-dropping {line}" for line in nan_dropping_float_max_min(sass)]
    assert not problems, f"sm_{arch}, {precision}: " + "; ".join(problems)
    assert SHARED_LIMIT == {80: 163 * 1024, 90: 227 * 1024}
