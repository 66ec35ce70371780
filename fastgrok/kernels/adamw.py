"""Launch 4 of the fused step: table gradients, then AdamW with per-model lr and wd.

torch.optim.AdamW semantics (decoupled weight decay on every parameter):

    p  <- p (1 - lr wd)
    m1 <- m1 + (1 - b1)(g - m1),   m2 <- b2 m2 + (1 - b2) g^2
    p  <- p - (lr / bc1) m1 / (sqrt(m2) / sqrt(bc2) + eps),  bc_i = 1 - b_i^step

Grid (M, 1 + cdiv(P - OFF_W_O, BLOCK)). Block 0 of model m first computes
the gradients of W_E..W_V from the row tables (fastgrok.kernels.tables_backward) and
then updates those parameters; block b > 0 updates BLOCK parameters of
W_O..W_U, whose gradients launch 3 (fastgrok.kernels.reduce) completed. Element-wise, a parameter costs
7 fp32 words of memory traffic and nothing stays on chip. lr is the model's
base lr times the warm-up factor of this step.

Failure isolation: a model is updated only if it is healthy, i.e. it was not
frozen before (``failed`` < 0) and this step's loss and gradient checksums
(check_tab of launch 1 and check of launch 3, fastgrok.kernels.layout.Workspace)
are finite. Every program of a model computes the
same decision from the same inputs. A model that turns non-finite now is
frozen: block 0 writes the step into ``failed``; every program of the model
skips its loads and stores. (The other programs may read ``failed`` before or
after that write; both lead to the same decision.)

Step-dependent scalars (step, warm-up, bias corrections) are read from a
small device buffer ``hyper`` (float64: step, warm-up factor, bc1,
sqrt(bc2)), computed on the host in double precision as torch does, so a
captured CUDA graph can replay the step unchanged.

``WITH_TABLE_GRADS=False`` leaves the W_E..W_V gradients as they are (block 0
then only updates), which is AdamW alone, as the tests compare it with
torch.optim.AdamW.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl
from torch import Tensor

from fastgrok.kernels.layout import Layout, Workspace, launch_options
from fastgrok.kernels.tables_backward import tables_backward_tail


def adamw_ref(params: Tensor, grads: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, lr: Tensor, wd: Tensor,
              step: int, betas: tuple[float, float], eps: float) -> None:
    """In-place AdamW on (M, P) rows with per-model lr, wd (M,), in plain torch."""
    b1, b2 = betas
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    lr, wd = lr.unsqueeze(1), wd.unsqueeze(1)
    params.mul_(1 - lr * wd)
    exp_avg.lerp_(grads, 1 - b1)
    exp_avg_sq.mul_(b2).addcmul_(grads, grads, value=1 - b2)
    denom = exp_avg_sq.sqrt() / math.sqrt(bc2) + eps
    params.sub_(lr / bc1 * exp_avg / denom)


def step_scalars(step: int, warmup: float, betas: tuple[float, float]) -> list[float]:
    """The ``hyper`` buffer of a step: [step, warm-up factor, bc1, sqrt(bc2)]."""
    b1, b2 = betas
    return [float(step), warmup, 1 - b1 ** step, math.sqrt(1 - b2 ** step)]


@triton.jit
def _adamw_block(params_ptr, grads_ptr, exp_avg_ptr, exp_avg_sq_ptr, offs, mask, lr, wd, bc1, bc2_sqrt,
                 BETA1: tl.constexpr, BETA2: tl.constexpr, EPS: tl.constexpr):
    p = tl.load(params_ptr + offs, mask=mask)
    g = tl.load(grads_ptr + offs, mask=mask)
    m1 = tl.load(exp_avg_ptr + offs, mask=mask)
    m2 = tl.load(exp_avg_sq_ptr + offs, mask=mask)
    p = p * (1.0 - lr * wd)
    m1 = m1 + (1.0 - BETA1) * (g - m1)
    m2 = m2 * BETA2 + (1.0 - BETA2) * (g * g)
    p = p - (lr / bc1) * (m1 / (tl.sqrt(m2) / bc2_sqrt + EPS))
    tl.store(params_ptr + offs, p, mask=mask)
    tl.store(exp_avg_ptr + offs, m1, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, m2, mask=mask)


@triton.jit
def adamw_kernel(
    params_ptr, grads_ptr, exp_avg_ptr, exp_avg_sq_ptr, lr_ptr, wd_ptr, failed_ptr, hyper_ptr,
    loss_ptr, check_ptr, check_tab_ptr, K_ptr, S_ptr, q_ptr, dV_ptr, dS_ptr, dq_ptr, dc_ptr, Rt_ptr,
    D: tl.constexpr, H: tl.constexpr, Dh: tl.constexpr,
    R: tl.constexpr, OP_ROW: tl.constexpr, FIRST_Y_ROW: tl.constexpr, EQ_ROW: tl.constexpr, OP_TOKEN: tl.constexpr,
    EQ_TOKEN: tl.constexpr, POS_X: tl.constexpr, POS_OP: tl.constexpr, POS_Y: tl.constexpr, EQ_POS: tl.constexpr,
    OFF_W_E: tl.constexpr, OFF_W_pos: tl.constexpr, OFF_W_Q: tl.constexpr, OFF_W_K: tl.constexpr,
    OFF_W_V: tl.constexpr, OFF_W_O: tl.constexpr, P: tl.constexpr, NUM_RB: tl.constexpr, BLOCK_RB: tl.constexpr,
    NUM_CHECK: tl.constexpr, BLOCK_CHECK: tl.constexpr,
    BETA1: tl.constexpr, BETA2: tl.constexpr, EPS: tl.constexpr, WITH_TABLE_GRADS: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_DH: tl.constexpr, SCALE: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    step = tl.load(hyper_ptr).to(tl.int32)
    failed = tl.load(failed_ptr + m)
    slots = tl.arange(0, BLOCK_RB)
    reduced = tl.arange(0, BLOCK_CHECK)
    check = (tl.sum(tl.load(check_ptr + m * NUM_CHECK + reduced, mask=reduced < NUM_CHECK, other=0.0), axis=0)
             + tl.sum(tl.load(check_tab_ptr + m * NUM_RB + slots, mask=slots < NUM_RB, other=0.0), axis=0))
    loss = tl.load(loss_ptr + m)
    # |x| < inf is False for inf and NaN.
    finite = (tl.abs(loss) < float("inf")) & (tl.abs(check) < float("inf"))
    healthy = (failed < 0) & finite
    lr = (tl.load(lr_ptr + m) * tl.load(hyper_ptr + 1)).to(tl.float32)
    wd = tl.load(wd_ptr + m).to(tl.float32)
    bc1 = tl.load(hyper_ptr + 2).to(tl.float32)
    bc2_sqrt = tl.load(hyper_ptr + 3).to(tl.float32)
    row = m * P
    # A frozen model's programs mask every load and store out.
    limit = tl.where(healthy, P, 0)
    if blk == 0:
        tl.store(failed_ptr + m, step, mask=(failed < 0) & (finite == 0))
        if WITH_TABLE_GRADS:
            tables_backward_tail(m, params_ptr, grads_ptr, K_ptr, S_ptr, q_ptr, dV_ptr, dS_ptr, dq_ptr, dc_ptr,
                                 Rt_ptr, D, H, Dh, R, OP_ROW, FIRST_Y_ROW, EQ_ROW, OP_TOKEN, EQ_TOKEN, POS_X, POS_OP,
                                 POS_Y, EQ_POS, OFF_W_E, OFF_W_pos, OFF_W_Q, OFF_W_K, OFF_W_V, P,
                                 BLOCK_R, BLOCK_C, BLOCK_H, BLOCK_DH, SCALE)
            tl.debug_barrier()  # the gradients just written are read by other threads below
        for start in range(0, OFF_W_O, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            _adamw_block(params_ptr + row, grads_ptr + row, exp_avg_ptr + row, exp_avg_sq_ptr + row, offs,
                         offs < tl.minimum(limit, OFF_W_O), lr, wd, bc1, bc2_sqrt, BETA1, BETA2, EPS)
    else:
        offs = OFF_W_O + (blk - 1) * BLOCK + tl.arange(0, BLOCK)
        _adamw_block(params_ptr + row, grads_ptr + row, exp_avg_ptr + row, exp_avg_sq_ptr + row, offs,
                     offs < limit, lr, wd, bc1, bc2_sqrt, BETA1, BETA2, EPS)


def adamw_args(layout: Layout, params: Tensor, grads: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, lr: Tensor,
               wd: Tensor, failed: Tensor, hyper: Tensor, ws: Workspace, betas: tuple[float, float], eps: float,
               with_table_grads: bool = True, block: int = 2048, block_r: int = 16,
               block_c: int = 16, arch: int = 90) -> tuple[tuple, dict]:
    """Grid and keyword arguments of adamw_kernel.

    params, grads, exp_avg, exp_avg_sq (M, P) float32; lr, wd (M,) float64;
    failed (M,) int32; hyper (4,) float64 (see step_scalars). block_r, block_c:
    the table backward's tiles (small: it runs once per model, and small tiles
    keep its registers low). arch: compute capability x10, picks launch options.
    """
    M = layout.check_flat(params=params, grads=grads, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    num_rb, num_check = ws.check_tab.shape[1], ws.check.shape[1]
    return (M, 1 + triton.cdiv(layout.P - layout.offsets["W_O"], block)), dict(
        params_ptr=params, grads_ptr=grads, exp_avg_ptr=exp_avg, exp_avg_sq_ptr=exp_avg_sq, lr_ptr=lr, wd_ptr=wd,
        failed_ptr=failed, hyper_ptr=hyper, loss_ptr=ws.loss, check_ptr=ws.check, check_tab_ptr=ws.check_tab,
        K_ptr=ws.K, S_ptr=ws.S, q_ptr=ws.q, dV_ptr=ws.dV, dS_ptr=ws.dS, dq_ptr=ws.dq, dc_ptr=ws.dc, Rt_ptr=ws.Rt,
        D=layout.D, H=layout.H, Dh=layout.Dh, **layout.row_args(),
        **layout.offset_args("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O"),
        NUM_RB=num_rb, BLOCK_RB=triton.next_power_of_2(num_rb),
        NUM_CHECK=num_check, BLOCK_CHECK=triton.next_power_of_2(num_check),
        BETA1=betas[0], BETA2=betas[1], EPS=eps, WITH_TABLE_GRADS=with_table_grads,
        BLOCK=block, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_H=triton.next_power_of_2(layout.H),
        BLOCK_DH=layout.block_dh, SCALE=layout.scale,
        **launch_options("adamw", "fp32", arch),
    )


def adamw_launch(*args, **kwargs) -> None:
    """Table gradients and AdamW on the healthy models' rows, in place (arguments: adamw_args)."""
    grid, kw = adamw_args(*args, **kwargs)
    adamw_kernel[grid](**kw)
