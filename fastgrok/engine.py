"""The batched engine: M independent models stepped together, exactly.

A *population* is M models, each with its own init seed, data seed,
training-set size D_m, learning rate and weight decay, trained in lockstep
with full-batch AdamW. Every tensor carries the model axis first.

Dimensions: M models, N examples (padded to max D_m), R token-table rows,
D d_model, H heads, Dh d_head, F d_mlp, V d_vocab, P parameters per model.

The algorithm exploits the structure of the task exactly:

* The loss reads only the last position, whose token is always ``=``. So the
  query, the attention output, the MLP and the unembedding are computed for
  that position only; the residual there before attention, ``c = W_E[=] +
  W_pos[3]``, is the same for every example.
* Every key and value is a function of (token, position) alone: position 0
  holds one of n elements, 1 the operator, 2 one of n elements, 3 ``=``. So
  keys, values and attention scores are computed once per step for the
  R = 2n + 2 (token, position) *rows* of a model, not per example; an
  example then only gathers its 4 rows. Per example remain: the softmax over
  4 scores per head, z = sum_t a_t v_t, and four matmuls
  (z @ W_O, the two MLP layers, the unembedding) forward, twice that backward.

FLOPs per example, forward + backward (see ``flops_per_example``):
    6 * (H*Dh*D + 2*D*F + D*V) + O(H*Dh + F + V)
    = 0.97 MFLOP at the paper config (full-sequence model: ~5.1 MFLOP),
plus per model and step ~6 * R*D*H*Dh * 2 for the key/value tables
(~30 MFLOP at the paper config, ~1.5% of a D = 2000 step).

Ragged training sets: example slots are padded to N = max_m D_m. A padded
slot repeats the model's own first training example and has loss weight 0, so
no model reads another model's data and padding never introduces a
non-finite value that a healthy model did not already have. The waste is
sum_m (N - D_m) example slots per step: none when all D are equal, at most
27% for the semi-grokking sweep (D = 1500..2050). Weights are 1/D_m on real
slots, so each model gets its own mean loss.

Parameters, gradients and both AdamW moments live in flat (M, P) buffers (the
per-name tensors are views), so the optimiser is a handful of large
element-wise ops with per-model lr and weight decay as (M, 1) tensors, and
checkpoints are four arrays.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from fastgrok.config import ModelConfig, OptimConfig, RunSpec
from fastgrok.model import PARAM_NAMES, init_params, param_shapes, stable_cross_entropy_fwd_bwd
from fastgrok.tasks import Task


def flops_per_example(cfg: ModelConfig) -> int:
    """Matmul FLOPs per training example, forward + backward, of this engine."""
    D, H, Dh, F, V = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    return 6 * (H * Dh * D + 2 * D * F + D * V)


def flops_per_model_step(cfg: ModelConfig, n_examples: int) -> int:
    """FLOPs of one model's training step: examples plus key/value/score tables."""
    R = 2 * (cfg.d_vocab - 2) + 2
    D, HDh = cfg.d_model, cfg.n_heads * cfg.d_head
    tables = 3 * 2 * (2 * R * D * HDh) + 3 * 2 * R * HDh  # K and V rows, scores; fwd + 2x bwd
    return n_examples * flops_per_example(cfg) + tables


class TokenRows:
    """The R = 2n + 2 (token, position) rows whose keys and values are tabulated.

    Row r < n: element r at position 0; r = n: operator at position 1;
    n < r < 2n + 1: element r - n - 1 at position 2; r = 2n + 1: ``=`` at 3.
    """

    def __init__(self, n: int, device):
        self.n = n
        self.R = 2 * n + 2
        elems = torch.arange(n, device=device)
        self.token = torch.cat([elems, elems.new_tensor([n]), elems, elems.new_tensor([n + 1])])
        self.pos = torch.cat([torch.zeros_like(elems), elems.new_tensor([1]),
                              torch.full_like(elems, 2), elems.new_tensor([3])])
        self.op_row, self.eq_row = n, 2 * n + 1

    def x_row(self, x: Tensor) -> Tensor:
        return x

    def y_row(self, y: Tensor) -> Tensor:
        return y + self.n + 1


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
    z: Tensor         # (M, N, H*Dh)
    resid_mid: Tensor # (M, N, D)
    hidden: Tensor    # (M, N, F) relu output; hidden > 0 is the relu mask
    resid_fin: Tensor # (M, N, D)


@dataclass
class TableGrads:
    """Gradients w.r.t. the row tables, accumulated over chunks of examples."""

    dV: Tensor        # (M*R, H, Dh)
    dS: Tensor        # (M*R, H)
    dc: Tensor        # (M, D) from the residual connection of the last position


def tables_forward(p: dict[str, Tensor], rows: TokenRows) -> Tables:
    Dh = p["W_Q"].shape[3]
    R_tab = p["W_E"][:, rows.token] + p["W_pos"][:, rows.pos]                # (M, R, D)
    K_tab = torch.einsum("mrd,mhde->mrhe", R_tab, p["W_K"])                  # (M, R, H, Dh)
    V_tab = torch.einsum("mrd,mhde->mrhe", R_tab, p["W_V"])                  # (M, R, H, Dh)
    q = torch.einsum("md,mhde->mhe", R_tab[:, rows.eq_row], p["W_Q"])        # (M, H, Dh)
    S_tab = torch.einsum("mrhe,mhe->mrh", K_tab, q) * (1 / math.sqrt(Dh))    # (M, R, H)
    return Tables(R_tab, K_tab, V_tab, q, S_tab)


def examples_forward(p: dict[str, Tensor], rows: TokenRows, tab: Tables, x: Tensor, y: Tensor,
                     keep_cache: bool = True) -> tuple[Tensor, Cache | None]:
    """Last-position logits (M, N, V) of M models on examples (x, y) of shape (M, N)."""
    M, N = x.shape
    _, R, H, Dh = tab.V_tab.shape
    offset = (torch.arange(M, device=x.device) * R).unsqueeze(1)             # (M, 1)
    rows_x = (rows.x_row(x) + offset).reshape(-1)                            # (M*N,)
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

    W_O = p["W_O"].view(M, H * Dh, -1)                                       # (M, H*Dh, D)
    resid_mid = torch.baddbmm(tab.c.unsqueeze(1), z, W_O)                    # (M, N, D)
    hidden = torch.baddbmm(p["b_in"].unsqueeze(1), resid_mid, p["W_in"]).relu_()  # (M, N, F)
    resid_fin = torch.baddbmm(p["b_out"].unsqueeze(1), hidden, p["W_out"]).add_(resid_mid)
    logits = torch.bmm(resid_fin, p["W_U"])                                  # (M, N, V)
    if not keep_cache:
        return logits, None
    return logits, Cache(rows_x, rows_y, a, Vx, Vy, z, resid_mid, hidden, resid_fin)


def examples_backward(p: dict[str, Tensor], g: dict[str, Tensor], rows: TokenRows, tab: Tables,
                      cache: Cache, dlogits: Tensor, acc: TableGrads) -> None:
    """Accumulate the gradients of sum(dlogits * logits) of one chunk.

    Weight gradients are added into ``g`` (W_U, b_out, W_out, b_in, W_in, W_O);
    gradients w.r.t. the row tables into ``acc``.
    """
    M, N, _ = dlogits.shape
    _, R, H, Dh = tab.V_tab.shape
    C = cache

    # Unembedding and MLP.
    g["W_U"].baddbmm_(C.resid_fin.transpose(1, 2), dlogits)
    dresid = torch.bmm(dlogits, p["W_U"].transpose(1, 2))                   # (M, N, D)
    g["b_out"].add_(dresid.sum(1))
    g["W_out"].baddbmm_(C.hidden.transpose(1, 2), dresid)
    dpre = torch.bmm(dresid, p["W_out"].transpose(1, 2))                    # (M, N, F)
    dpre = torch.ops.aten.threshold_backward(dpre, C.hidden, 0)              # relu'
    g["b_in"].add_(dpre.sum(1))
    g["W_in"].baddbmm_(C.resid_mid.transpose(1, 2), dpre)
    dresid.baddbmm_(dpre, p["W_in"].transpose(1, 2))                         # d resid_mid
    acc.dc.add_(dresid.sum(1))

    # Attention output: resid_mid = c + z @ W_O.
    W_O = p["W_O"].view(M, H * Dh, -1)
    g["W_O"].view(M, H * Dh, -1).baddbmm_(C.z.transpose(1, 2), dresid)
    dz = torch.bmm(dresid, W_O.transpose(1, 2)).view(M, N, H, Dh)

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


def tables_backward(p: dict[str, Tensor], g: dict[str, Tensor], rows: TokenRows, tab: Tables,
                    acc: TableGrads) -> None:
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
    g["W_E"].zero_().index_add_(1, rows.token, dR)
    g["W_pos"].zero_().index_add_(1, rows.pos, dR)


# Examples per chunk: keeps a chunk's activations (~chunk * (3F + 6D + 3V)
# floats per model, 2.7 MB at the paper config) within the L2 cache and the
# memory per model independent of D.
CHUNK = 256


BACKENDS = ("auto", "torch", "cpu", "triton")


def resolve_backend(name: str, device: torch.device) -> tuple[str, object | None]:
    """Pick the implementation of ``Population.step``.

    ``torch`` is this module (any device). ``cpu`` is the C++ engine
    (``fastgrok.cpu_engine``), ``triton`` the fused kernels
    (``fastgrok.triton_engine``); each module exposes ``available(device) ->
    (ok, reason)`` and ``step(pop) -> losses``. ``auto`` takes the fastest
    available one. A named backend that is unavailable falls back to
    ``torch`` with a warning that says why.
    """
    import importlib
    import warnings

    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    candidates = {"auto": ["triton", "cpu"], "torch": [], "cpu": ["cpu"], "triton": ["triton"]}[name]
    for cand in candidates:
        try:
            module = importlib.import_module(f"fastgrok.{cand}_engine")
            ok, reason = module.available(device)
        except ImportError as exc:
            ok, reason = False, f"fastgrok.{cand}_engine cannot be imported ({exc})"
        if ok:
            return cand, module
        if name != "auto":
            warnings.warn(f"backend {cand!r} unavailable: {reason}; using the batched PyTorch engine",
                          stacklevel=3)
    return "torch", None


class Population:
    """M independent models trained together with full-batch AdamW.

    ``runs[m]`` fixes model m's training-set size, seeds, lr and weight decay;
    the model and optimiser constants (betas, eps, warm-up) are shared.
    Training is float32 (SPEC); ``dtype=torch.float64`` exists to check the
    algorithm against the float64 oracle free of float32 rounding, which
    chaotic stretches of training amplify.
    """

    def __init__(self, task: Task, model_cfg: ModelConfig, runs: list[RunSpec],
                 optim_cfg: OptimConfig = OptimConfig(), device: str | torch.device = "cpu",
                 chunk: int = CHUNK, backend: str = "torch", dtype: torch.dtype = torch.float32):
        if not runs:
            raise ValueError("a population needs at least one RunSpec; got an empty list")
        if model_cfg.n_ctx != 4:
            raise ValueError(f"n_ctx={model_cfg.n_ctx}: the tasks' sequences <x> <op> <y> <=> have 4 tokens")
        if model_cfg.d_vocab != task.cfg.d_vocab:
            raise ValueError(f"d_vocab={model_cfg.d_vocab} does not match the task's {task.cfg.d_vocab}")
        self.task, self.cfg, self.runs, self.optim = task, model_cfg, list(runs), optim_cfg
        self.device = torch.device(device)
        self.M = M = len(runs)
        self.chunk = chunk
        self.rows = TokenRows(task.cfg.n, self.device)
        self.shapes = param_shapes(model_cfg)
        self.sizes = {k: math.prod(s) for k, s in self.shapes.items()}
        self.P = sum(self.sizes.values())

        # Flat state; per-name tensors are views into it.
        self.flat_params = torch.stack([
            torch.cat([init_params(model_cfg, r.init_seed)[k].reshape(-1) for k in PARAM_NAMES])
            for r in runs]).to(device=self.device, dtype=dtype)              # (M, P)
        self.flat_grads = torch.zeros_like(self.flat_params)
        self.exp_avg = torch.zeros_like(self.flat_params)
        self.exp_avg_sq = torch.zeros_like(self.flat_params)
        self.params = self._views(self.flat_params)
        self.grads = self._views(self.flat_grads)
        self.step_count = 0
        # Step at which a model went non-finite and was frozen; -1 if healthy.
        self.failed_step = np.full(M, -1, dtype=np.int64)

        self.lr = np.array([r.lr for r in runs], dtype=np.float64)
        self.weight_decay = np.array([r.weight_decay for r in runs], dtype=np.float64)
        for m, r in enumerate(runs):
            if not r.lr > 0:
                raise ValueError(f"model {m}: lr={r.lr!r} must be > 0")
            if not r.weight_decay >= 0:
                raise ValueError(f"model {m}: weight_decay={r.weight_decay!r} must be >= 0")
        self._build_data()
        self.backend, self._backend_impl = resolve_backend(backend, self.device)

    def param_slices(self) -> dict[str, tuple[int, int]]:
        """(start, stop) of each parameter in a model's flat row, in PARAM_NAMES order."""
        out, start = {}, 0
        for k in PARAM_NAMES:
            out[k] = (start, start + self.sizes[k])
            start += self.sizes[k]
        return out

    def _views(self, flat: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        for k in PARAM_NAMES:
            out[k] = flat[:, start:start + self.sizes[k]].view(self.M, *self.shapes[k])
            start += self.sizes[k]
        return out

    def _build_data(self):
        task = self.task
        self.splits = [task.split(r.data_seed, r.train_size, r.random_labels) for r in self.runs]
        self.train_size = np.array([r.train_size for r in self.runs])
        N = int(self.train_size.max())
        idx = np.zeros((self.M, N), dtype=np.int64)
        labels = np.zeros((self.M, N), dtype=np.int64)
        weight = np.zeros((self.M, N), dtype=np.float64)
        for m, s in enumerate(self.splits):
            D = len(s.train_idx)
            idx[m, :D], labels[m, :D], weight[m, :D] = s.train_idx, s.train_labels, 1.0 / D
            idx[m, D:], labels[m, D:] = s.train_idx[0], s.train_labels[0]  # padding: own data, weight 0
        dev = self.device
        self.train_x = torch.as_tensor(task.x[idx], device=dev)
        self.train_y = torch.as_tensor(task.y[idx], device=dev)
        self.train_labels = torch.as_tensor(labels, device=dev)
        self.train_weight = torch.as_tensor(weight, device=dev, dtype=self.flat_params.dtype)

    # ------------------------------------------------------------------ training
    def loss_and_grad(self) -> Tensor:
        """Mean training loss per model (M,); gradients land in ``self.grads``."""
        p, g, rows, M = self.params, self.grads, self.rows, self.M
        tab = tables_forward(p, rows)
        for k in ("W_U", "b_out", "W_out", "b_in", "W_in", "W_O"):
            g[k].zero_()
        H, Dh = self.cfg.n_heads, self.cfg.d_head
        acc = TableGrads(dV=tab.V_tab.new_zeros(M * rows.R, H, Dh),
                         dS=tab.S_tab.new_zeros(M * rows.R, H),
                         dc=tab.R_tab.new_zeros(M, self.cfg.d_model))
        loss = tab.R_tab.new_zeros(M)
        for s in range(0, self.train_x.shape[1], self.chunk):
            sl = slice(s, s + self.chunk)
            logits, cache = examples_forward(p, rows, tab, self.train_x[:, sl], self.train_y[:, sl])
            ex_loss, dlogits = stable_cross_entropy_fwd_bwd(logits, self.train_labels[:, sl])
            w = self.train_weight[:, sl]
            dlogits.mul_(w.unsqueeze(-1))
            loss += (ex_loss * w).sum(1)
            examples_backward(p, g, rows, tab, cache, dlogits, acc)
        tables_backward(p, g, rows, tab, acc)
        return loss

    def step(self) -> Tensor:
        """One full-batch AdamW step of every healthy model; returns the losses (M,)."""
        if self._backend_impl is not None:
            return self._backend_impl.step(self)
        loss = self.loss_and_grad()
        self.step_count += 1
        # A sum over a model's gradients is non-finite iff one of them is (or
        # they overflow float32, which is divergence all the same): one pass.
        self.mark_failures(torch.isfinite(loss) & torch.isfinite(self.flat_grads.sum(dim=1)))
        self._adamw(self.healthy_models())
        return loss

    def mark_failures(self, finite: Tensor) -> None:
        """Freeze models whose ``finite`` flag (M,) is False, noting the step."""
        newly_failed = ~finite.cpu().numpy() & (self.failed_step < 0)
        self.failed_step[newly_failed] = self.step_count

    def healthy_models(self) -> np.ndarray:
        return np.flatnonzero(self.failed_step < 0)

    def _adamw(self, models: np.ndarray):
        """AdamW on the given models with their own lr and weight decay.

        Uses the kernel behind ``torch.optim.AdamW(fused=True)``, one call per
        distinct (lr, weight decay) pair, on row views of the flat buffers;
        models not listed (frozen ones) are left untouched.
        """
        b1, b2 = self.optim.betas
        warm = self.optim.lr_at(self.step_count, 1.0)
        step = torch.tensor(float(self.step_count), device=self.device, dtype=self.flat_params.dtype)
        groups: dict[tuple[float, float], list[int]] = {}
        for m in models:
            groups.setdefault((self.lr[m] * warm, self.weight_decay[m]), []).append(int(m))
        for (lr, wd), ms in groups.items():
            rows = [[buf[m] for m in ms] for buf in
                    (self.flat_params, self.flat_grads, self.exp_avg, self.exp_avg_sq)]
            torch._fused_adamw_(*rows, [], [step] * len(ms), lr=lr, beta1=b1, beta2=b2,
                                weight_decay=wd, eps=self.optim.eps, amsgrad=False, maximize=False)

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def all_logits(self, models: slice | Sequence[int] | None = None, pairs: slice = slice(None)) -> Tensor:
        """Last-position logits (K, n, V) of the given models on the task's pairs ``pairs``.

        Each model is computed on its own, with shapes that do not depend on
        which or how many models are asked for (BLAS blocks batched products
        by shape), and on the C++ engine by its own forward pass: so on the
        ``cpu`` backend a model's logits are the same bits alone or among
        others, with any thread count.
        """
        if models is None:
            models = slice(None)
        index = np.arange(self.M)[models] if isinstance(models, slice) else np.asarray(models, dtype=np.int64)
        x = torch.as_tensor(self.task.x[pairs], device=self.device)
        y = torch.as_tensor(self.task.y[pairs], device=self.device)
        if self.backend == "cpu":
            return self._backend_impl.logits(self, index, x, y)
        out = []
        for m in index:
            params = {k: v[m:m + 1] for k, v in self.params.items()}
            tab = tables_forward(params, self.rows)
            out.append(torch.cat([examples_forward(params, self.rows, tab, x[None, s:s + self.chunk],
                                                   y[None, s:s + self.chunk], keep_cache=False)[0]
                                  for s in range(0, len(x), self.chunk)], dim=1))
        return torch.cat(out) if out else self.flat_params.new_empty(0, len(x), self.cfg.d_vocab)

    def model_params(self, m: int) -> dict[str, Tensor]:
        """Model m's parameters as a reference-model state dict (copies)."""
        return {k: v[m].detach().clone() for k, v in self.params.items()}
