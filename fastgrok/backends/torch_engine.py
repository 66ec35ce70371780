"""The torch backend: the batched PyTorch engine, M independent models stepped together, exactly.

It steps a population state (``fastgrok.population.PopulationState``): M
models, each with its own init seed, data seed, training-set size n_train_m,
learning rate and weight decay, in lockstep with full-batch AdamW. Every
tensor carries the model axis first. Runs on any torch device.

Dimensions: M models, N example slots (max n_train_m), R token-table rows,
D d_model, H heads, Dh d_head, F d_mlp, V d_vocab, P parameters per model.

The algorithm exploits the structure of the task exactly:

* The loss reads only the last position, whose token is always ``=``. So the
  query, the attention output, the MLP and the unembedding are computed for
  that position only; the residual there before attention, ``c = W_E[=] +
  W_pos[3]``, is the same for every example.
* Every key and value is a function of (token, position) alone, so keys,
  values and attention scores are computed once per step for the R = 2n + 2
  (token, position) rows of ``fastgrok.layout.TokenRows``, not per example;
  an example then only gathers its 4 rows. Per example remain: the softmax over
  4 scores per head, z = sum_t a_t v_t, and four matmuls
  (z @ W_O, the two MLP layers, the unembedding) forward, twice that backward.

FLOPs per example, forward + backward (see ``flops_per_example``):
    6 * (H*Dh*D + 2*D*F + D*V) + O(H*Dh + F + V)
    = 0.97 MFLOP at the paper config (full-sequence model: ~5.1 MFLOP),
plus per model and step ~6 * R*D*H*Dh * 2 for the key/value tables
(~30 MFLOP at the paper config, ~1.5% of a step at n_train = 2000).

Ragged training sets (padding: ``fastgrok.population``) cost sum_m (N -
n_train_m) example slots per step: none when all sizes are equal, at most 27%
for the semi-grokking sweep (n_train = 1500..2050).

Parameters, gradients and both AdamW moments live in flat (M, P) buffers, so
the optimiser is one fused call per distinct (lr, weight decay) pair.

Reproducibility: bitwise for one population on one machine and thread
count; BLAS blocks batched products by shape, so a model's bits change in the
last place with its batch-mates (README, "Reproducibility").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastgrok import precision as mp
from fastgrok.config import ModelConfig
from fastgrok.layout import TokenRows
from fastgrok.model import stable_cross_entropy_fwd_bwd


def flops_per_example(cfg: ModelConfig) -> int:
    """Matmul FLOPs per training example, forward + backward, of this engine."""
    D, H, Dh, F, V = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    return 6 * (H * Dh * D + 2 * D * F + D * V)


def flops_per_model_step(cfg: ModelConfig, n_train: int) -> int:
    """FLOPs of one model's training step: examples plus key/value/score tables."""
    R = TokenRows(cfg.d_vocab - 2).R
    D, HDh = cfg.d_model, cfg.n_heads * cfg.d_head
    tables = 3 * 2 * (2 * R * D * HDh) + 3 * 2 * R * HDh  # K and V rows, scores; fwd + 2x bwd
    return n_train * flops_per_example(cfg) + tables


@dataclass
class Tables:
    """Per-step, per-model quantities of the (token, position) rows."""

    R_tab: Tensor     # (M, R, D) residual stream of every row
    K_tab: Tensor     # (M, R, H, Dh) keys
    V_tab: Tensor     # (M, R, H, Dh) values
    q: Tensor         # (M, H, Dh) query of the last position
    S_tab: Tensor     # (M, R, H) scaled attention scores of the last position

    @property
    def c(self) -> Tensor:
        """(M, D) residual of the last position before attention, ``=`` at 3."""
        return self.R_tab[:, -1]


@dataclass
class Cache:
    """What the backward pass of one chunk of examples needs from its forward."""

    rows_x: Tensor    # (M*N,) flat row index of each example's x, offset by model
    rows_y: Tensor    # (M*N,)
    a: Tensor         # (M, N, H, 4) attention pattern of the last position
    Vx: Tensor        # (M, N, H, Dh) values gathered at x
    Vy: Tensor        # (M, N, H, Dh)
    # The operands of the products, prepared at the step's precision
    # (``fastgrok.precision.operand``: the tensors themselves in fp32).
    z: mp.Operand           # (M, N, H*Dh)
    resid_mid: mp.Operand   # (M, N, D)
    hidden: Tensor          # (M, N, F) relu output; hidden > 0 is the relu mask
    hidden_op: mp.Operand
    resid_fin: mp.Operand   # (M, N, D)


@dataclass
class TableGrads:
    """Gradients w.r.t. the row tables, accumulated over chunks of examples."""

    dV: Tensor        # (M*R, H, Dh)
    dS: Tensor        # (M*R, H)
    dc: Tensor        # (M, D) from the residual connection of the last position


def tables_forward(p: dict[str, Tensor], rows: TokenRows, row_index: tuple[Tensor, Tensor]) -> Tables:
    """The row tables of every model; row_index: (token, position) of each row, (R,) each, on the device."""
    Dh = p["W_Q"].shape[3]
    token, pos = row_index
    R_tab = p["W_E"][:, token] + p["W_pos"][:, pos]                          # (M, R, D)
    K_tab = torch.einsum("mrd,mhde->mrhe", R_tab, p["W_K"])                  # (M, R, H, Dh)
    V_tab = torch.einsum("mrd,mhde->mrhe", R_tab, p["W_V"])                  # (M, R, H, Dh)
    q = torch.einsum("md,mhde->mhe", R_tab[:, rows.eq_row], p["W_Q"])        # (M, H, Dh)
    S_tab = torch.einsum("mrhe,mhe->mrh", K_tab, q) * (1 / math.sqrt(Dh))    # (M, R, H)
    return Tables(R_tab, K_tab, V_tab, q, S_tab)


def _terms(a: mp.Operand, b: mp.Operand) -> list[tuple[Tensor, Tensor]]:
    """The products that make a @ b of prepared operands (``fastgrok.precision.operand``).
    bf16x3 lists the small cross terms hi @ lo and lo @ hi before hi @ hi, so that they
    are not lost under the large one."""
    if isinstance(a, tuple):
        return [(a[0], b[1]), (a[1], b[0]), (a[0], b[0])]
    return [(a, b)]


def _addmm(bias: Tensor, a: mp.Operand, b: mp.Operand) -> Tensor:
    """bias + a @ b (batched) of prepared operands."""
    (x, y), *rest = _terms(a, b)
    out = torch.baddbmm(bias, x, y)
    for x, y in rest:
        out.baddbmm_(x, y)
    return out


def _mm(a: mp.Operand, b: mp.Operand) -> Tensor:
    (x, y), *rest = _terms(a, b)
    out = torch.bmm(x, y)
    for x, y in rest:
        out.baddbmm_(x, y)
    return out


def _accumulate(out: Tensor, a: mp.Operand, b: mp.Operand) -> None:
    """out += a @ b in place, of prepared operands."""
    for x, y in _terms(a, b):
        out.baddbmm_(x, y)


def weight_operands(p: dict[str, Tensor], precision: str) -> dict[str, mp.Operand]:
    """W_O (as (M, H*Dh, D)), W_in, W_out, W_U prepared once per step for every product they enter."""
    M, H, Dh, D = p["W_O"].shape
    weights = {"W_O": p["W_O"].view(M, H * Dh, D), "W_in": p["W_in"], "W_out": p["W_out"], "W_U": p["W_U"]}
    return {k: mp.operand(v, precision) for k, v in weights.items()}


def examples_forward(p: dict[str, Tensor], rows: TokenRows, tab: Tables, x: Tensor, y: Tensor,
                     keep_cache: bool = True, precision: str = "fp32",
                     weights: dict[str, mp.Operand] | None = None) -> tuple[Tensor, Cache | None]:
    """Last-position logits (M, N, V) of M models on examples (x, y) of shape (M, N).

    precision: how the products with W_O, W_in, W_out and W_U take their
    operands (``fastgrok.precision``); ``weights``: those weights already
    prepared for it (``weight_operands``), else prepared here. Each
    activation is prepared once, for the forward product and, in the cache,
    for the backward's.
    """
    M, N = x.shape
    _, R, H, Dh = tab.V_tab.shape
    offset = (torch.arange(M, device=x.device) * R).unsqueeze(1)             # (M, 1)
    rows_x = (x + offset).reshape(-1)                                        # (M*N,): x's row is x
    rows_y = (rows.y_row(y) + offset).reshape(-1)
    S_flat, V_flat = tab.S_tab.reshape(M * R, H), tab.V_tab.reshape(M * R, H * Dh)
    scores = torch.stack([
        S_flat.index_select(0, rows_x).view(M, N, H),
        tab.S_tab[:, rows.op_row].unsqueeze(1).expand(M, N, H),
        S_flat.index_select(0, rows_y).view(M, N, H),
        tab.S_tab[:, rows.eq_row].unsqueeze(1).expand(M, N, H),
    ], dim=-1)                                                               # (M, N, H, 4)
    # A hand-written softmax: torch's kernel is slow over a last dim of 4.
    a = (scores - scores.amax(-1, keepdim=True)).exp_()
    a = a.div_(a.sum(-1, keepdim=True))
    Vx = V_flat.index_select(0, rows_x).view(M, N, H, Dh)
    Vy = V_flat.index_select(0, rows_y).view(M, N, H, Dh)
    z = (a[..., 0:1] * Vx + a[..., 2:3] * Vy
         + a[..., 1:2] * tab.V_tab[:, rows.op_row].unsqueeze(1)
         + a[..., 3:4] * tab.V_tab[:, rows.eq_row].unsqueeze(1)).view(M, N, H * Dh)

    W = weight_operands(p, precision) if weights is None else weights
    z_op = mp.operand(z, precision)
    resid_mid = _addmm(tab.c.unsqueeze(1), z_op, W["W_O"])                  # (M, N, D)
    mid_op = mp.operand(resid_mid, precision)
    hidden = _addmm(p["b_in"].unsqueeze(1), mid_op, W["W_in"]).relu_()      # (M, N, F)
    hidden_op = mp.operand(hidden, precision)
    resid_fin = _addmm(p["b_out"].unsqueeze(1), hidden_op, W["W_out"]).add_(resid_mid)
    fin_op = mp.operand(resid_fin, precision)
    logits = _mm(fin_op, W["W_U"])                                           # (M, N, V)
    if not keep_cache:
        return logits, None
    return logits, Cache(rows_x, rows_y, a, Vx, Vy, z_op, mid_op, hidden, hidden_op, fin_op)


def examples_backward(p: dict[str, Tensor], g: dict[str, Tensor], rows: TokenRows, tab: Tables,
                      cache: Cache, dlogits: Tensor, acc: TableGrads, precision: str = "fp32",
                      weights: dict[str, mp.Operand] | None = None) -> None:
    """Accumulate the gradients of sum(dlogits * logits) of one chunk.

    Weight gradients are added into ``g`` (W_U, b_out, W_out, b_in, W_in, W_O);
    gradients w.r.t. the row tables into ``acc``. ``precision`` and ``weights``
    as in ``examples_forward``, for both operands of every backward product.
    """
    M, N, _ = dlogits.shape
    _, R, H, Dh = tab.V_tab.shape
    C = cache
    W = weight_operands(p, precision) if weights is None else weights
    T = mp.transposed

    # Unembedding and MLP.
    dlogits_op = mp.operand(dlogits, precision)
    _accumulate(g["W_U"], T(C.resid_fin), dlogits_op)
    dresid = _mm(dlogits_op, T(W["W_U"]))                                    # (M, N, D)
    g["b_out"].add_(dresid.sum(1))
    dresid_op = mp.operand(dresid, precision)
    _accumulate(g["W_out"], T(C.hidden_op), dresid_op)
    dpre = _mm(dresid_op, T(W["W_out"]))                                     # (M, N, F)
    dpre = torch.ops.aten.threshold_backward(dpre, C.hidden, 0)              # relu'
    g["b_in"].add_(dpre.sum(1))
    dpre_op = mp.operand(dpre, precision)
    _accumulate(g["W_in"], T(C.resid_mid), dpre_op)
    _accumulate(dresid, dpre_op, T(W["W_in"]))                               # d resid_mid
    acc.dc.add_(dresid.sum(1))

    # Attention output: resid_mid = c + z @ W_O.
    dmid_op = mp.operand(dresid, precision)
    _accumulate(g["W_O"].view(M, H * Dh, -1), T(C.z), dmid_op)
    dz = _mm(dmid_op, T(W["W_O"])).view(M, N, H, Dh)

    # z = sum_t a_t v_t over the four positions, then the softmax.
    V_op = tab.V_tab[:, rows.op_row].unsqueeze(1)                            # (M, 1, H, Dh)
    V_eq = tab.V_tab[:, rows.eq_row].unsqueeze(1)
    da = torch.stack([(dz * C.Vx).sum(-1), (dz * V_op).sum(-1),
                      (dz * C.Vy).sum(-1), (dz * V_eq).sum(-1)], dim=-1)     # (M, N, H, 4)
    ds = C.a * (da - (C.a * da).sum(-1, keepdim=True))                       # (M, N, H, 4)

    # Scatter per-example gradients back onto the token rows.
    acc.dV.index_add_(0, C.rows_x, (C.a[..., 0:1] * dz).view(M * N, H, Dh))
    acc.dV.index_add_(0, C.rows_y, (C.a[..., 2:3] * dz).view(M * N, H, Dh))
    dV = acc.dV.view(M, R, H, Dh)
    dV[:, rows.op_row] += (C.a[..., 1:2] * dz).sum(1)
    dV[:, rows.eq_row] += (C.a[..., 3:4] * dz).sum(1)
    acc.dS.index_add_(0, C.rows_x, ds[..., 0].reshape(M * N, H))
    acc.dS.index_add_(0, C.rows_y, ds[..., 2].reshape(M * N, H))
    dS = acc.dS.view(M, R, H)
    dS[:, rows.op_row] += ds[..., 1].sum(1)
    dS[:, rows.eq_row] += ds[..., 3].sum(1)


def tables_backward(p: dict[str, Tensor], g: dict[str, Tensor], rows: TokenRows, row_index: tuple[Tensor, Tensor],
                    tab: Tables, acc: TableGrads) -> None:
    """Gradients of W_E, W_pos, W_Q, W_K, W_V from the accumulated row-table gradients."""
    M, R, H, Dh = tab.V_tab.shape
    # S = K . q / sqrt(Dh), K = R_tab @ W_K, V = R_tab @ W_V, q = c @ W_Q.
    dS = acc.dS.view(M, R, H) * (1 / math.sqrt(Dh))
    dV = acc.dV.view(M, R, H, Dh)
    dK = dS.unsqueeze(-1) * tab.q.unsqueeze(1)                               # (M, R, H, Dh)
    dq = torch.einsum("mrh,mrhe->mhe", dS, tab.K_tab)                        # (M, H, Dh)
    g["W_K"].copy_(torch.einsum("mrd,mrhe->mhde", tab.R_tab, dK))
    g["W_V"].copy_(torch.einsum("mrd,mrhe->mhde", tab.R_tab, dV))
    g["W_Q"].copy_(torch.einsum("md,mhe->mhde", tab.c, dq))
    dR = torch.einsum("mrhe,mhde->mrd", dK, p["W_K"])
    dR += torch.einsum("mrhe,mhde->mrd", dV, p["W_V"])
    dR[:, rows.eq_row] += torch.einsum("mhe,mhde->md", dq, p["W_Q"]) + acc.dc
    token, pos = row_index
    g["W_E"].zero_().index_add_(1, token, dR)
    g["W_pos"].zero_().index_add_(1, pos, dR)


# Examples per chunk: keeps a chunk's activations (~chunk * (3F + 6D + 3V)
# floats per model, 2.7 MB at the paper config) within the L2 cache and the
# memory per model independent of n_train.
CHUNK = 256



class TorchBackend:
    """The batched PyTorch engine as a backend (``fastgrok.backends.Backend``).

    chunk: examples per chunk (memory per model independent of n_train).
    """

    name = "torch"
    precisions = mp.PRECISIONS
    default_precision = "fp32"

    def __init__(self, chunk: int = CHUNK):
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk={chunk!r}: must be a positive integer")
        self.chunk = chunk
        self._row_index: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @classmethod
    def available(cls, device: torch.device) -> tuple[bool, str]:
        return True, ""

    def row_index(self, state) -> tuple[Tensor, Tensor]:
        """(token, position) of each table row, on the state's device."""
        if state.device not in self._row_index:
            self._row_index[state.device] = (torch.as_tensor(state.rows.token, device=state.device),
                                             torch.as_tensor(state.rows.pos, device=state.device))
        return self._row_index[state.device]

    def loss_and_grad(self, state) -> Tensor:
        p, g, rows, M = state.params, state.grads, state.rows, state.M
        index = self.row_index(state)
        tab = tables_forward(p, rows, index)
        for k in ("W_U", "b_out", "W_out", "b_in", "W_in", "W_O"):
            g[k].zero_()
        H, Dh = state.cfg.n_heads, state.cfg.d_head
        acc = TableGrads(dV=tab.V_tab.new_zeros(M * rows.R, H, Dh),
                         dS=tab.S_tab.new_zeros(M * rows.R, H),
                         dc=tab.R_tab.new_zeros(M, state.cfg.d_model))
        loss = tab.R_tab.new_zeros(M)
        weights = weight_operands(p, state.precision)
        for s in range(0, state.train_x.shape[1], self.chunk):
            sl = slice(s, s + self.chunk)
            logits, cache = examples_forward(p, rows, tab, state.train_x[:, sl], state.train_y[:, sl],
                                             precision=state.precision, weights=weights)
            ex_loss, dlogits = stable_cross_entropy_fwd_bwd(logits, state.train_labels[:, sl])
            w = state.train_weight[:, sl]
            dlogits.mul_(w.unsqueeze(-1))
            loss += (ex_loss * w).sum(1)
            examples_backward(p, g, rows, tab, cache, dlogits, acc, state.precision, weights)
        tables_backward(p, g, rows, index, tab, acc)
        return loss

    def step(self, state) -> Tensor:
        loss = self.loss_and_grad(state)
        state.step_count += 1
        # A sum over a model's gradients is non-finite iff one of them is (or
        # they overflow float32, which is divergence all the same): one pass.
        state.mark_failures(torch.isfinite(loss) & torch.isfinite(state.flat_grads.sum(dim=1)))
        adamw(state, state.healthy_models())
        return loss

    @torch.no_grad()
    def logits(self, state, models: np.ndarray, x: Tensor, y: Tensor) -> Tensor:
        """Each model on its own, so its shapes do not depend on the others listed."""
        out = []
        for m in models:
            params = {k: v[m:m + 1] for k, v in state.params.items()}
            tab = tables_forward(params, state.rows, self.row_index(state))
            out.append(torch.cat([examples_forward(params, state.rows, tab, x[None, s:s + self.chunk],
                                                   y[None, s:s + self.chunk], keep_cache=False,
                                                   precision=state.precision)[0]
                                  for s in range(0, len(x), self.chunk)], dim=1))
        return torch.cat(out) if out else state.flat_params.new_empty(0, len(x), state.cfg.d_vocab)


def adamw(state, models: np.ndarray) -> None:
    """AdamW on the given models with their own lr and weight decay.

    Uses the kernel behind ``torch.optim.AdamW(fused=True)``, one call per
    distinct (lr, weight decay) pair, on row views of the flat buffers;
    models not listed (frozen ones) are left untouched.
    """
    b1, b2 = state.optim.betas
    warm = state.optim.lr_at(state.step_count, 1.0)
    step = torch.tensor(float(state.step_count), device=state.device, dtype=state.flat_params.dtype)
    groups: dict[tuple[float, float], list[int]] = {}
    for m in models:
        groups.setdefault((state.lr[m] * warm, state.weight_decay[m]), []).append(int(m))
    for (lr, wd), ms in groups.items():
        rows = [[buf[m] for m in ms] for buf in (state.flat_params, state.flat_grads, state.exp_avg, state.exp_avg_sq)]
        torch._fused_adamw_(*rows, [], [step] * len(ms), lr=lr, beta1=b1, beta2=b2,
                            weight_decay=wd, eps=state.optim.eps, amsgrad=False, maximize=False)


__all__ = ["TorchBackend", "adamw", "flops_per_example", "flops_per_model_step", "tables_forward",
           "examples_forward", "examples_backward", "tables_backward", "CHUNK"]
