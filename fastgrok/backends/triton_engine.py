"""The triton backend: a training step in four fused launches on a CUDA GPU.

``TritonBackend`` is a ``fastgrok.backends.Backend``. A step of the population is

1. ``fastgrok.kernels.tables_forward``  grid (M, row blocks)        key/value/score tables
2. ``fastgrok.kernels.examples``        grid (programs,)            loss and gradients of every
                                        persistent over groups      example, summed per group of tiles
3. ``fastgrok.kernels.reduce``          grid (M, blocks)            the sums completed in a fixed order:
                                                                    gradients of W_O..W_U, row tables
4. ``fastgrok.kernels.adamw``           grid (M, 1 + param blocks)  gradients of W_E..W_V,
                                                                    AdamW of healthy models

and computes what the torch backend's step computes: the same last-position,
row-table algorithm, the same stable cross-entropy, torch.optim.AdamW with
per-model lr and weight decay and the optimiser's warm-up, fp32 parameters,
gradients (left in ``state.flat_grads`` as the torch backend does) and
moments, and the same freezing of non-finite models, at the population's
matmul precision ``state.precision`` (fastgrok.precision: every mode, each
operand rounded once where the kernels write it, exactly as the torch backend
rounds it).
``loss_and_grad`` runs launches 1-3 and the table backward alone
(``fastgrok.kernels.tables_backward.tables_backward_kernel``): no update, no
freezing. ``logits`` (evaluation) is the torch backend's forward
(``fastgrok.backends.torch_engine``), model by model.

Deterministic: no floating-point atomics; every sum has a fixed order that
depends on a model's own training set, so two runs on one GPU are bitwise
equal, and a model's bits do not depend on its batch-mates (for a fixed
device type, software versions and tiling options).

Self-check: the first step of a population is also computed by the torch
backend on a copy of the state. If the losses or any model's gradients differ
by more than ``SELF_CHECK_BOUND[precision]`` (relative to that model's
largest gradient), or the failure flags differ, one warning says so, the
state takes the torch backend's result and the population continues on the
torch backend: ``name`` then reports "torch", which the run file records.

Options, the constructor's arguments:

* cuda_graph: capture the four launches in a CUDA graph once the kernels
  are compiled and replay it every step.
* block_n, block_c, block_v, block_g, block_k, group_tiles, fused_mlp, stage_tiles, one_pass,
  programs: tiles of the example kernel, tiles per group (one program and one
  partial row per group: more tiles per group is less memory, 4 (P - offset of
  W_O) bytes per group, and fewer work items), its MLP variant and whether the
  fused one holds a tile's operands on chip across its chunks, whether its
  cross-entropy takes one pass over one chunk of every logit
  (fastgrok.kernels.examples docstring), and its persistent grid. None (the default) takes
  the precision's tiles, fastgrok.kernels.examples.TILINGS, which compile
  without spills on sm_80 and sm_90 (bench/triton_resources.py).
* self_check: compare the first step with the torch backend (above).

A backend object belongs to one population. It keeps that population's
device state (workspace, tiles, device copies of lr, weight decay and the
failure steps, the CUDA graph) and rebuilds it when the state's buffers,
training data, configs or precision change. Per step the host writes 4
doubles (step, warm-up factor, bias corrections) to the device and reads back
M int32 failure flags for ``state.mark_failures`` (one small synchronisation
per step).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastgrok.backends.torch_engine import TorchBackend
from fastgrok.kernels.adamw import adamw_launch, step_scalars
from fastgrok.kernels.examples import Tiles, allocate_scratch, examples_launch, tiling as example_tiling
from fastgrok.kernels.layout import DEFAULT_PRECISION, PRECISIONS, Layout, Workspace
from fastgrok.kernels.reduce import reduce_launch
from fastgrok.kernels.tables_backward import tables_backward_launch
from fastgrok.kernels.tables_forward import tables_forward_launch

# Largest difference from the torch backend the self-check accepts, relative to
# each model's largest gradient (and loss). Both backends round the same
# operands, so they differ by the order of float32 accumulation, and by the
# operand roundings that it flips: a few units of the rounded format's last
# place (2^-24 fp32, ~2^-17 bf16x3's lo part, 2^-11 tf32, 2^-8 bf16) times a
# margin of ~100 for the sums of a step at the paper config.
SELF_CHECK_BOUND = {"fp32": 1e-4, "bf16x3": 2e-4, "tf32": 5e-3, "bf16": 4e-2}


@dataclass(frozen=True)
class Options:
    """cuda_graph, self_check: see the module docstring. block_n examples per tile,
    block_c the hidden-unit chunk, block_v the logit chunk, block_g the rows of a weight-gradient chunk
    and block_k the reduction chunk of the example kernel's matmuls, group_tiles tiles
    per group, fused_mlp, stage_tiles and one_pass (see the module docstring); None: the
    precision's (``for_precision``). programs: the size of its persistent grid (None:
    one per SM, as many as fit at 255 registers per thread; 4 without a GPU)."""

    cuda_graph: bool = False
    block_n: int | None = None
    block_c: int | None = None
    block_k: int | None = None
    block_g: int | None = None
    block_v: int | None = None
    group_tiles: int | None = None
    programs: int | None = None
    self_check: bool = True
    fused_mlp: bool | None = None
    stage_tiles: bool | None = None
    one_pass: bool | None = None

    def __post_init__(self):
        for name in ("cuda_graph", "self_check"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be True or False")
        if self.programs is not None and (not isinstance(self.programs, int) or self.programs < 1):
            raise ValueError(f"programs={self.programs!r}: must be an integer >= 1 (or None for one per SM)")
        if self.group_tiles is not None and (not isinstance(self.group_tiles, int) or self.group_tiles < 1):
            raise ValueError(f"group_tiles={self.group_tiles!r}: must be an integer >= 1 (or None)")
        for name in ("fused_mlp", "stage_tiles", "one_pass"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be True, False or None")
        for name in ("block_n", "block_c", "block_v", "block_g", "block_k"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 16 or value & (value - 1)):
                raise ValueError(f"{name}={value!r}: must be a power of two >= 16 (tl.dot's minimum), or None")

    def for_precision(self, precision: str, arch: int) -> dict:
        """The example kernel's tiles at ``precision`` on compute capability ``arch`` (x10): these
        options where set, else the defaults."""
        return example_tiling(precision, arch, block_n=self.block_n, block_c=self.block_c, block_v=self.block_v,
                              block_g=self.block_g, block_k=self.block_k, group_tiles=self.group_tiles,
                              fused_mlp=self.fused_mlp, stage_tiles=self.stage_tiles, one_pass=self.one_pass)


def _key(state) -> tuple:
    """What the device state (tiles, a captured graph) depends on; a change rebuilds it."""
    tensors = (state.flat_params, state.flat_grads, state.exp_avg, state.exp_avg_sq,
               state.train_x, state.train_y, state.train_labels, state.train_weight)
    return (id(state), tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in tensors),
            tuple(state.train_size.tolist()), state.cfg, state.rows, state.optim.betas, state.optim.eps,
            state.precision)


class _DeviceState:
    """Workspace, tiles, device copies of the host's per-model arrays and the optional CUDA graph."""

    def __init__(self, state, options: Options):
        self.options = options
        if state.precision not in PRECISIONS:
            raise ValueError(f"precision={state.precision!r}; the triton backend offers {', '.join(PRECISIONS)}")
        self.layout = Layout.from_config(state.cfg, state.rows)
        if self.layout.params != state.layout:
            raise ValueError(f"the state's parameter layout (P={state.layout.P}) is not its model config's "
                             f"(P={self.layout.P})")
        if state.flat_params.dtype != torch.float32:
            raise ValueError(f"the fused kernels train float32 populations; this one is {state.flat_params.dtype}")
        dev = state.device
        if options.cuda_graph and dev.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device; the population is on {dev}")
        self.key = _key(state)
        major, minor = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else (9, 0)
        self.arch = 10 * major + minor
        self.tiling = options.for_precision(state.precision, self.arch)
        self.tiles = Tiles.build(state.train_size, state.train_x, state.train_y, state.rows.n,
                                 self.tiling["block_n"], self.tiling["group_tiles"], dev)
        self.ws = Workspace.allocate(self.layout, state.M, state.train_x.shape[1], self.tiles.count, dev,
                                     precision=state.precision)
        programs = options.programs
        if programs is None:
            programs = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
        # One scratch row per program: the activations of the tile it works on as
        # matmul operands (bf16 in bf16), plus an fp32 row, so that it stays in L2.
        self.scratch = allocate_scratch(self.layout, min(programs, self.tiles.count), state.precision,
                                        self.tiling["block_n"], dev)
        self.hyper = torch.zeros(4, dtype=torch.float64, device=dev)
        # Copies (torch.tensor), never views of the host arrays: on the CPU too,
        # host changes must go through upload_host_changes as they do on a GPU.
        self.lr = torch.tensor(state.lr, dtype=torch.float64, device=dev)
        self.wd = torch.tensor(state.weight_decay, dtype=torch.float64, device=dev)
        self.failed = torch.tensor(state.failed_step, dtype=torch.int32, device=dev)
        self.synced = (state.lr.copy(), state.weight_decay.copy(), state.failed_step.copy())
        self.graph = None
        self.compiled = False

    def upload_host_changes(self, state) -> None:
        """Copy lr, weight decay and failure steps the host changed since the last step."""
        lr, wd, failed = self.synced
        if not np.array_equal(lr, state.lr):
            self.lr.copy_(torch.as_tensor(state.lr, dtype=torch.float64))
        if not np.array_equal(wd, state.weight_decay):
            self.wd.copy_(torch.as_tensor(state.weight_decay, dtype=torch.float64))
        if not np.array_equal(failed, state.failed_step):
            self.failed.copy_(torch.as_tensor(state.failed_step, dtype=torch.int32))
        self.synced = (state.lr.copy(), state.weight_decay.copy(), state.failed_step.copy())

    def launch_gradients(self, state) -> None:
        """Launches 1-3: loss, the gradients of W_O..W_U and the summed row-table gradients."""
        L, ws = self.layout, self.ws
        tables_forward_launch(L, state.flat_params, ws, state.precision, block_k=self.tiling["block_k"],
                              arch=self.arch)
        examples_launch(L, state.flat_params, ws, self.scratch, state.train_x, state.train_y, state.train_labels,
                        state.train_weight, self.tiles, state.precision, arch=self.arch, **self.tiling)
        reduce_launch(L, state.flat_grads, ws, self.tiles, state.train_x.shape[1], arch=self.arch)

    def launch_step(self, state) -> None:
        self.launch_gradients(state)
        adamw_launch(self.layout, state.flat_params, state.flat_grads, state.exp_avg, state.exp_avg_sq, self.lr,
                     self.wd, self.failed, self.hyper, self.ws, state.optim.betas, state.optim.eps, arch=self.arch)

    def run_step(self, state) -> None:
        """The four launches: eagerly, or by replaying a graph captured after one eager step."""
        if not self.options.cuda_graph:
            self.launch_step(state)
            return
        if not self.compiled:
            self.launch_step(state)  # compiles the kernels outside the capture
            self.compiled = True
            return
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.launch_step(state)
        self.graph.replay()


_STATE_BUFFERS = ("flat_params", "flat_grads", "exp_avg", "exp_avg_sq")


def _copy_state(state):
    """A copy of ``state`` whose parameters, gradients, moments and host arrays are its own."""
    twin = copy.copy(state)
    for name in _STATE_BUFFERS:
        setattr(twin, name, getattr(state, name).clone())
    twin.params, twin.grads = state.layout.views(twin.flat_params), state.layout.views(twin.flat_grads)
    for name in ("failed_step", "lr", "weight_decay"):
        setattr(twin, name, getattr(state, name).copy())
    return twin


def self_check_problem(state, loss: Tensor, twin, twin_loss: Tensor) -> str | None:
    """Why the triton step of ``state`` disagrees with the torch step of its copy ``twin``
    (None if within SELF_CHECK_BOUND[state.precision])."""
    bound = SELF_CHECK_BOUND[state.precision]
    if not np.array_equal(state.failed_step, twin.failed_step):
        return f"frozen models differ: {np.flatnonzero(state.failed_step != twin.failed_step).tolist()}"
    for m in np.flatnonzero(twin.failed_step < 0):
        want, got = twin.flat_grads[m], state.flat_grads[m]
        scale = want.abs().max().item()
        err = (got - want).abs().max().item()
        if not err <= bound * scale:  # also catches NaN
            return f"model {m}: gradients differ by {err:.3g}, over {bound:g} x their largest {scale:.3g}"
        err = abs(loss[m].item() - twin_loss[m].item())
        if not err <= bound * abs(twin_loss[m].item()):
            return f"model {m}: loss {loss[m].item():.9g} against {twin_loss[m].item():.9g}"
    return None


class TritonBackend:
    """The fused Triton kernels as a backend (module docstring); options as in ``Options``."""

    precisions = PRECISIONS
    default_precision = DEFAULT_PRECISION

    def __init__(self, cuda_graph: bool = False, block_n: int | None = None, block_c: int | None = None,
                 block_k: int | None = None, group_tiles: int | None = None, programs: int | None = None,
                 self_check: bool = True, fused_mlp: bool | None = None, stage_tiles: bool | None = None,
                 block_g: int | None = None, block_v: int | None = None, one_pass: bool | None = None):
        self.options = Options(cuda_graph=cuda_graph, block_n=block_n, block_c=block_c, block_k=block_k,
                               block_g=block_g, block_v=block_v, group_tiles=group_tiles, programs=programs,
                               self_check=self_check, fused_mlp=fused_mlp, stage_tiles=stage_tiles,
                               one_pass=one_pass)
        self._device_state: _DeviceState | None = None
        self._torch = TorchBackend()
        self._checked = not self_check
        self._fallback = False

    @property
    def name(self) -> str:
        """ "triton", or "torch" once the self-check has handed the population to the torch backend."""
        return self._torch.name if self._fallback else "triton"

    @classmethod
    def available(cls, device) -> tuple[bool, str]:
        """(True, "") when ``device`` is a usable CUDA device (Triton imported with this module)."""
        device = torch.device(device)
        if device.type != "cuda":
            return False, f"device {str(device)!r} is not a CUDA device (the Triton kernels need a CUDA GPU)"
        if not torch.cuda.is_available():
            return False, "torch sees no CUDA GPU"
        return True, ""

    def device_state(self, state) -> _DeviceState:
        """This population's device state, rebuilt when its buffers, data or configs changed."""
        if self._device_state is None or self._device_state.key != _key(state):
            self._device_state = None  # free the old buffers before allocating new ones
            self._device_state = _DeviceState(state, self.options)
        return self._device_state

    def step(self, state) -> Tensor:
        """One full-batch AdamW step of every healthy model of ``state``; the mean losses (M,)."""
        if self._fallback:
            return self._torch.step(state)
        if self._checked:
            return self._step(state)
        twin = _copy_state(state)
        loss = self._step(state)
        twin_loss = self._torch.step(twin)
        self._checked = True
        problem = self_check_problem(state, loss, twin, twin_loss)
        if problem is None:
            return loss
        warnings.warn(f"triton backend: its first step differs from the torch backend's ({problem}, precision "
                      f"{state.precision}); this population continues on the torch backend", stacklevel=2)
        for name in _STATE_BUFFERS:
            getattr(state, name).copy_(getattr(twin, name))
        state.failed_step[:] = twin.failed_step
        self._fallback, self._device_state = True, None
        return twin_loss

    def _step(self, state) -> Tensor:
        dev = self.device_state(state)
        dev.upload_host_changes(state)
        step_count = state.step_count + 1
        scalars = step_scalars(step_count, state.optim.lr_at(step_count, 1.0), state.optim.betas)
        dev.hyper.copy_(torch.tensor(scalars, dtype=torch.float64))
        dev.run_step(state)
        state.step_count = step_count
        newly_failed = dev.failed.cpu().numpy() == step_count
        state.mark_failures(torch.from_numpy(~newly_failed))
        dev.synced = (dev.synced[0], dev.synced[1], state.failed_step.copy())
        return dev.ws.loss.clone()

    def loss_and_grad(self, state) -> Tensor:
        """Mean training losses (M,) of every model, frozen ones included; gradients into ``state.flat_grads``."""
        if self._fallback:
            return self._torch.loss_and_grad(state)
        dev = self.device_state(state)
        dev.launch_gradients(state)
        tables_backward_launch(dev.layout, state.flat_params, state.flat_grads, dev.ws, arch=dev.arch)
        return dev.ws.loss.clone()

    def logits(self, state, models: np.ndarray, x: Tensor, y: Tensor) -> Tensor:
        """The torch backend's forward, one model at a time (evaluation is not the hot path)."""
        return self._torch.logits(state, models, x, y)


__all__ = ["TritonBackend", "Options", "SELF_CHECK_BOUND"]
