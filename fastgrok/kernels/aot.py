"""Ahead-of-time compilation of the fused step's kernels for a GPU that is not here.

``triton.compile`` with a ``GPUTarget`` runs the whole NVIDIA pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> ptxas -> cubin) on a machine without a GPU.
The resources a launch needs then come from the compiled artefacts:
registers and local memory from ``cuobjdump -res-usage`` (the binary bundled
with Triton), spill bytes from the ptxas log of the same compilation, and
shared memory from the kernel's ``metadata.shared`` (Triton allocates it
dynamically, so the cubin's static figure is 0).

The kernels are specialised exactly as a launch would specialise them: the
launchers' own ``*_args`` builders supply every argument, with small CPU
tensors standing in for device buffers (only their dtypes matter).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import triton
from triton.backends.compiler import GPUTarget

from fastgrok.config import ModelConfig
from fastgrok.kernels.adamw import adamw_args, adamw_kernel
from fastgrok.kernels.examples import Tiles, allocate_scratch, examples_args, examples_kernel, tiling as example_tiling
from fastgrok.kernels.layout import Layout, Workspace
from fastgrok.kernels.reduce import reduce_args, reduce_kernel
from fastgrok.kernels.tables_backward import tables_backward_args, tables_backward_kernel
from fastgrok.kernels.tables_forward import tables_forward_args, tables_forward_kernel

# Largest shared memory a block may use (opt-in maximum), bytes.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
LAUNCHES_PER_STEP = 4

_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16", torch.int64: "*i64",
          torch.int32: "*i32"}


@dataclass(frozen=True)
class Resources:
    kernel: str
    arch: int
    precision: str
    num_warps: int
    registers: int          # per thread
    spill_stores: int       # bytes, from ptxas
    spill_loads: int
    local_bytes: int        # per thread local memory (spills or stack arrays)
    shared_bytes: int       # dynamic shared memory per block

    @property
    def shared_limit(self) -> int:
        return SHARED_LIMIT[self.arch]

    def problems(self) -> list[str]:
        """Why this kernel would not run well on its architecture (empty if fine)."""
        out = []
        if self.spill_stores or self.spill_loads or self.local_bytes:
            out.append(f"spills: {self.spill_stores} B stored, {self.spill_loads} B loaded, "
                       f"{self.local_bytes} B local memory per thread")
        if self.shared_bytes > self.shared_limit:
            out.append(f"shared memory {self.shared_bytes} B > sm_{self.arch} limit {self.shared_limit} B")
        if self.registers * 32 * self.num_warps > 65536:
            out.append(f"{self.registers} registers x {32 * self.num_warps} threads exceed the 64K register file")
        return out


def _signature(fn, kwargs: dict) -> tuple[dict, dict, dict]:
    """Triton signature, constexprs and pointer-alignment attributes of a launch."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = kwargs[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = _TYPES[value.dtype]
            # torch's allocations are 16-byte aligned, which a launch specialises on.
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int):
            signature[param.name] = "i32" if abs(value) < 2**31 else "i64"
        else:
            raise TypeError(f"{param.name}={value!r}: no Triton type for {type(value).__name__}")
    return signature, constexprs, attrs


def _cuobjdump_resources(cubin: bytes) -> dict[str, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], check=True, capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump -res-usage printed no register count:\n{out}")
    return {k: int(v) for k, v in fields.items()}


def compile_kernel(fn, kwargs: dict, arch: int) -> tuple[object, Resources]:
    """Compile ``fn`` with a launch's keyword arguments for sm_<arch>; its resources."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg", "enable_fp_fusion", "num_ctas")
               if k in kwargs}
    num_warps = options["num_warps"]
    signature, constexprs, attrs = _signature(fn, kwargs)
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    # Compile afresh (a cached cubin has no ptxas log) and keep the log.
    with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        triton.knobs.compilation.always_compile = True
        triton.knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    if spills is None:
        raise RuntimeError(f"no spill figures in the ptxas log of {fn.__name__}:\n{log.getvalue()}")
    res = _cuobjdump_resources(compiled.asm["cubin"])
    return compiled, Resources(
        kernel=fn.__name__, arch=arch, precision=str(constexprs.get("PRECISION", "-")), num_warps=num_warps,
        registers=res["REG"], spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
        local_bytes=res.get("LOCAL", 0) + res.get("STACK", 0), shared_bytes=compiled.metadata.shared)


def step_launches(cfg: ModelConfig, precision: str, arch: int, **tiling) -> list[tuple[object, dict]]:
    """(kernel, launch keyword arguments) of the four launches of one step at ``cfg``.

    tiling: the example kernel's block_n, block_c, block_v, block_g, block_k, group_tiles, fused_mlp, stage_tiles,
    one_pass (the precision's defaults, fastgrok.kernels.examples.TILINGS, otherwise).
    """
    layout = Layout.from_config(cfg)
    tiles_of = example_tiling(precision, arch, **tiling)
    M, N = 2, 64
    params = torch.zeros(M, layout.P)
    data = torch.zeros(M, N, dtype=torch.int64)
    tiles = Tiles.build(np.full(M, N), data, data, layout.rows.n, tiles_of["block_n"],
                        tiles_of["group_tiles"], "cpu")
    ws = Workspace.allocate(layout, M, N, tiles.count, "cpu", precision=precision)
    lr = torch.zeros(M, dtype=torch.float64)
    scratch = allocate_scratch(layout, 2, precision, tiles_of["block_n"], "cpu")
    _, tf = tables_forward_args(layout, params, ws, precision, arch=arch)
    _, ex = examples_args(layout, params, ws, scratch, data, data, data, torch.zeros(M, N), tiles, precision,
                          arch=arch, **tiling)
    _, rd = reduce_args(layout, params, ws, tiles, N, arch=arch)
    _, ad = adamw_args(layout, params, params, params, params, lr, lr, torch.zeros(M, dtype=torch.int32),
                       torch.zeros(4, dtype=torch.float64), ws, (0.9, 0.98), 1e-8, arch=arch)
    return [(tables_forward_kernel, tf), (examples_kernel, ex), (reduce_kernel, rd), (adamw_kernel, ad)]


def step_resources(cfg: ModelConfig, arch: int, precision: str, **tiling) -> list[Resources]:
    """Resources of each launch of one training step, compiled for sm_<arch>."""
    return [r for _, r in step_kernels(cfg, arch, precision, **tiling)]


def step_kernels(cfg: ModelConfig, arch: int, precision: str, **tiling) -> list[tuple[object, Resources]]:
    """(compiled kernel, resources) of each launch of one training step, for sm_<arch>."""
    return [compile_kernel(fn, kwargs, arch) for fn, kwargs in step_launches(cfg, precision, arch, **tiling)]


def disassemble(compiled) -> str:
    """The SASS of a compiled kernel (``nvdisasm``, the binary bundled with Triton)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([tool, "-c", f.name], check=True, capture_output=True, text=True).stdout


def float_atomics(sass: str) -> list[str]:
    """The floating-point RED/ATOM instructions of a disassembly: a sum whose order the
    hardware picks (empty if none)."""
    return [line.strip() for line in sass.splitlines()
            if re.search(r"\b(RED|REDG|ATOM|ATOMG|ATOMS)\.[\w.]*\b(F16|BF16|F32|F64)(x\d+)?\b", line)]


def nan_dropping_float_max_min(sass: str) -> list[str]:
    """FMNMX instructions without .NAN: a float max/min that returns the other operand
    when one is NaN (tl.maximum's default on a GPU; the CPU propagates NaN)."""
    return [line.strip() for line in sass.splitlines() if re.search(r"\bFMNMX(\.\w+)*\b", line)
            and ".NAN" not in line]


def tables_backward_kernel_compiled(cfg: ModelConfig, arch: int) -> tuple[object, Resources]:
    """The table backward launched alone (a loss and gradient without an update; fp32 whatever
    the population's precision), compiled, and its resources."""
    layout = Layout.from_config(cfg)
    params = torch.zeros(2, layout.P)
    _, kwargs = tables_backward_args(layout, params, params, Workspace.allocate(layout, 2, 1, 1, "cpu"), arch=arch)
    return compile_kernel(tables_backward_kernel, kwargs, arch)


def tables_backward_resources(cfg: ModelConfig, arch: int) -> Resources:
    """Resources of the table backward launched alone (see tables_backward_kernel_compiled)."""
    return tables_backward_kernel_compiled(cfg, arch)[1]
