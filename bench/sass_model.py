"""ESTIMATES, not measurements: a static performance model of the fused Triton step from its SASS.

Every kernel of the step is compiled ahead of time for sm_90 (or sm_80) with
the arguments its launcher would pass at a config (kernels.aot, the
launchers' own ``*_args`` builders, meta tensors standing in for the device
buffers), disassembled (``nvdisasm -c -gi``, shipped with Triton), and its
instructions counted per class, each weighted by how often it runs:

* Line information: the cubin is re-assembled by Triton's own ptxas step
  from its PTX with the ``.loc`` lines inside inline-asm blocks dropped (LLVM
  numbers an asm block's lines as consecutive source lines, which puts the
  k-th instruction of a ``tl.load`` k lines further down); the instructions
  must come out identical.
* Loops are the backward branches of the SASS (``BRA`` to an earlier label):
  the body of a loop is [label, branch]; loops nest by containment. A loop the
  compiler fully unrolled has no backward branch, so its copies count as
  straight-line code.
* Trip counts: where the branch is decided by a plain counter (set to a
  constant before the loop, incremented by a constant, compared with an
  immediate) the count is read off the SASS, so unrolled and peeled loops
  count what the hardware runs. Otherwise it is the range of the source loop
  on the branch's line (the ``for`` statement, through the chain of inlined
  calls: ``gemm``'s ``for k0`` inlined in ``_weight_grad`` inlined in the
  kernel), evaluated on the kernel's source with the launch's constexprs and
  integer arguments, each inlined helper's parameters bound to its call
  site's arguments and ``tl.program_id`` / ``tl.num_programs`` from the grid:
  the persistent loop over groups of tiles runs ceil or floor of n_groups /
  programs times,
  program by program.
* An instruction inside a source ``if`` whose test depends only on the
  program id and the launch (``if blk == 0:`` in kernels.adamw) is weighted by
  the programs that take it; data-dependent branches count as taken.
* Cross-check: the HMMA/HGMMA FLOPs so counted must equal the TTGIR's MMA
  dots, each times the warps its layout replicates it over (a 32-row tile on
  a [4, 1] warp layout is computed twice) and times the source loops around
  it, unrolled or not; and the dots without replication must equal the
  kernel's matmul FLOPs by hand (x3 for bf16x3). The ratio of the two is
  the redundant tensor work the compiled kernel really does.

Per model-step (a kernel's total over its grid divided by the M models):

* tensor-pipe time: HMMA (mma.sync) / HGMMA (wgmma) FLOPs over the rate of
  that instruction kind and input type;
* fp32-pipe time (FFMA/FADD/FMUL), issue time at IPC 1 and at REALISTIC_IPC;
* L2 bytes: every global load/store/atomic x its dynamic count x its width x
  its distinct lanes: 32 over the lanes that request each element, from the
  layout of its pointer tensor in the TTGIR (``ttgir_memory_replication``: a
  bias broadcast over the rows of an MMA tile is requested by 4 of 32 lanes;
  the coalescer merges equal addresses of a warp-instruction). An upper
  bound: no L1 hits, masked lanes counted;
* HBM bytes: each buffer the kernel touches (memory instructions attributed
  to a pointer argument through the source) counted once per direction,
  whole, capped at its L2 bytes (a lower bound: perfect L2 reuse in a launch);
* the schedule: programs dealt in launch order to the least-loaded SM, each
  SM issuing at REALISTIC_IPC (no program faster than its own warps allow);
* the estimate: the largest of these (its name is the bound).

The same tables give the batched torch engine from its
GEMM FLOPs at CUBLAS_EFFICIENCY and its HBM bytes, and the floors no
implementation of the step beats (``floors``: the matmul FLOPs at the tensor
peak, AdamW's fp32 state read and written once). Every assumption is in the
block below. Real kernels reach these bounds only approximately (latency,
bank conflicts, L1 behaviour); bench/bench_gpu.py measures.

``--num-ctas 2`` estimates the example kernel launched as clusters of two
CTAs (Triton's num_ctas on sm_90: a program's tile split over two SMs, each
CTA running the SASS on its share; the engine does not launch this): the
programs go to pairs of SMs, and a compile the Triton compiler fails on is
reported as such.

    python bench/sass_model.py                                  # sm_90, D = 2000, 200 models, all precisions
    python bench/sass_model.py --arch 80 --precision bf16x3 --csv out.csv --loops
    python bench/sass_model.py --precision bf16 --num-ctas 2 \\
        --tiling block_n=256,group_tiles=4,fused_mlp=0,stage_tiles=0,one_pass=0
"""
from __future__ import annotations

import argparse
import ast
import csv
import datetime
import functools
import heapq
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import triton

from fastgrok import __version__
from fastgrok.config import get_preset


# What this model reads from the project, in one place: the fused kernels and their
# launchers' argument builders, the Triton engine's tiling defaults and the torch
# engine's FLOP count.
from fastgrok.backends import torch_engine as _torch_engine  # noqa: E402
from fastgrok.backends.triton_engine import Options  # noqa: E402
from fastgrok.kernels import adamw as _adamw, aot, examples as _examples, layout as _layout  # noqa: E402
from fastgrok.kernels import reduce as _reduce, tables_forward as _tables_forward  # noqa: E402

adamw_args, adamw_kernel = _adamw.adamw_args, _adamw.adamw_kernel
Tiles, examples_args, examples_kernel = _examples.Tiles, _examples.examples_args, _examples.examples_kernel
allocate_scratch = _examples.allocate_scratch
PRECISIONS, Layout, Workspace = _layout.PRECISIONS, _layout.Layout, _layout.Workspace
tables_forward_args, tables_forward_kernel = _tables_forward.tables_forward_args, _tables_forward.tables_forward_kernel
reduce_args, reduce_kernel = _reduce.reduce_args, _reduce.reduce_kernel
CHUNK, flops_per_example = _torch_engine.CHUNK, _torch_engine.flops_per_example
flops_per_model_step = _torch_engine.flops_per_model_step

# ----------------------------------------------------------------------------
# Assumptions. FLOP rates are dense, per SM per clock; 1 FMA = 2 FLOPs.


@dataclass(frozen=True)
class GPU:
    name: str
    arch: int               # compute capability x10 the kernels are compiled for
    sms: int
    clock_ghz: float
    hbm_tbs: float          # TB/s
    l2_tbs: float           # TB/s, assumed (no datasheet figure)
    fp32_lanes: int         # FP32 FMA lanes per SM
    mufu_lanes: int         # special-function results per SM per clock
    tensor: dict            # (instruction kind, input type) -> FLOP per SM per clock
    l2_mb: float            # L2 capacity, MB
    schedulers: int = 4     # warp schedulers per SM, each issues <= 1 warp-instruction per clock


# sm_80 (A100, mma.sync only): 2048 BF16 and 1024 TF32 dense FLOP/clk/SM, since
# 108 SMs x 1.41 GHz x 2048 = 312 TFLOPS and x 1024 = 156 TFLOPS, the A100
# datasheet's dense figures. 64 FP32 lanes per SM (19.5 TFLOPS), 16 MUFU results
# per clock per SM (CUDA C programming guide, arithmetic instruction throughput
# table, cc 8.0).
A100_TENSOR = {("mma.sync", "TF32"): 1024, ("mma.sync", "BF16"): 2048, ("mma.sync", "F16"): 2048}

# sm_90 (H100/H200 SXM): wgmma doubles the per-SM rate: 4096 BF16 and 2048 TF32
# FLOP/clk/SM (the H100 SXM datasheet's 989.4 / 494.7 dense TFLOPS are these
# rates x 132 SMs x 1.83 GHz; NVIDIA quotes tensor peaks at that lower clock,
# so at the 1.98 GHz below the tensor bound is ~8% optimistic). mma.sync (HMMA,
# what Triton emits for a dot whose tile is too small for wgmma, M < 64 per
# warp group) is ASSUMED to run at half the wgmma rate, A100's per-SM rate:
# Hopper's doubled rate is reached only through the asynchronous
# warp-group path (Luo et al., "Benchmarking and Dissecting the Nvidia Hopper
# GPU Architecture", arXiv 2402.13499, benchmark both). 128 FP32 lanes per SM
# (67 TFLOPS at 1.98 GHz, the datasheet figure), 16 MUFU per clock per SM.
H100_TENSOR = {("wgmma", "TF32"): 2048, ("wgmma", "BF16"): 4096, ("wgmma", "F16"): 4096,
               ("mma.sync", "TF32"): 1024, ("mma.sync", "BF16"): 2048, ("mma.sync", "F16"): 2048}

# Clocks: max boost, 1.98 GHz for H100/H200 SXM (the clock the 67 TFLOPS FP32 peak
# implies), 1.41 GHz for A100 SXM. HBM: datasheets (H100 SXM HBM3 3.35 TB/s, H200
# HBM3e 4.8 TB/s, A100 80GB HBM2e 2.039 TB/s). L2: ASSUMED from public
# microbenchmarks (chipsandcheese.com, "Nvidia's H100: Funny L2, and Tons of
# Bandwidth", 2023), the same figures as bench/roofline.py. L2 capacity: datasheets
# (A100 40 MB, H100 and H200 50 MB).
GPUS = {
    80: (GPU("A100-SXM4-80GB", 80, 108, 1.41, 2.039, 4.0, 64, 16, A100_TENSOR, 40),),
    90: (GPU("H100-SXM5", 90, 132, 1.98, 3.35, 5.5, 128, 16, H100_TENSOR, 50),
         GPU("H200-SXM", 90, 132, 1.98, 4.8, 5.5, 128, 16, H100_TENSOR, 50)),
}

# Issue rate per scheduler a real kernel sustains, ASSUMED: the example kernel
# holds one 8-warp program per SM (255 registers per thread), 2 warps per
# scheduler, so dependent-instruction latency (~4-6 cycles for ALU, tens for
# shared memory, hundreds for L2) leaves each scheduler idle about half the time.
REALISTIC_IPC = 0.5

# The torch engine's batched GEMMs are small (a chunk of 256 examples x 128..512
# per model): ASSUMED cuBLAS efficiency against the peak, from the usual
# 50-70% of batched SGEMMs of this size and a lower share for TF32, whose
# operands must be converted and whose tiles are too small to hide latency.
CUBLAS_EFFICIENCY = {"fp32": 0.6, "tf32": 0.5}

WARP = 32
FP32 = 4

# ----------------------------------------------------------------------------
# Disassembly and instruction classes.

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _fix_inline_asm_lines(ptx: str) -> str:
    """Drop the ``.loc`` lines LLVM writes inside inline-asm blocks.

    LLVM numbers the lines of a multi-line inline asm (Triton's loads, stores,
    atomics and wgmma are inline asm) as consecutive source lines, so the k-th
    asm line of a ``tl.load`` at line 12 is reported at line 12 + k, which can
    fall inside a later loop, ``if`` or function, and so is every instruction
    after the block until the next ``.loc``. Without them the whole block
    keeps the ``.loc`` of the asm statement itself, emitted just before it.
    """
    out, inside = [], False
    for line in ptx.splitlines():
        s = line.strip()
        if s == "// begin inline asm":
            inside = True
        elif s == "// end inline asm":
            inside = False
        elif inside and s.startswith(".loc"):
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def cubin_with_source_lines(compiled, arch: int) -> bytes:
    """The kernel's cubin re-assembled by Triton's own ptxas step from its PTX with the
    inline-asm line numbers fixed; the instructions must come out identical."""
    from triton.backends.compiler import GPUTarget
    backend = triton.compiler.make_backend(GPUTarget("cuda", arch, 32))
    opt = backend.parse_options(dict(compiled.metadata._asdict()))
    cubin = backend.make_cubin(_fix_inline_asm_lines(compiled.asm["ptx"]), {}, opt, backend.target.arch)
    original = [(i.pred, i.opcode, i.operands) for i in parse_sass(disassemble(compiled.asm["cubin"]))[0]]
    if [(i.pred, i.opcode, i.operands) for i in parse_sass(disassemble(cubin))[0]] != original:
        raise RuntimeError(f"{compiled.name}: re-assembling the PTX with fixed line numbers changed the SASS")
    return cubin


def disassemble(cubin: bytes) -> str:
    """``nvdisasm -c -gi`` of a cubin: code only, each instruction under its source
    line and the chain of calls it was inlined from."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(TOOLS, "nvdisasm"), "-c", "-gi", f.name], check=True,
                              capture_output=True, text=True).stdout


@dataclass(frozen=True)
class Instr:
    index: int
    addr: int
    pred: str               # "" or "@P0", "@!PT", ...
    opcode: str             # "LDG.E.128"
    operands: str
    chain: tuple            # ((file, line), ...) innermost call first, the kernel's own line last

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def never(self) -> bool:
        """Predicated on !PT: issued, never executed (ptxas padding)."""
        return self.pred == "@!PT"


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def parse_sass(text: str) -> tuple[list[Instr], dict[str, int]]:
    """Instructions in address order and the index of the instruction each label precedes."""
    instrs, labels, chain, pending = [], {}, (), []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("//##"):
            pending.append(stripped)
            continue
        if pending:
            # One comment per inlining level: 'File A, line a inlined at B, line b', then
            # 'File B, line b inlined at ...', ..., then the kernel's own 'File K, line k'.
            # Line 0 is code the compiler made for no source line: it counts at its caller's.
            chain = tuple((f, int(n)) for f, n in (_FRAME.search(p).groups() for p in pending if _FRAME.search(p))
                          if int(n) > 0)
            pending = []
        label = re.match(r"^(\.L_x_\d+):", stripped)
        if label:
            labels[label.group(1)] = len(instrs)
            continue
        m = _INSTR.search(line)
        if not m:
            continue
        words = m.group(2).split(None, 1)
        pred = words[0] if words[0].startswith("@") else ""
        rest = (words[1] if pred else m.group(2)).split(None, 1)
        instrs.append(Instr(len(instrs), int(m.group(1), 16), pred, rest[0], rest[1] if len(rest) > 1 else "", chain))
    return instrs, labels


CLASSES = ("tensor", "fp32", "MUFU", "LDG", "STG", "LDS", "STS", "LDGSTS", "LDGDEPBAR", "BAR", "RED/ATOM", "other")
_CLASS_OF = {"HMMA": "tensor", "HGMMA": "tensor", "FFMA": "fp32", "FADD": "fp32", "FMUL": "fp32",
             "MUFU": "MUFU", "LDG": "LDG", "LD": "LDG", "STG": "STG", "ST": "STG", "LDS": "LDS", "LDSM": "LDS",
             "STS": "STS", "LDGSTS": "LDGSTS", "LDGDEPBAR": "LDGDEPBAR", "BAR": "BAR",
             "RED": "RED/ATOM", "REDG": "RED/ATOM", "ATOM": "RED/ATOM", "ATOMG": "RED/ATOM", "ATOMS": "RED/ATOM"}
GLOBAL_MEMORY = {"LDG": "load", "LD": "load", "LDGSTS": "load", "STG": "store", "ST": "store",
                 "RED": "atomic", "REDG": "atomic", "ATOM": "atomic", "ATOMG": "atomic"}
_FLOAT_TYPE = re.compile(r"^(BF16|F16|F32|F64)(x\d+)?$")


def instr_class(instr: Instr) -> str:
    return _CLASS_OF.get(instr.base, "other")


def is_float_atomic(opcode: str) -> bool:
    parts = opcode.split(".")
    return parts[0] in ("RED", "REDG", "ATOM", "ATOMG", "ATOMS") and any(_FLOAT_TYPE.match(p) for p in parts[1:])


def float_atomics(sass_text: str) -> list[str]:
    """The floating-point RED/ATOM instructions of a disassembly (empty if none)."""
    instrs, _ = parse_sass(sass_text)
    return [f"/*{i.addr:04x}*/ {i.pred + ' ' if i.pred else ''}{i.opcode} {i.operands}".strip()
            for i in instrs if is_float_atomic(i.opcode)]


def lane_bytes(instr: Instr) -> int:
    """Bytes one lane moves in a global memory instruction (from its width modifier)."""
    for part in instr.opcode.split(".")[1:]:
        m = _FLOAT_TYPE.match(part)
        if m:  # atomics: element type x vector width
            bits = {"BF16": 16, "F16": 16, "F32": 32, "F64": 64}[m.group(1)]
            return bits // 8 * int((m.group(2) or "x1")[1:])
        if part in ("128", "64"):
            return int(part) // 8
        if part in ("U8", "S8"):
            return 1
        if part in ("U16", "S16"):
            return 2
        if part in ("U64", "S64"):
            return 8
    return 4


_HMMA_SHAPES = {"1684": (16, 8, 4), "1688": (16, 8, 8), "16816": (16, 8, 16), "16832": (16, 8, 32), "884": (8, 8, 4)}


def tensor_op(instr: Instr) -> tuple[str, str, int] | None:
    """(kind, input type, FLOPs per warp-instruction) of an HMMA/HGMMA, else None.

    HMMA.MNK is one warp's m x n x k product; HGMMA.MxNxK is one warp group's
    (4 warps, each of which issues the instruction), so a warp's share is a quarter.
    """
    parts = instr.opcode.split(".")
    if parts[0] == "HMMA":
        m, n, k = _HMMA_SHAPES[parts[1]]
        return "mma.sync", parts[-1], 2 * m * n * k
    if parts[0] == "HGMMA":
        m, n, k = map(int, parts[1].split("x"))
        return "wgmma", parts[-1], 2 * m * n * k // 4
    return None


@dataclass(frozen=True)
class Loop:
    start: int              # index of the first instruction of the body (the label)
    end: int                # index of the backward branch
    label: str
    chain: tuple            # the branch's source chain

    def __contains__(self, index: int) -> bool:
        return self.start <= index <= self.end


def _target(instr: Instr, labels: dict[str, int]) -> int | None:
    m = re.search(r"`\((\.L_x_\d+)\)", instr.operands) if instr.base == "BRA" else None
    return labels[m.group(1)] if m else None


def code_end(instrs: list[Instr], labels: dict[str, int]) -> int:
    """Index of the padding after the code: ptxas ends a function with an
    unconditional branch to itself, then NOPs."""
    return next((i.index for i in instrs if not i.pred and _target(i, labels) == i.index), len(instrs))


def find_loops(instrs: list[Instr], labels: dict[str, int]) -> list[Loop]:
    """Backward branches, outermost first (the padding's self-branch is none)."""
    end, loops, names = code_end(instrs, labels), [], {v: k for k, v in labels.items()}
    for i in instrs:
        target = _target(i, labels)
        if target is not None and target <= i.index < end:
            loops.append(Loop(target, i.index, names[target], i.chain))
    return sorted(loops, key=lambda lp: (lp.start, -lp.end))


_IMM = re.compile(r"^-?(0x[0-9a-f]+|\d+)$")


def _imm(text: str) -> int | None:
    if text in ("RZ", "URZ"):
        return 0
    return int(text, 0) if _IMM.match(text) else None


def _ops(instr: Instr) -> list[str]:
    return [o.strip() for o in instr.operands.split(",")]


def _written(instr: Instr) -> set[str]:
    """Registers ``instr`` writes (its first operand, widened for 64/128-bit results)."""
    ops = _ops(instr)
    m = re.match(r"^(U?R)(\d+)$", ops[0]) if ops and ops[0] else None
    if not m or instr.base in ("STG", "ST", "STS", "STL", "RED", "REDG", "BRA", "EXIT", "BAR"):
        return set()
    parts = instr.opcode.split(".")
    width = 1
    if "128" in parts:
        width = 4
    elif "64" in parts or "WIDE" in parts or instr.base == "CS2R":
        width = 2
    elif instr.base == "HMMA":
        width = 4
    elif instr.base == "HGMMA":
        width = int(parts[1].split("x")[1]) // 2      # 64 x N fp32 over a warp group's 128 threads
    return {f"{m.group(1)}{int(m.group(2)) + k}" for k in range(width)}


def _constant_written(instr: Instr) -> int | None:
    """The constant ``instr`` writes to ``reg``, if it is a constant move (ptxas also
    builds small constants with HFMA2.MMA on half-precision pairs)."""
    ops = _ops(instr)
    if instr.base in ("MOV", "UMOV") and len(ops) >= 2:
        return _imm(ops[1])
    if instr.opcode.startswith("IMAD.MOV") and len(ops) == 4 and ops[1] in ("RZ", "URZ") and ops[2] in ("RZ", "URZ"):
        return _imm(ops[3])
    if instr.base == "CS2R" and ops[1:] == ["SRZ"]:
        return 0
    if instr.opcode == "HFMA2.MMA" and ops[1:3] == ["-RZ", "RZ"] and len(ops) == 5:
        try:
            hi, lo = (int(np.float16(float(x)).view(np.uint16)) for x in ops[3:5])
        except ValueError:
            return None
        return hi << 16 | lo
    return None


_COMPARE = {"LT": lambda a, b: a < b, "LE": lambda a, b: a <= b, "GT": lambda a, b: a > b,
            "GE": lambda a, b: a >= b, "EQ": lambda a, b: a == b, "NE": lambda a, b: a != b}


def sass_trip_count(instrs: list[Instr], loop: Loop) -> int | None:
    """Iterations of a loop read off its SASS, when its counter is plain: one compare
    against an immediate decides the backward branch, the counter is incremented by
    an immediate once per iteration and set to a constant before the loop. This is
    what the hardware runs, unrolled or peeled; None when the pattern is not there."""
    bra = instrs[loop.end]
    if not bra.pred or bra.pred in ("@PT", "@!PT"):
        return None
    negated, pred = bra.pred.startswith("@!"), bra.pred.lstrip("@!")
    body = instrs[loop.start:loop.end]
    compare = next((i for i in reversed(body) if i.base in ("ISETP", "UISETP") and ".EX" not in i.opcode
                    and _ops(i)[0] == pred), None)
    if compare is None:
        return None
    parts, ops = compare.opcode.split("."), _ops(compare)
    counter, bound = ops[2], _imm(ops[3])
    if bound is None or parts[1] not in _COMPARE or counter in ("RZ", "URZ"):
        return None
    writes = [i for i in body if counter in _written(i)]
    if len(writes) != 1 or writes[0].base not in ("IADD3", "UIADD3", "VIADD") or _ops(writes[0])[0] != counter:
        return None
    srcs = [o for o in _ops(writes[0])[1:] if not re.match(r"^!?U?P[T\d]$", o)]
    steps = [_imm(o) for o in srcs if o != counter and o not in ("RZ", "URZ")]
    if counter not in srcs or len(steps) != 1 or steps[0] in (None, 0):
        return None
    init = next((_constant_written(i) if _ops(i)[0] == counter else None
                 for i in reversed(instrs[:loop.start]) if counter in _written(i)), None)
    if init is None:
        return None
    step, after = steps[0], writes[0].index < compare.index
    unsigned, test = "U32" in parts, _COMPARE[parts[1]]
    for k in range(1, 10_000_000):
        v = init + step * (k if after else k - 1)
        v = v & 0xFFFFFFFF if unsigned else (v + 2**31) % 2**32 - 2**31
        if test(v, bound) == negated:      # the branch falls through: the loop ends
            return k
    return None


# ----------------------------------------------------------------------------
# The kernel's source: trip counts, branch weights and buffers, by evaluation.


class Unknown(Exception):
    """An expression that depends on data, not only on the launch."""


def _trip(start, stop, step):
    n = -(-(stop - start) // step)
    return np.maximum(n, 0) if isinstance(n, np.ndarray) else max(n, 0)


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b, ast.Div: lambda a, b: a / b,
           ast.Pow: lambda a, b: a ** b, ast.LShift: lambda a, b: a << b, ast.RShift: lambda a, b: a >> b,
           ast.BitAnd: lambda a, b: a & b, ast.BitOr: lambda a, b: a | b}
_CMPOPS = {ast.Eq: np.equal, ast.NotEq: np.not_equal, ast.Lt: np.less, ast.LtE: np.less_equal,
           ast.Gt: np.greater, ast.GtE: np.greater_equal}


class Launch:
    """One launch's view of its kernel's source: values of names per inlining frame.

    ``args``: the launch's keyword arguments (constexprs, ints; tensors are
    buffers, not values); ``grid``: the launch grid. Program ids are arrays
    over the flattened grid, so a pid-dependent value is an array of
    per-program values and everything else stays a Python scalar.
    """

    def __init__(self, args: dict, grid: tuple):
        self.args, self.grid = args, tuple(grid) + (1,) * (3 - len(grid))
        ids = np.meshgrid(*(np.arange(g) for g in self.grid), indexing="ij")
        self.pid = [a.reshape(-1) for a in ids]
        self.programs = int(np.prod(self.grid))
        self.unknown_branches: set = set()

    # -- source files
    @staticmethod
    @functools.lru_cache(maxsize=None)
    def tree(path: str) -> ast.Module:
        with open(path) as f:
            return ast.parse(f.read(), path)

    @classmethod
    def function_at(cls, path: str, line: int) -> ast.FunctionDef:
        best = None
        for node in ast.walk(cls.tree(path)):
            if isinstance(node, ast.FunctionDef) and node.lineno <= line <= node.end_lineno:
                if best is None or node.lineno > best.lineno:
                    best = node
        if best is None:
            raise LookupError(f"{path}:{line} is in no function")
        return best

    @staticmethod
    def call_into(caller: ast.FunctionDef, line: int, callee: str) -> ast.Call:
        calls = [n for n in ast.walk(caller) if isinstance(n, ast.Call) and n.lineno <= line <= n.end_lineno
                 and (getattr(n.func, "id", None) == callee or getattr(n.func, "attr", None) == callee)]
        if not calls:
            raise LookupError(f"no call of {callee} at line {line} of {caller.name}")
        return min(calls, key=lambda n: n.lineno)

    # -- values
    def value(self, node: ast.AST, env: dict):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in env:
                return env[node.id]
            raise Unknown(node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](self.value(node.left, env), self.value(node.right, env))
        if isinstance(node, ast.UnaryOp):
            v = self.value(node.operand, env)
            if isinstance(node.op, ast.USub):
                return -v
            if isinstance(node.op, ast.Not):
                return np.logical_not(v) if isinstance(v, np.ndarray) else not v
        if isinstance(node, ast.Compare):
            left, out = self.value(node.left, env), True
            for op, right in zip(node.ops, node.comparators):
                right = self.value(right, env)
                out = np.logical_and(out, _CMPOPS[type(op)](left, right))
                left = right
            return out if isinstance(out, np.ndarray) else bool(out)
        if isinstance(node, ast.BoolOp):
            vals = [self.value(v, env) for v in node.values]
            f = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
            return functools.reduce(f, vals)
        if isinstance(node, ast.IfExp):
            return np.where(self.value(node.test, env), self.value(node.body, env), self.value(node.orelse, env))
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            args = node.args
            if name == "program_id":
                return self.pid[self.value(args[0], env)]
            if name == "num_programs":
                return self.grid[self.value(args[0], env)]
            if name == "to" and isinstance(node.func, ast.Attribute):
                return self.value(node.func.value, env)
            vals = [self.value(a, env) for a in args]
            if name in ("minimum", "min"):
                return np.minimum(*vals) if any(isinstance(v, np.ndarray) for v in vals) else min(vals)
            if name in ("maximum", "max"):
                return np.maximum(*vals) if any(isinstance(v, np.ndarray) for v in vals) else max(vals)
            if name == "cdiv":
                return -(-vals[0] // vals[1])
            if name == "where":
                return np.where(*vals)
        raise Unknown(ast.dump(node)[:60])

    @staticmethod
    def _statements(fn: ast.FunctionDef):
        """fn's statements in source order, nested ones included."""
        def walk(body):
            for stmt in body:
                yield stmt
                for name in ("body", "orelse"):
                    if isinstance(getattr(stmt, name, None), list):
                        yield from walk(getattr(stmt, name))
        return walk(fn.body)

    @functools.lru_cache(maxsize=None)
    def _env(self, chain: tuple) -> dict:
        """Names known at chain[0] (its function's parameters, bound at the call sites
        of the frames above, and the locals assigned above its line)."""
        path, line = chain[0]
        fn = self.function_at(path, line)
        if len(chain) == 1:
            env = {k: v for k, v in self.args.items() if not isinstance(v, torch.Tensor)}
        else:
            caller_env = self._env(chain[1:])
            call = self.call_into(self.function_at(*chain[1]), chain[1][1], fn.name)
            env = {}
            params = [a.arg for a in fn.args.args]
            bound = list(zip(params, call.args)) + [(kw.arg, kw.value) for kw in call.keywords]
            for name, expr in bound:
                try:
                    env[name] = self.value(expr, caller_env)
                except Unknown:
                    pass
        for stmt in self._statements(fn):
            if stmt.lineno >= line:
                break
            targets = []
            if isinstance(stmt, ast.Assign):
                targets = stmt.targets
            elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign, ast.For)):
                targets = [stmt.target]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
            value = None
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and len(names) == 1 and stmt.value is not None:
                try:
                    value = self.value(stmt.value, env)
                except Unknown:
                    pass
            for name in names:
                env.pop(name, None)
            if value is not None:
                env[names[0]] = value
        return env

    def _range(self, node: ast.For, chain: tuple):
        """Trip count of the source loop ``node``; chain[0] is its own line."""
        it = node.iter
        name = (getattr(it.func, "attr", None) or getattr(it.func, "id", None)) if isinstance(it, ast.Call) else None
        if name not in ("range", "static_range"):
            raise LookupError(f"{chain[0][0]}:{node.lineno}: a loop over {ast.dump(it)[:40]}, not a range")
        env = self._env(chain)
        try:
            vals = [self.value(a, env) for a in it.args[:3]]
        except Unknown as e:
            raise LookupError(f"{chain[0][0]}:{node.lineno}: the trip count depends on {e}, not on the launch") from e
        start, stop, step = (0, vals[0], 1) if len(vals) == 1 else (vals + [1])[:3]
        return _trip(start, stop, step)

    def trip_count(self, loop: Loop):
        """Iterations of a SASS loop per entry: the range of the ``for`` statement on
        its backward branch's line (the innermost frame that is one)."""
        for k, (path, line) in enumerate(loop.chain):
            fors = [n for n in ast.walk(self.function_at(path, line)) if isinstance(n, ast.For) and n.lineno == line]
            if fors:
                return self._range(fors[0], loop.chain[k:])
        raise LookupError(f"loop {loop.label}: its branch's lines {loop.chain} hold no for statement")

    @functools.lru_cache(maxsize=None)
    def source_trips(self, chain: tuple):
        """How often the source code at ``chain`` runs per program: the product of the
        ranges of every ``for`` around it, in every inlined frame (unrolled or not)."""
        trips = 1
        for k, (path, line) in enumerate(chain):
            for node in ast.walk(self.function_at(path, line)):
                if isinstance(node, ast.For) and node.body[0].lineno <= line <= node.body[-1].end_lineno:
                    trips = trips * self._range(node, ((path, node.lineno),) + chain[k + 1:])
        return trips

    @functools.lru_cache(maxsize=None)
    def branch_weight(self, chain: tuple):
        """1, 0, or per-program 0/1: whether the source ``if``s around ``chain`` are taken."""
        weight = 1
        for k, (path, line) in enumerate(chain):
            fn = self.function_at(path, line)
            for node in ast.walk(fn):
                if not isinstance(node, ast.If):
                    continue
                in_body = node.body[0].lineno <= line <= node.body[-1].end_lineno
                in_else = bool(node.orelse) and node.orelse[0].lineno <= line <= node.orelse[-1].end_lineno
                if not (in_body or in_else):
                    continue
                try:
                    test = self.value(node.test, self._env(((path, node.lineno),) + chain[k + 1:]))
                except (Unknown, LookupError):
                    self.unknown_branches.add((path, node.lineno))
                    continue
                taken = test if in_body else np.logical_not(test)
                weight = weight * (taken.astype(np.int64) if isinstance(taken, np.ndarray) else int(bool(taken)))
        return weight

    @functools.lru_cache(maxsize=None)
    def buffer(self, chain: tuple, kind: str) -> str | None:
        """The pointer argument a memory instruction at ``chain`` addresses, if the
        source says: the first argument of the tl.load/store/atomic on its line,
        followed to the kernel's parameter through locals and inlined calls
        (a pointer expression's base is the leftmost term of its sum)."""
        path, line = chain[0]
        fn = self.function_at(path, line)
        wanted = {"load": ("load",), "store": ("store",)}.get(kind, ("atomic_add", "atomic_max", "atomic_min",
                                                                     "atomic_xchg", "atomic_cas", "atomic_and",
                                                                     "atomic_or", "atomic_xor"))
        calls = sorted((n for n in ast.walk(fn) if isinstance(n, ast.Call) and n.lineno <= line <= n.end_lineno
                        and getattr(n.func, "attr", None) in wanted and n.args), key=lambda n: -n.lineno)
        try:
            return self._base(chain, calls[0].args[0]) if calls else None
        except LookupError:
            return None

    def _base(self, chain: tuple, node: ast.AST, depth: int = 0) -> str | None:
        while True:
            if isinstance(node, ast.BinOp):
                node = node.left
            elif isinstance(node, (ast.Subscript, ast.Attribute)):
                node = node.value
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "to":
                node = node.func.value
            else:
                break
        if not isinstance(node, ast.Name) or depth > 20:
            return None
        path, line = chain[0]
        fn = self.function_at(path, line)
        assigns = [s for s in self._statements(fn) if isinstance(s, (ast.Assign, ast.AnnAssign))
                   and s.lineno < line and any(isinstance(t, ast.Name) and t.id == node.id
                                               for t in (s.targets if isinstance(s, ast.Assign) else [s.target]))]
        if assigns:
            return self._base(((path, assigns[-1].lineno),) + chain[1:], assigns[-1].value, depth + 1)
        params = [a.arg for a in fn.args.args]
        if node.id not in params:
            return None
        if len(chain) == 1:
            return node.id if isinstance(self.args.get(node.id), torch.Tensor) else None
        call = self.call_into(self.function_at(*chain[1]), chain[1][1], fn.name)
        i = params.index(node.id)
        expr = call.args[i] if i < len(call.args) else next((kw.value for kw in call.keywords if kw.arg == node.id),
                                                             None)
        return self._base(chain[1:], expr, depth + 1) if expr is not None else None


# ----------------------------------------------------------------------------
# The dots of the TTGIR: what the tensor pipe must execute, independently of the SASS.


def _loc_chains(ir: str):
    """Resolver of MLIR location aliases to source chains, innermost call first."""
    aliases = dict(re.findall(r"^(#loc\d*) = loc\((.*)\)$", ir, re.M))

    @functools.lru_cache(maxsize=None)
    def chain(body: str) -> tuple:
        if body in aliases:
            return chain(aliases[body])
        m = re.fullmatch(r'"([^"]+)":(\d+):\d+', body)
        if m:
            return ((m.group(1), int(m.group(2))),)
        m = re.fullmatch(r"callsite\((#loc\d*) at (#loc\d*)\)", body)
        if m:
            return chain(m.group(1)) + chain(m.group(2))
        m = re.fullmatch(r'"[^"]*"\((#loc\d*)\)', body) or re.fullmatch(r"fused\[(#loc\d*).*", body)
        return chain(m.group(1)) if m else ()
    return chain


@dataclass(frozen=True)
class Dot:
    """One tt.dot / warp_group_dot of the TTGIR: (M, N) += (M, K) @ (K, N) on an MMA layout."""

    M: int
    N: int
    K: int
    replication: float      # how many warps compute each output: warps x instruction tile / tile, per dim
    chain: tuple


def ttgir_dots(ttgir: str) -> list[Dot]:
    """The MMA dots of a kernel's TTGIR (bf16x3's three dots each);
    FMA dots (fp32, input_precision "ieee") run on the FP32 pipe and are left out."""
    layouts = {name: (list(map(int, warps.split(","))), list(map(int, instr.split(","))))
               for name, warps, instr in re.findall(
                   r"^(#mma\d*) = #ttg\.nvidia_mma<\{.*?warpsPerCTA = \[([\d, ]+)\].*?instrShape = \[([\d, ]+)\]",
                   ttgir, re.M)}
    chain = _loc_chains(ttgir)
    dots = []
    for line in ttgir.splitlines():
        if not re.search(r"= (ttng\.warp_group_dot|tt\.dot) ", line):
            continue
        operands = line.split(" : ", 1)[1]
        m_k = re.search(r"<(\d+)x(\d+)x", operands)
        out = re.search(r"-> tensor<(\d+)x(\d+)x\w+, (#\w+)>", operands)
        loc = re.search(r"loc\((#loc\d*)\)\s*$", line)
        if not (m_k and out and loc) or out.group(3) not in layouts:
            continue
        M, N, K = int(out.group(1)), int(out.group(2)), int(m_k.group(2))
        (wm, wn), (im, i_n) = layouts[out.group(3)][0][:2], layouts[out.group(3)][1][:2]
        dots.append(Dot(M, N, K, max(1.0, wm * im / M) * max(1.0, wn * i_n / N), chain(loc.group(1))))
    return dots


def _bracketed(text: str, start: int) -> str:
    """text[start:] up to the '>' that closes the '<' at text[start - 1]."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"<": 1, ">": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    raise ValueError(f"unbalanced <> in {text[start - 1:start + 80]!r}")


def _ints(text: str, key: str) -> list[int]:
    return [int(v) for v in re.search(key + r" = \[([\d, ]*)\]", text).group(1).split(",") if v.strip()]


def lane_bases(layout: str, shape: list[int], aliases: dict) -> list[list[int]] | None:
    """The lane bases of a distributed TTGIR layout on ``shape`` (Triton's linear layout:
    the element offsets, per dim, that each of the 5 lane-id bits adds; a zero basis
    means the lanes differing in that bit hold the same elements), or None if the
    layout is not one this model reads. Blocked layouts: lanes stride by
    sizePerThread, fastest dim in ``order`` first; Hopper and Ampere MMA layouts
    (accumulators): a warp is 8 rows x 4 lane pairs of columns; a slice is its
    parent on the shape with the sliced dim of size 1, which zeroes that dim's
    bases; a basis reaching past the shape is zero (broadcast)."""
    layout = layout.strip()
    if layout in aliases:
        return lane_bases(aliases[layout], shape, aliases)
    kind = re.match(r"#ttg\.(\w+)<", layout)
    if not kind:
        return None
    body = _bracketed(layout, kind.end())
    rank = len(shape)

    def basis(dim, value):
        return [value if d == dim and value < shape[d] else 0 for d in range(rank)]
    if kind.group(1) == "blocked":
        spt, tpw, order = _ints(body, "sizePerThread"), _ints(body, "threadsPerWarp"), _ints(body, "order")
        return [basis(d, spt[d] << i) for d in order for i in range(tpw[d].bit_length() - 1)]
    if kind.group(1) == "nvidia_mma" and rank == 2:
        return [basis(1, 2), basis(1, 4), basis(0, 1), basis(0, 2), basis(0, 4)]
    if kind.group(1) == "linear":
        lanes = re.search(r"lane = \[(.*?)\], warp =", body).group(1)
        return [[int(v) for v in b.split(",")] for b in re.findall(r"\[([\d, ]+)\]", lanes)]
    if kind.group(1) == "slice":
        dim = int(re.search(r"dim = (\d+)", body).group(1))
        parent_layout = body.split("parent = ", 1)[1].rstrip()[:-1]          # up to the body's closing brace
        parent = lane_bases(parent_layout, shape[:dim] + [1] + shape[dim:], aliases)
        return None if parent is None else [b[:dim] + b[dim + 1:] for b in parent]
    return None


def ttgir_memory_replication(ttgir: str) -> dict[tuple, int]:
    """Source chain -> how many lanes of a warp request each element in the global loads,
    stores and async copies there (the smallest over the ops of that chain): 2 ^ (zero
    lane bases) of the pointer tensor's layout, WARP for a scalar pointer (every lane
    requests the one address). The L2 serves one request per distinct address of a
    warp-instruction, so these lanes' bytes count once."""
    aliases = dict(re.findall(r"^(#\w+) = (#ttg\.\w+<.*>)\s*$", ttgir, re.M))
    chain = _loc_chains(ttgir)
    out: dict[tuple, int] = {}
    for line in ttgir.splitlines():
        if not re.search(r"\b(tt\.load|tt\.store|ttg\.async_copy_global_to_local) ", line):
            continue
        loc = re.search(r"loc\((#loc\d*)\)\s*$", line)
        if not loc or " : " not in line:
            continue
        types = line.rsplit(" loc(", 1)[0].split(" : ", 1)[1]
        at = types.find("tensor<")
        if at < 0:
            factor = WARP if types.lstrip().startswith("!tt.ptr") else 1
        else:
            text = _bracketed(types, at + len("tensor<"))
            dims, layout = re.match(r"((?:\d+x)+)!tt\.ptr<\w+>, (.*)$", text).groups()
            bases = lane_bases(layout, [int(d) for d in dims.rstrip("x").split("x")], aliases)
            factor = 1 if bases is None else 2 ** sum(not any(b) for b in bases)
        key = chain(loc.group(1))
        out[key] = min(out.get(key, factor), factor)
    return out


def dot_flops(dots: list[Dot], launch: "Launch", replicated: bool = True) -> float:
    """FLOPs of ``dots`` over the launch grid, each dot times the source loops around it."""
    total = 0.0
    for d in dots:
        w = launch.source_trips(d.chain) * launch.branch_weight(d.chain)
        runs = float(np.sum(w)) if isinstance(w, np.ndarray) else w * launch.programs
        total += 2 * d.M * d.N * d.K * (d.replication if replicated else 1) * runs
    return total


# ----------------------------------------------------------------------------
# Counting one kernel.


@dataclass
class KernelModel:
    """Dynamic counts of one launch, summed over its grid (warp-instructions)."""

    name: str
    arch: int
    precision: str
    grid: tuple
    num_warps: int
    registers: int
    shared_bytes: int
    sass: str
    num_ctas: int = 1                                  # CTAs per program (a cluster), each running the SASS
    loops: list = field(default_factory=list)          # (Loop, trips, its range's trips, from the SASS?, size)
    counts: dict = field(default_factory=dict)         # class -> warp-instructions over the grid
    issue: float = 0.0                                 # every warp-instruction over the grid
    per_program: np.ndarray | None = None              # warp-instructions of each program (all its warps)
    tensor_flops: dict = field(default_factory=dict)   # (kind, type) -> FLOPs over the grid
    fp32_flops: float = 0.0                            # FFMA 2, FADD/FMUL 1 per lane
    l2_bytes: dict = field(default_factory=dict)       # buffer -> bytes of global requests
    touched: dict = field(default_factory=dict)        # buffer -> {"load", "store", "atomic"}
    dot_flops: float = 0.0                             # the TTGIR's MMA dots x replication x source trips
    useful_dot_flops: float = 0.0                      # the same without replication
    float_atomics: list = field(default_factory=list)  # static SASS lines
    atomics_executed: float = 0.0                      # dynamic float RED/ATOM warp-instructions
    unknown_branches: set = field(default_factory=set)


def analyze(fn, kwargs: dict, grid: tuple, arch: int) -> KernelModel:
    """Compile ``fn`` for sm_<arch> with a launch's keyword arguments and count its
    instructions weighted by loop trip counts and branch weights over ``grid``."""
    compiled, res = aot.compile_kernel(fn, kwargs, arch)
    sass = disassemble(cubin_with_source_lines(compiled, arch))
    launch = Launch(kwargs, grid)
    model = count(sass, launch, KernelModel(fn.__name__, arch, str(kwargs.get("PRECISION", "-")), tuple(grid),
                                            res.num_warps, res.registers, res.shared_bytes, sass,
                                            kwargs.get("num_ctas", 1)),
                  ttgir_memory_replication(compiled.asm["ttgir"]))
    dots = ttgir_dots(compiled.asm["ttgir"])
    model.dot_flops, model.useful_dot_flops = dot_flops(dots, launch), dot_flops(dots, launch, replicated=False)
    return model


def count(sass: str, launch: Launch, model: KernelModel, replication: dict | None = None) -> KernelModel:
    """Fill ``model`` from a disassembly: each instruction once per program, times the
    trips of the SASS loops around it and the weight of the source ``if``s around it.
    replication: ``ttgir_memory_replication``'s, by which a memory instruction's lane
    bytes are divided (its chain's, else the smallest on its innermost line, else 1)."""
    replication = replication or {}
    by_line: dict = {}
    for chain, factor in replication.items():
        by_line[chain[:1]] = min(by_line.get(chain[:1], factor), factor)
    instrs, labels = parse_sass(sass)
    loops = find_loops(instrs, labels)
    trips, source, counted = {}, {}, {}
    for lp in loops:
        counted[lp] = sass_trip_count(instrs, lp)
        try:
            source[lp] = launch.trip_count(lp)
        except LookupError:
            if counted[lp] is None:
                raise
            source[lp] = None
        trips[lp] = source[lp] if counted[lp] is None else counted[lp]
    model.loops = [(lp, trips[lp], source[lp], counted[lp] is not None, lp.end - lp.start + 1) for lp in loops]
    end = code_end(instrs, labels)
    groups: dict = defaultdict(list)
    for i in instrs:
        if i.index >= end:
            continue
        groups[(tuple(lp for lp in loops if i.index in lp), i.chain)].append(i)
    per_program = np.zeros(launch.programs)
    G, warps = launch.programs, model.num_warps
    counts, tflops, l2 = Counter(), Counter(), Counter()
    for (inside, chain), members in groups.items():
        w = launch.branch_weight(chain) if chain else 1
        for lp in inside:
            w = w * trips[lp]
        per_program += len(members) * w
        total = model.num_ctas * warps * (float(np.sum(w)) if isinstance(w, np.ndarray) else w * G)
        if total == 0:
            continue
        for i in members:
            model.issue += total
            if i.never:
                continue
            cls = instr_class(i)
            counts[cls] += total
            op = tensor_op(i)
            if op:
                tflops[op[:2]] += total * op[2]
            if cls == "fp32":
                model.fp32_flops += total * WARP * (2 if i.base == "FFMA" else 1)
            kind = GLOBAL_MEMORY.get(i.base)
            if kind:
                buf = (launch.buffer(chain, kind) if chain else None) or "(unattributed)"
                lanes = WARP / replication.get(chain, by_line.get(chain[:1], 1))
                l2[buf] += total * lanes * lane_bytes(i)
                model.touched.setdefault(buf, set()).add(kind)
            if is_float_atomic(i.opcode):
                model.atomics_executed += total
    model.per_program = per_program * warps
    model.counts, model.tensor_flops, model.l2_bytes = dict(counts), dict(tflops), dict(l2)
    model.float_atomics = float_atomics(sass)
    model.unknown_branches = set(launch.unknown_branches)
    return model


# ----------------------------------------------------------------------------
# The training step at a config: launches exactly as the Triton engine makes them.


def step_launches(cfg, precision: str, arch: int, M: int, D: int, programs: int,
                  options: Options = Options(), num_ctas: int = 1) -> list[tuple[object, tuple, dict]]:
    """(kernel, grid, keyword arguments) of the four launches of one step of M models
    with D examples each, as the Triton engine's ``_DeviceState`` builds them (meta tensors
    stand in for the device buffers: only shapes and dtypes matter here). num_ctas > 1: the
    example kernel as clusters of that many CTAs (Triton's num_ctas, sm_90; not what the
    engine launches), programs / num_ctas of them. Each model's
    examples are D of the n^2 pairs drawn at random (seed 0), as a task's training set
    is, so launch 3's per-element loops run as long as a real population's longest."""
    meta = "meta"
    L = Layout.from_config(cfg)
    n = L.rows.n
    if not 1 <= D <= n * n:
        raise ValueError(f"D={D} examples per model: a task of n={n} elements has 1..{n * n} pairs")
    params = torch.empty(M, L.P, device=meta)
    rng = np.random.default_rng(0)
    pairs = torch.as_tensor(np.stack([rng.choice(n * n, size=D, replace=False) for _ in range(M)]))
    x, y = pairs // n, pairs % n
    t = options.for_precision(precision, arch)
    tiles = Tiles.build(np.full(M, D), x, y, n, t["block_n"], t["group_tiles"], "cpu")
    ws = Workspace.allocate(L, M, D, tiles.count, meta, precision=precision)
    data = torch.empty(M, D, dtype=torch.int64, device=meta)
    scratch = allocate_scratch(L, min(programs // num_ctas, tiles.count), precision, t["block_n"], meta)
    lr = torch.empty(M, dtype=torch.float64, device=meta)
    g1, tf = tables_forward_args(L, params, ws, precision, block_k=t["block_k"], arch=arch)
    g2, ex = examples_args(L, params, ws, scratch, data, data, data, torch.empty(M, D, device=meta), tiles,
                           precision, arch=arch, **t)
    if num_ctas > 1:
        ex["num_ctas"] = num_ctas
    g3, rd = reduce_args(L, params, ws, tiles, D, arch=arch)
    g4, ad = adamw_args(L, params, params, params, params, lr, lr, torch.empty(M, dtype=torch.int32, device=meta),
                        torch.empty(4, dtype=torch.float64, device=meta), ws, (0.9, 0.98), 1e-8, arch=arch)
    return [(tables_forward_kernel, g1, tf), (examples_kernel, g2, ex), (reduce_kernel, g3, rd),
            (adamw_kernel, g4, ad)]


def _pad(n: int, block: int) -> int:
    return -(-n // block) * block


def expected_matmul_flops(name: str, kw: dict, grid: tuple, L: Layout) -> int:
    """FLOPs (2 per product) of every tl.dot of a launch, by hand from the kernel's
    loops, padded to the blocks it computes: the reference for the cross-check.
    Dimensions come from the layout, block sizes from the launch's arguments."""
    D, H, F, V, BDH = L.D, L.H, L.F, L.V, L.block_dh
    HD, n = H * L.Dh, L.rows.n
    if name == "tables_forward_kernel":
        # per head, K and V: (BLOCK_R, BLOCK_DH) += (BLOCK_R, BLOCK_K) @ (BLOCK_K, BLOCK_DH)
        per_program = H * 2 * kw["BLOCK_R"] * BDH * _pad(D, kw["BLOCK_K"])
        return 2 * per_program * int(np.prod(grid))
    if name == "examples_kernel":
        N, C, K, BD, DC, G = kw["BLOCK_N"], kw["BLOCK_C"], kw["BLOCK_K"], kw["BLOCK_D"], kw["BLOCK_DC"], kw["BLOCK_G"]
        BV = kw["BLOCK_V"]

        def out(J, Kd, BJ=C):   # (BLOCK_N, J) = (BLOCK_N, Kd) @ (Kd, J), J in chunks of BJ, Kd of BLOCK_K
            return N * _pad(J, BJ) * _pad(Kd, K)

        def wgrad(I, J, BI, BJ):  # (I, J) = A^T B over the tile's BLOCK_N examples, BI x BJ chunks
            return _pad(I, BI) * _pad(J, BJ) * _pad(N, K)

        if kw["FUSED_MLP"]:     # BLOCK_C hidden units at a time against the whole residual width BLOCK_D
            FC = _pad(F, C)
            mlp = (2 * N * FC * BD                                      # hidden, resid_fin
                   + 5 * N * FC * BD)                                   # hidden again, dhidden, dW_out, dW_in,
                                                                        # d resid_mid
        else:                   # chained products, BLOCK_C columns at a time
            mlp = (out(F, D) + out(D, F)                                # hidden, resid_fin
                   + wgrad(F, D, G, C) + out(F, D) + wgrad(D, F, G, C) + out(D, F))  # dW_out, dpre, dW_in, d resid_mid
        passes = 1 if kw["ONE_PASS"] else 2                             # the logits once, or twice
        per_tile = (out(D, HD, DC) + mlp + passes * out(V, D, BV)       # resid_mid, MLP, logits
                    + wgrad(D, V, G, BV) + out(D, V, DC)                # dW_U, dresid
                    + wgrad(HD, D, G, DC)                               # dW_O
                    + H * N * BDH * (BD if kw["STAGE_TILES"] else _pad(D, K)))  # dz, per head
        # every tile slot of every group, as the SASS count takes the data-dependent
        # ``if start < size`` (exact when D is a multiple of BLOCK_N x GROUP_TILES)
        return 2 * per_tile * kw["n_groups"] * kw["GROUP_TILES"]
    if name == "reduce_kernel":
        return 0
    if name == "adamw_kernel":  # block 0 of each model: kernels.tables_backward
        BR, C = kw["BLOCK_R"], kw["BLOCK_C"]
        dW_V = _pad(D, C) * _pad(HD, C) * _pad(n + 4, BR)   # A^T B over the n + 4 folded rows
        folded_dR = H * BR * C * BDH                       # one _folded_dR: B W_V^T per head
        dR = -(-D // C) * ((-(-n // BR) + 1) * folded_dR + H * BR * C * BDH)   # element rows, 4 others, dq W_Q^T
        return 2 * (dW_V + dR) * grid[0] if kw["WITH_TABLE_GRADS"] else 0
    raise KeyError(name)


PRODUCTS_PER_DOT = {"fp32": 0, "bf16x3": 3, "tf32": 1, "bf16": 1}


def cross_check(model: KernelModel, kwargs: dict, precision: str, layout: Layout, per: int = 1) -> tuple[bool, str]:
    """(passed, text): the tensor FLOPs counted in the SASS must equal the TTGIR's
    dots x their warp replication x their source loops, and those dots without
    replication the kernel's matmul FLOPs by hand (x3 for bf16x3). ``precision``: the
    population's; the table kernels compute in fp32 whatever it is. ``per``:
    divisor for the figures printed (models, for per model-step)."""
    sass = sum(model.tensor_flops.values())
    matmul = expected_matmul_flops(model.name, kwargs, model.grid, layout)
    precision = kwargs.get("PRECISION", "fp32")
    if precision == "fp32":
        ok = sass == 0 and model.dot_flops == 0 and model.fp32_flops >= matmul
        return ok, (f"no tensor instructions; FP32-pipe FLOPs {model.fp32_flops / per:.4g} >= matmul FLOPs "
                    f"{matmul / per:.4g}")
    want = matmul * PRODUCTS_PER_DOT[precision]
    exact = abs(sass - model.dot_flops) <= 1e-9 * max(sass, 1)
    useful = abs(model.useful_dot_flops - want) <= 1e-9 * max(want, 1)
    text = (f"tensor FLOPs {sass / per:.6g} {'=' if exact else '!='} TTGIR dots x replication "
            f"{model.dot_flops / per:.6g}; = {sass / want:.4f} x matmul FLOPs {want / per:.6g} "
            f"({'=' if useful else '!='} TTGIR dots unreplicated)")
    return exact and useful, text


# ----------------------------------------------------------------------------
# Estimates.


def hbm_bytes(model: KernelModel, kwargs: dict) -> float:
    """Each buffer once per direction it is used in (whole), capped at its L2 bytes;
    unattributed requests are all counted."""
    out = 0.0
    for buf, nbytes in model.l2_bytes.items():
        t = kwargs.get(buf)
        if not isinstance(t, torch.Tensor):
            out += nbytes
            continue
        kinds = model.touched[buf]
        directions = ("load" in kinds or "atomic" in kinds) + ("store" in kinds or "atomic" in kinds)
        out += min(nbytes, directions * t.numel() * t.element_size())
    return out


def schedule(per_program: np.ndarray, grid: tuple, warps: int, gpu: GPU) -> float:
    """Seconds to issue every program's warp-instructions: programs go in launch order
    (blockIdx.x fastest) to the SM with the least work so far (the block scheduler
    fills SMs as they free up); an SM issues REALISTIC_IPC per scheduler, one
    program at most on as many schedulers as it has warps."""
    grid = tuple(grid) + (1,) * (3 - len(grid))
    loads = [(0.0, sm) for sm in range(gpu.sms)]
    for work in per_program.reshape(grid).transpose(2, 1, 0).reshape(-1):
        load, sm = heapq.heappop(loads)
        heapq.heappush(loads, (load + work, sm))
    clk = gpu.clock_ghz * 1e9
    busiest = max(load for load, _ in loads) / (gpu.schedulers * REALISTIC_IPC * clk)
    return max(busiest, float(per_program.max()) / (min(warps, gpu.schedulers) * REALISTIC_IPC * clk))


TIMES = ("tensor", "fp32", "MUFU", "issue_ipc1", "issue_real", "L2", "HBM", "schedule")


def kernel_times(model: KernelModel, kwargs: dict, gpu: GPU) -> dict:
    """Seconds of each bound of one launch on ``gpu``, the estimate (the largest but
    issue_ipc1, a floor) and the bytes behind them."""
    clk = gpu.clock_ghz * 1e9
    l2, hbm = sum(model.l2_bytes.values()), hbm_bytes(model, kwargs)
    issue1 = model.issue / (gpu.schedulers * gpu.sms * clk)
    t = {"tensor": sum(fl / (gpu.tensor[key] * gpu.sms * clk) for key, fl in model.tensor_flops.items()),
         "fp32": model.counts.get("fp32", 0) * WARP / (gpu.fp32_lanes * gpu.sms * clk),
         "MUFU": model.counts.get("MUFU", 0) * WARP / (gpu.mufu_lanes * gpu.sms * clk),
         "issue_ipc1": issue1, "issue_real": issue1 / REALISTIC_IPC,
         "L2": l2 / (gpu.l2_tbs * 1e12), "HBM": hbm / (gpu.hbm_tbs * 1e12),
         # a cluster's CTAs run side by side, one per SM: programs go to groups of num_ctas SMs
         "schedule": schedule(model.per_program, model.grid, model.num_warps,
                              replace(gpu, sms=gpu.sms // model.num_ctas))}
    bound = max((k for k in TIMES if k != "issue_ipc1"), key=t.get)
    return dict(t, estimate=t[bound], bound=bound, l2_bytes=l2, hbm_bytes=hbm)


def torch_engine(cfg, D: int, gpu: GPU) -> list[dict]:
    """The batched torch engine per model-step: GEMM FLOPs at CUBLAS_EFFICIENCY, and
    the HBM bytes of its activations and weights (M models' chunks never fit in L2)."""
    L = Layout.from_config(cfg)
    flops = flops_per_model_step(cfg, D)
    chunks = -(-D // CHUNK)
    ex_params = L.P - L.offsets["W_O"]
    nbytes = {
        # the torch engine's own count of a chunk's activations (its CHUNK comment), written once, read once
        "activations": 2 * FP32 * D * (3 * cfg.d_mlp + 6 * cfg.d_model + 3 * cfg.d_vocab),
        # per chunk: read W_O..W_U, read and write their gradients (baddbmm_)
        "weights per chunk": chunks * 3 * FP32 * ex_params,
        # row tables K, V, S, R_tab, dV, dS written and read once per step
        "tables": 2 * FP32 * L.R * (3 * L.H * L.Dh + 2 * L.H + L.D),
        # fused AdamW: read p, g, m, v; write p, m, v
        "adamw": 7 * FP32 * L.P,
    }
    hbm = sum(nbytes.values())
    clk = gpu.clock_ghz * 1e9
    rates = {"fp32": gpu.fp32_lanes * 2 * gpu.sms * clk,
             "tf32": tensor_peak(gpu, "TF32")}
    rows = []
    for mode, rate in rates.items():
        t = {"gemm": flops / (rate * CUBLAS_EFFICIENCY[mode]), "HBM": hbm / (gpu.hbm_tbs * 1e12)}
        bound = max(t, key=t.get)
        rows.append(dict(mode=mode, flops=flops, hbm_bytes=hbm, parts=nbytes, **t, estimate=t[bound], bound=bound))
    return rows


def tensor_peak(gpu: GPU, operand_type: str) -> float:
    """FLOP/s of the tensor cores on ``operand_type`` inputs: wgmma's rate where the GPU has it."""
    kind = "wgmma" if ("wgmma", operand_type) in gpu.tensor else "mma.sync"
    return gpu.tensor[(kind, operand_type)] * gpu.sms * gpu.clock_ghz * 1e9


# What any implementation pays, whatever its kernels.
OPERAND_TYPE = {"bf16": "BF16", "bf16x3": "BF16", "tf32": "TF32"}
ADAMW_BYTES_PER_PARAM = 6 * FP32  # p, m1 and m2 read and written once, in fp32 as torch.optim.AdamW keeps them


def floors(cfg, D: int, M: int, gpu: GPU, precision: str) -> dict:
    """Seconds per model-step that no implementation of the step beats on ``gpu``.

    tensor: the examples' matmul FLOPs (the products with W_O, W_in, W_out and W_U,
    forward and backward, nothing recomputed; three products each for bf16x3; not the row
    tables, which folding shrinks) at the peak rate of the precision's input type (wgmma
    where the GPU has it; FP32 FMA lanes for fp32). adamw: each parameter's fp32 p, m1 and m2
    read and written once, over HBM when the M models' state (12 B a parameter) exceeds
    L2, else over L2. Launches that run one after another pay both (in_sequence); a step
    whose AdamW traffic hid entirely behind other models' matmuls would pay the larger
    (overlapped)."""
    L = Layout.from_config(cfg)
    if precision == "fp32":  # no tensor products: one FMA a multiply-add
        flops, rate = D * flops_per_example(cfg), gpu.fp32_lanes * 2 * gpu.sms * gpu.clock_ghz * 1e9
    else:
        flops = D * flops_per_example(cfg) * PRODUCTS_PER_DOT[precision]
        rate = tensor_peak(gpu, OPERAND_TYPE[precision])
    state = ADAMW_BYTES_PER_PARAM * L.P
    in_hbm = M * 3 * FP32 * L.P > gpu.l2_mb * 1e6
    t = {"tensor": flops / rate, "adamw": state / ((gpu.hbm_tbs if in_hbm else gpu.l2_tbs) * 1e12)}
    return dict(t, in_sequence=t["tensor"] + t["adamw"], overlapped=max(t.values()), flops=flops,
                adamw_bytes=state, adamw_memory="HBM" if in_hbm else "L2")


# ----------------------------------------------------------------------------
# Command line.


COLUMNS = (("tensor", "tensor", 1e6), ("fp32", "fp32", 1e6), ("issue@1", "issue_ipc1", 1e6),
           (f"issue@{REALISTIC_IPC}", "issue_real", 1e6), ("L2 MB", "l2_bytes", 1e-6), ("L2", "L2", 1e6),
           ("HBM MB", "hbm_bytes", 1e-6), ("HBM", "HBM", 1e6), ("sched", "schedule", 1e6),
           ("estimate", "estimate", 1e6))


def _row(label: str, t: dict, per: int, tail: str) -> str:
    return f"  {label:<22}" + "".join(f"{t[key] / per * scale:10.3f}" for _, key, scale in COLUMNS) + f"  {tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", help="model config preset (default: paper)")
    parser.add_argument("--arch", default="90", choices=["80", "90", "all"], help="compute capability x10")
    parser.add_argument("--train-size", type=int, default=2000, help="examples per model, D (default 2000)")
    parser.add_argument("--models", type=int, default=200, help="models in the population, M (default 200)")
    parser.add_argument("--precision", default="all", choices=list(PRECISIONS) + ["all"])
    parser.add_argument("--loops", action="store_true", help="also print each kernel's SASS loops and trip counts")
    parser.add_argument("--csv", help="write every figure as a long-format CSV row to this file")
    parser.add_argument("--num-ctas", type=int, default=1, choices=[1, 2, 4],
                        help="the example kernel as clusters of this many CTAs (Triton's num_ctas, sm_90 only; "
                             "the engine launches 1), for exploring; default 1")
    parser.add_argument("--tiling", default="",
                        help="the example kernel's tiles, e.g. block_n=128,block_c=32,stage_tiles=0 "
                             "(default: the precision's, fastgrok.kernels.examples.TILINGS)")
    args = parser.parse_args(argv)
    try:
        tiling = {k: (v == "1") if k in ("fused_mlp", "stage_tiles", "one_pass") else int(v)
                  for k, v in (item.split("=") for item in args.tiling.split(",") if item)}
        options = Options(**tiling)
    except (ValueError, TypeError) as e:
        parser.error(f"--tiling {args.tiling!r}: {e} (keys: block_n, block_c, block_v, block_g, block_k, group_tiles, "
                     "fused_mlp=0|1, stage_tiles=0|1, one_pass=0|1)")
    cfg = get_preset(args.preset).model
    layout = Layout.from_config(cfg)
    M, D = args.models, args.train_size
    archs = [80, 90] if args.arch == "all" else [int(args.arch)]
    if args.num_ctas > 1 and archs != [90]:
        parser.error(f"--num-ctas {args.num_ctas} needs --arch 90 (clusters are sm_90's), not --arch {args.arch}")
    precisions = PRECISIONS if args.precision == "all" else (args.precision,)
    stamp = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    rows, failures = [], []

    def emit(gpu, precision, kernel, metric, value, unit, method="sass-model"):
        params = dict(realistic_ipc=REALISTIC_IPC, cublas_efficiency=CUBLAS_EFFICIENCY, sms=gpu.sms,
                      clock_ghz=gpu.clock_ghz, hbm_tbs=gpu.hbm_tbs, l2_tbs=gpu.l2_tbs,
                      tensor={f"{k[0]}/{k[1]}": v for k, v in gpu.tensor.items()})
        rows.append(dict(config=args.preset, method=method, kernel=kernel, precision=precision, M=M, D=D,
                         metric=metric, value=f"{value:.6g}", unit=unit, gpu=gpu.name, arch=gpu.arch,
                         version=__version__, triton=triton.__version__, timestamp=stamp,
                         params=json.dumps(params, sort_keys=True)))

    print("ESTIMATES from the compiled kernels' SASS (static counts x trip counts) and stated peaks, not measurements")
    print(f"preset {args.preset}: d_model {cfg.d_model}, heads {cfg.n_heads}x{cfg.d_head}, d_mlp {cfg.d_mlp}, "
          f"d_vocab {cfg.d_vocab}; M = {M} models x D = {D} examples; realistic IPC {REALISTIC_IPC} per scheduler")
    for arch in archs:
        for precision in precisions:
            start = time.perf_counter()
            launches = step_launches(cfg, precision, arch, M, D, programs=GPUS[arch][0].sms, options=options,
                                     num_ctas=args.num_ctas)
            try:
                models = [(analyze(fn, kw, grid, arch), kw) for fn, grid, kw in launches]
            except RuntimeError as e:  # Triton's compiler fails on some cluster launches
                print(f"sm_{arch} {precision}: Triton {triton.__version__} did not compile the step "
                      f"(num_ctas={args.num_ctas}, tiling {args.tiling or 'default'}): {e}", file=sys.stderr)
                return 1
            print(f"\n== sm_{arch} {precision} (compiled and counted in {time.perf_counter() - start:.0f} s)")
            for model, kw in models:
                ok, check = cross_check(model, kw, precision, layout, M)
                if not ok:
                    failures.append(f"sm_{arch} {precision} {model.name}: {check}")
                kinds = sorted({a.split()[1] for a in model.float_atomics})
                print(f"  {model.name}: grid {model.grid}, {model.num_warps} warps, {model.registers} registers, "
                      f"{model.shared_bytes // 1024} KB shared memory")
                print(f"    per model-step: {check}{'' if ok else '  <- MISMATCH'}")
                which = f" ({', '.join(kinds)})" if kinds else ""
                print(f"    float atomics: {len(model.float_atomics)} in the SASS{which}"
                      f", {model.atomics_executed / M:.4g} executed (warp-instructions) per model-step")
                top = sorted(model.l2_bytes.items(), key=lambda kv: -kv[1])
                print("    L2 MB per model-step by buffer: "
                      + ", ".join(f"{b.removesuffix('_ptr')} {v / M / 1e6:.3g}" for b, v in top[:5])
                      + (f", {len(top) - 5} others {sum(v for _, v in top[5:]) / M / 1e6:.3g}" if len(top) > 5 else ""))
                print("    warp-instructions per model-step: "
                      + ", ".join(f"{c} {model.counts.get(c, 0) / M:.3g}" for c in CLASSES))
                if args.loops:
                    for lp, trips, source, from_sass, size in model.loops:
                        where = " <- ".join(f"{os.path.basename(f)}:{n}" for f, n in lp.chain)
                        t = trips if np.isscalar(trips) else f"{trips.min()}..{trips.max()} per program"
                        how = "SASS counter" if from_sass else "source range"
                        note = "" if np.array_equal(trips, source) else f"; unrolled or peeled, the range has {source}"
                        print(f"      loop {lp.label:<8} {size:6d} instructions x {t} ({how}{note})  {where}")
                    for f, n in sorted(model.unknown_branches):
                        print(f"      data-dependent branch counted as taken: {os.path.basename(f)}:{n}")
            for gpu in GPUS[arch]:
                print(f"  {gpu.name}: {gpu.sms} SMs at {gpu.clock_ghz} GHz, HBM {gpu.hbm_tbs} TB/s, "
                      f"L2 {gpu.l2_tbs} TB/s (assumed); us (or MB) per model-step")
                print(f"  {'':<22}" + "".join(f"{label:>10}" for label, _, _ in COLUMNS) + "  bound")
                total = Counter()
                for model, kw in models:
                    t = kernel_times(model, kw, gpu)
                    print(_row(model.name, t, M, t["bound"]))
                    for key in TIMES + ("estimate",):
                        emit(gpu, precision, model.name, f"{key}_time", t[key] / M * 1e6, "us/model-step")
                        total[key] += t[key]
                    for key in ("l2_bytes", "hbm_bytes"):
                        emit(gpu, precision, model.name, key, t[key] / M, "B/model-step")
                        total[key] += t[key]
                    for buf, nbytes in model.l2_bytes.items():
                        emit(gpu, precision, model.name, f"l2_bytes:{buf}", nbytes / M, "B/model-step")
                    emit(gpu, precision, model.name, "tensor_flops", sum(model.tensor_flops.values()) / M,
                         "FLOP/model-step")
                    emit(gpu, precision, model.name, "matmul_flops",
                         expected_matmul_flops(model.name, kw, model.grid, layout) / M, "FLOP/model-step")
                    emit(gpu, precision, model.name, "float_atomics_in_sass", len(model.float_atomics), "1")
                    emit(gpu, precision, model.name, "float_atomics_executed", model.atomics_executed / M,
                         "warp-instructions/model-step")
                    for c in CLASSES:
                        emit(gpu, precision, model.name, f"count_{c}", model.counts.get(c, 0) / M,
                             "warp-instructions/model-step")
                print(_row(f"step ({len(models)} launches)", total, M, f"-> {M / total['estimate']:.4g} model-steps/s"))
                emit(gpu, precision, "step", "estimate_time", total["estimate"] / M * 1e6, "us/model-step")
                emit(gpu, precision, "step", "model_steps_per_s", M / total["estimate"], "1/s")
    print(f"\ntorch engine (the batched torch engine, chunks of {CHUNK} examples), per model-step:")
    for arch in archs:
        for gpu in GPUS[arch]:
            for r in torch_engine(cfg, D, gpu):
                print(f"  {gpu.name:<15} {r['mode']} GEMMs at {CUBLAS_EFFICIENCY[r['mode']]:.0%} of peak: "
                      f"{r['flops'] / 1e9:.3f} GFLOP in {r['gemm'] * 1e6:.2f} us; HBM {r['hbm_bytes'] / 1e6:.1f} MB in "
                      f"{r['HBM'] * 1e6:.2f} us; estimate {r['estimate'] * 1e6:.2f} us ({r['bound']}), "
                      f"{1 / r['estimate']:.4g} model-steps/s")
                for key in ("gemm", "HBM", "estimate"):
                    emit(gpu, r["mode"], "torch", f"{key}_time", r[key] * 1e6, "us/model-step", method="torch-model")
                emit(gpu, r["mode"], "torch", "hbm_bytes", r["hbm_bytes"], "B/model-step", method="torch-model")
                emit(gpu, r["mode"], "torch", "model_steps_per_s", 1 / r["estimate"], "1/s", method="torch-model")
    print("\nfloors (any implementation of the step: the examples' matmul FLOPs at the tensor peak, AdamW's fp32 "
          "state read and written once), per model-step:")
    for arch in archs:
        for gpu in GPUS[arch]:
            for precision in precisions:
                f = floors(cfg, D, M, gpu, precision)
                print(f"  {gpu.name:<15} {precision:<6} {f['flops'] / 1e9:.3f} GFLOP in {f['tensor'] * 1e6:.2f} us; "
                      f"AdamW {f['adamw_bytes'] / 1e6:.2f} MB over {f['adamw_memory']} in {f['adamw'] * 1e6:.2f} us; "
                      f"in sequence {f['in_sequence'] * 1e6:.2f} us, overlapped {f['overlapped'] * 1e6:.2f} us")
                for key in ("tensor", "adamw", "in_sequence", "overlapped"):
                    emit(gpu, precision, "floor", f"{key}_time", f[key] * 1e6, "us/model-step", method="floor-model")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    for failure in failures:
        print("CROSS-CHECK FAILED:", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
