"""bench/sass_model.py: SASS counting, loop trip counts and the float-atomic check.

The tiny kernels below are compiled ahead of time (no GPU needed) and their
counts compared with what their shapes and loops imply by hand: a dot of
(BM, BK) @ (BK, BN) per inner iteration is 2*BM*BN*BK FLOPs whatever
HMMA/HGMMA shape the compiler picks, and every (BM, BN) tile stored moves
BM*BN*4 bytes. The paper-size kernels are in the slow test at the end.
"""
import importlib.util
import inspect
import os
import re
import sys

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from fastgrok.config import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_sass_model():
    spec = importlib.util.spec_from_file_location("sass_model", os.path.join(ROOT, "bench", "sass_model.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["sass_model"] = module
    spec.loader.exec_module(module)
    return module


sm = _load_sass_model()
META = torch.empty(1, device="meta")


@triton.jit
def _atomic_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr, FLOAT: tl.constexpr, ATOMIC: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    if ATOMIC:
        if FLOAT:
            tl.atomic_add(out_ptr + offs, x, sem="relaxed")
        else:
            tl.atomic_add(out_ptr + offs, x.to(tl.int32), sem="relaxed")
    else:
        tl.store(out_ptr + offs, x)


def _sass(fn, kwargs, arch=90):
    compiled, _ = sm.aot.compile_kernel(fn, kwargs, arch)
    return sm.disassemble(compiled.asm["cubin"])


@pytest.mark.parametrize("flavour, found", [("float atomic_add", True), ("int atomic_add", False), ("store", False)])
def test_float_atomics_finds_float_red_atom_only(flavour, found):
    out = torch.empty(1, device="meta", dtype=torch.int32 if flavour == "int atomic_add" else torch.float32)
    sass = _sass(_atomic_kernel, dict(x_ptr=META, out_ptr=out, BLOCK=128, FLOAT=flavour.startswith("float"),
                                      ATOMIC="atomic" in flavour, num_warps=4))
    lines = sm.float_atomics(sass)
    if found:
        assert lines and all(("RED" in ln or "ATOM" in ln) and "F32" in ln for ln in lines), lines
    else:
        assert lines == [], lines
        if flavour == "int atomic_add":  # the integer atomic is there, it just is not a float one
            assert any(i.base in ("RED", "REDG", "ATOM", "ATOMG") for i in sm.parse_sass(sass)[0])


def test_float_atomics_on_text():
    sass = """
        /*0100*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R5 ;
        /*0110*/               @P0 REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R8 ;
        /*0120*/                   REDG.E.ADD.STRONG.GPU desc[UR4][R2.64], R5 ;
        /*0130*/                   ATOMG.E.ADD.F64.RN.STRONG.GPU PT, R4, desc[UR4][R2.64], R6 ;
        /*0140*/                   ATOMS.CAS R0, [R2], R4, R5 ;
        /*0150*/                   FADD R0, R1, R2 ;
    """
    found = sm.float_atomics(sass)
    assert [line.split()[1].split(".")[0] for line in found] == ["REDG", "@P0", "ATOMG"]
    assert "F32x4" in found[1] and "F64" in found[2]


@triton.jit
def _dot_loops(a_ptr, b_ptr, c_ptr, n_outer, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    tile = offs_m[:, None] * BN + offs_n[None, :]
    for o in range(0, n_outer):
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            a = tl.load(a_ptr + offs_m[:, None] * K + offs_k[None, :])
            b = tl.load(b_ptr + offs_k[:, None] * BN + offs_n[None, :])
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        tl.store(c_ptr + o * BM * BN + tile, acc)
        if tl.program_id(0) == 1:
            tl.store(c_ptr + tile, acc * 2.0)


# K = 256: the inner loop is fully unrolled; 1024: ptxas peels and unrolls it
# (6 SASS iterations of 5 plus 2 peeled on sm_90); 2048: unrolled by 4.
@pytest.mark.parametrize("arch, K", [(90, 256), (90, 1024), (80, 2048)])
def test_dot_in_nested_loops_counts_known_flops_and_bytes(arch, K):
    BM, BN, BK, n_outer, programs = 64, 32, 32, 3, 5
    kwargs = dict(a_ptr=META, b_ptr=META, c_ptr=META, n_outer=n_outer, K=K, BM=BM, BN=BN, BK=BK,
                  PRECISION="tf32", num_warps=4, num_stages=1)
    model = sm.analyze(_dot_loops, kwargs, (programs,), arch)
    kinds = {k[0] for k in model.tensor_flops}
    assert kinds == {"wgmma" if arch == 90 else "mma.sync"}
    flops = 2 * BM * BN * K * n_outer * programs
    assert sum(model.tensor_flops.values()) == flops
    assert model.dot_flops == flops and model.useful_dot_flops == flops  # no replication at this shape
    assert model.l2_bytes["a_ptr"] == 4 * BM * K * n_outer * programs
    assert model.l2_bytes["b_ptr"] == 4 * K * BN * n_outer * programs
    # every program stores its tile once per outer iteration; program 1 a second time (the if)
    assert model.l2_bytes["c_ptr"] == 4 * BM * BN * n_outer * (programs + 1)
    assert model.touched["c_ptr"] == {"store"} and model.float_atomics == []
    lines, first = inspect.getsourcelines(_dot_loops.fn)
    outer_line = first + next(i for i, line in enumerate(lines) if "for o in" in line)
    outer = [(trips, source) for lp, trips, source, *_ in model.loops if lp.chain[0][1] == outer_line]
    assert outer == [(n_outer, n_outer)], model.loops


def test_a_cluster_counts_each_of_its_ctas():
    """num_ctas=2 on sm_90 splits the tile's rows over the two CTAs of a cluster: the
    dot's FLOPs and A's rows are each counted once over the pair, and B, which both
    CTAs need whole (no TMA multicast), once per CTA."""
    BM, BN, BK, K, n_outer, programs = 128, 32, 32, 256, 3, 5
    kwargs = dict(a_ptr=META, b_ptr=META, c_ptr=META, n_outer=n_outer, K=K, BM=BM, BN=BN, BK=BK,
                  PRECISION="tf32", num_warps=4, num_stages=1, num_ctas=2)
    model = sm.analyze(_dot_loops, kwargs, (programs,), 90)
    assert model.num_ctas == 2
    assert sum(model.tensor_flops.values()) == 2 * BM * BN * K * n_outer * programs
    assert model.l2_bytes["a_ptr"] == 4 * BM * K * n_outer * programs
    assert model.l2_bytes["b_ptr"] == 2 * 4 * K * BN * n_outer * programs
    assert model.l2_bytes["c_ptr"] == 4 * BM * BN * n_outer * (programs + 1)


def test_floors_are_hand_counted_work_at_the_datasheet_peaks():
    cfg = get_preset("paper").model
    # parameters: W_E, W_pos, W_Q W_K W_V, W_O, W_in, b_in, W_out, b_out, W_U
    P = 115 * 128 + 4 * 128 + 3 * 128 * 4 * 32 + 4 * 32 * 128 + 128 * 512 + 512 + 512 * 128 + 128 + 128 * 115
    flops = 2000 * 6 * (4 * 32 * 128 + 2 * 128 * 512 + 128 * 115)  # z W_O, W_in, W_out, W_U: fwd + 2x bwd
    h100, a100 = sm.GPUS[90][0], sm.GPUS[80][0]
    f = sm.floors(cfg, 2000, 200, h100, "bf16x3")
    assert f["adamw_memory"] == "HBM" and f["adamw"] == pytest.approx(24 * P / 3.35e12)
    assert f["tensor"] == pytest.approx(3 * flops / (4096 * 132 * 1.98e9))
    assert f["in_sequence"] == pytest.approx(f["tensor"] + f["adamw"]) and f["overlapped"] == f["tensor"]
    assert sm.floors(cfg, 2000, 200, h100, "fp32")["tensor"] == pytest.approx(flops / (2 * 128 * 132 * 1.98e9))
    assert sm.floors(cfg, 2000, 200, a100, "tf32")["tensor"] == pytest.approx(flops / (1024 * 108 * 1.41e9))
    # two models' state (5.5 MB) stays in L2 between steps
    small = sm.floors(cfg, 2000, 2, h100, "bf16")
    assert small["adamw_memory"] == "L2" and small["adamw"] == pytest.approx(24 * P / 5.5e12)


@triton.jit
def _broadcast_bias(bias_ptr, scale_ptr, out_ptr, BM: tl.constexpr, BN: tl.constexpr):
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    bias = tl.load(bias_ptr + offs_n)                  # (BN,), the same for every row
    scale = tl.load(scale_ptr)                         # one address for every lane
    tl.store(out_ptr + offs_m[:, None] * BN + offs_n[None, :], (offs_m[:, None] + bias[None, :]) * scale)


@pytest.mark.parametrize("arch", [90, 80])
def test_broadcast_loads_count_each_address_once_per_warp(arch):
    """A bias broadcast over a tile's rows and a scalar: the L2 sees one request per
    distinct address of a warp-instruction, so each of the 4 warps moves the BN-float
    bias once and the scalar's 4 bytes once; the tile's stores are all distinct."""
    BM, BN, warps, programs = 64, 16, 4, 3
    kwargs = dict(bias_ptr=META, scale_ptr=META, out_ptr=META, BM=BM, BN=BN, num_warps=warps, num_stages=1)
    model = sm.analyze(_broadcast_bias, kwargs, (programs,), arch)
    assert model.l2_bytes["bias_ptr"] == 4 * BN * warps * programs
    assert model.l2_bytes["scale_ptr"] == 4 * warps * programs
    assert model.l2_bytes["out_ptr"] == 4 * BM * BN * programs


def test_lane_bases_of_the_layouts_the_kernels_load_with():
    """Triton's linear layouts (as triton.experimental.gluon's to_linear_layout gives
    them) for a blocked tile smaller than its layout, a slice of an MMA accumulator
    and a doubly sliced 3-D blocked layout."""
    aliases = {"#blocked": "#ttg.blocked<{sizePerThread = [1, 1, 4], threadsPerWarp = [1, 8, 4], "
                           "warpsPerCTA = [4, 1, 1], order = [2, 1, 0]}>",
               "#mma": "#ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], "
                       "instrShape = [16, 32, 16]}>"}
    blocked = "#ttg.blocked<{sizePerThread = [1, 4], threadsPerWarp = [8, 4], warpsPerCTA = [8, 1], order = [1, 0]}>"
    assert sm.lane_bases(blocked, [128, 32], {}) == [[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]]
    assert sm.lane_bases(blocked, [2, 8], {}) == [[0, 4], [0, 0], [1, 0], [0, 0], [0, 0]]
    assert sm.lane_bases("#ttg.slice<{dim = 0, parent = #mma}>", [32], aliases) == [[2], [4], [0], [0], [0]]
    nested = "#ttg.slice<{dim = 1, parent = #ttg.slice<{dim = 2, parent = #blocked}>}>"
    assert sm.lane_bases(nested, [16], aliases) == [[0]] * 5


def test_sass_counter_trip_count_of_an_unrolled_loop():
    """A counter from 0x20 by 0xa0 while < 0x3e0: 6 iterations (the peeled and
    5-fold unrolled loop of K = 1024 above), whatever the source range says."""
    text = """
        /*0000*/                   IMAD.MOV.U32 R52, RZ, RZ, 0x20 ;
.L_x_0:
        /*0010*/                   HGMMA.64x32x8.F32.TF32 R24, gdesc[UR4], R24 ;
        /*0020*/                   IADD3 R52, P0, R52, 0xa0, RZ ;
        /*0030*/                   ISETP.GE.U32.AND P0, PT, R52, 0x3e0, PT ;
        /*0040*/                   ISETP.GE.U32.AND.EX P0, PT, R51, RZ, PT, P0 ;
        /*0050*/              @!P0 BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
"""
    instrs, labels = sm.parse_sass(text)
    (loop,) = sm.find_loops(instrs, labels)
    assert (loop.start, loop.end) == (1, 5)
    assert sm.sass_trip_count(instrs, loop) == 6
    assert sm.tensor_op(instrs[1]) == ("wgmma", "TF32", 2 * 64 * 32 * 8 // 4)


def test_persistent_loop_trip_counts_per_program(tmp_path):
    """tl.range(program_id, n_tiles, num_programs): 10 tiles over 4 programs is 3, 3, 2, 2."""
    src = tmp_path / "persistent.py"
    src.write_text("def kernel(n_tiles, BLOCK):\n"
                   "    for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0)):\n"
                   "        for k in range(0, 100, BLOCK):\n"
                   "            pass\n"
                   "        if tl.program_id(0) == 3:\n"
                   "            pass\n")
    launch = sm.Launch(dict(n_tiles=10, BLOCK=32), (4,))
    tiles = sm.Loop(0, 1, ".L_x_0", ((str(src), 2),))
    assert list(launch.trip_count(tiles)) == [3, 3, 2, 2]
    assert launch.trip_count(sm.Loop(0, 1, ".L_x_1", ((str(src), 3),))) == 4
    assert list(launch.source_trips(((str(src), 4),))) == [12, 12, 8, 8]
    assert list(launch.branch_weight(((str(src), 6),))) == [0, 0, 0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("precision", sm.PRECISIONS)
@pytest.mark.parametrize("arch", [80, 90])
def test_paper_kernels_counts_match_their_dots(arch, precision):
    """At the paper config the SASS tensor FLOPs equal the TTGIR's dots x replication
    x their source loops, and those dots the kernels' matmul FLOPs by hand."""
    cfg = get_preset("paper").model
    for fn, grid, kwargs in sm.step_launches(cfg, precision, arch, M=8, D=200, programs=sm.GPUS[arch][0].sms):
        model = sm.analyze(fn, kwargs, grid, arch)
        ok, text = sm.cross_check(model, kwargs, precision, sm.Layout.from_config(cfg))
        assert ok, f"{fn.__name__} sm_{arch} {precision}: {text}"
        assert model.issue > 0 and np.all(model.per_program > 0)


@triton.jit
def _multiply_add_kernel(a_ptr, b_ptr, c_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    out = tl.load(a_ptr + offs) * tl.load(b_ptr + offs) + tl.load(c_ptr + offs)
    tl.store(out_ptr + offs, out)


@pytest.mark.parametrize("fusion", [True, False])
def test_the_pinned_fp_fusion_option_decides_whether_a_times_b_plus_c_is_one_ffma(fusion):
    """The launchers pass enable_fp_fusion (fastgrok.kernels.layout.FP_FUSION) explicitly,
    so Triton's changing default cannot change the kernels' rounding; compiled for sm_90,
    the option is what decides FFMA against FMUL + FADD."""
    assert sm._layout.launch_options("examples", "tf32", 90)["enable_fp_fusion"] is sm._layout.FP_FUSION is True
    x = torch.empty(128, device="meta")
    sass = _sass(_multiply_add_kernel, dict(a_ptr=x, b_ptr=x, c_ptr=x, out_ptr=x, BLOCK=128, num_warps=4,
                                            enable_fp_fusion=fusion))
    count = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("FFMA", "FMUL", "FADD")}
    assert (count["FFMA"] > 0 and count["FMUL"] == count["FADD"] == 0) if fusion else \
        (count["FFMA"] == 0 and count["FMUL"] > 0 and count["FADD"] > 0), count
