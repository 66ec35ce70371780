"""Every kernel of the fused step, compiled ahead of time for sm_80 and sm_90.

No GPU is needed: triton.compile with a GPUTarget runs the whole pipeline down
to the cubin (fastgrok.kernels.aot). At the paper config, in every precision,
no kernel may spill registers or ask for more shared memory per block than the
architecture allows (163 KB on sm_80, 227 KB on sm_90). Slow (a few seconds
to half a minute per kernel): run with ``pytest -m slow tests/kernels/test_resources.py``.
"""
import pytest

from fastgrok.config import get_preset
from fastgrok.kernels.aot import SHARED_LIMIT, step_resources, tables_backward_resources
from fastgrok.kernels.layout import PRECISIONS


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("arch", sorted(SHARED_LIMIT))
def test_paper_config_compiles_without_spills_within_shared_memory(arch, precision):
    resources = step_resources(get_preset("paper").model, arch, precision)
    assert [r.kernel for r in resources] == ["tables_forward_kernel", "examples_kernel", "adamw_kernel"]
    resources.append(tables_backward_resources(get_preset("paper").model, arch, precision))
    problems = [f"{r.kernel}: {p}" for r in resources for p in r.problems()]
    assert not problems, f"sm_{arch}, {precision}: " + "; ".join(problems)
    assert SHARED_LIMIT == {80: 163 * 1024, 90: 227 * 1024}
