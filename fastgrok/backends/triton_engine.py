"""The triton backend: a training step in three fused launches on a CUDA GPU.

``TritonBackend`` is a ``fastgrok.backends.Backend``. A step of the population is

1. ``fastgrok.kernels.tables_forward``  grid (M, row blocks)       key/value/score tables
2. ``fastgrok.kernels.examples``        grid (programs,)           loss, gradients of W_O..W_U
                                        persistent over tiles      and of the row tables
3. ``fastgrok.kernels.adamw``           grid (M, 1 + param blocks) gradients of W_E..W_V,
                                                                   AdamW of healthy models

and computes what the torch backend's step computes: the same last-position,
row-table algorithm, the same stable cross-entropy, torch.optim.AdamW with
per-model lr and weight decay and the optimiser's warm-up, fp32 parameters,
gradients (left in ``state.flat_grads`` as the torch backend does) and
moments, and the same freezing of non-finite models. ``loss_and_grad`` runs
launches 1 and 2 and the table backward alone
(``fastgrok.kernels.tables_backward.tables_backward_kernel``): no update, no
freezing. ``logits`` (evaluation) is the torch backend's forward
(``fastgrok.backends.torch_engine``), model by model.

Options, the constructor's arguments:

* precision: matmul inputs, one of fastgrok.kernels.layout.PRECISIONS. The
  default "tf32x3" is fp32-class (~2^-21 relative error per product, against
  2^-24) on tensor cores; "ieee" is fp32 FMA on the CUDA cores (3x slower on
  an H100); "tf32" and "bf16" trade input precision for speed (fp32
  accumulation and master weights in every mode).
* cuda_graph: capture the three launches in a CUDA graph once the kernels
  are compiled and replay it every step.
* block_n, block_c, block_k, programs: tiles and persistent grid of the
  example kernel (the defaults compile without spills on sm_80 and sm_90;
  bench/triton_resources.py).

A backend object belongs to one population. It keeps that population's
device state (workspace, tiles, device copies of lr, weight decay and the
failure steps, the CUDA graph) and rebuilds it when the state's buffers,
training data or configs change. Per step the host writes 4 doubles (step,
warm-up factor, bias corrections) to the device and reads back M int32
failure flags for ``state.mark_failures`` (one small synchronisation per step).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastgrok.backends.torch_engine import TorchBackend
from fastgrok.kernels.adamw import adamw_launch, step_scalars
from fastgrok.kernels.examples import Tiles, examples_launch, scratch_floats
from fastgrok.kernels.layout import DEFAULT_PRECISION, PRECISIONS, Layout, Workspace
from fastgrok.kernels.tables_backward import tables_backward_launch
from fastgrok.kernels.tables_forward import tables_forward_launch


@dataclass(frozen=True)
class Options:
    """precision, cuda_graph: see the module docstring. block_n examples per tile,
    block_c and block_k the output-column and reduction chunks of the example
    kernel's matmuls, programs the size of its persistent grid (None: one per
    SM, as many as fit at 255 registers per thread; 4 without a GPU)."""

    precision: str = DEFAULT_PRECISION
    cuda_graph: bool = False
    block_n: int = 64
    block_c: int = 32
    block_k: int = 32
    programs: int | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"cuda_graph={self.cuda_graph!r}: must be True or False")
        if self.programs is not None and (not isinstance(self.programs, int) or self.programs < 1):
            raise ValueError(f"programs={self.programs!r}: must be an integer >= 1 (or None for one per SM)")
        for name in ("block_n", "block_c", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"{name}={value!r}: must be a power of two >= 16 (tl.dot's minimum)")


def _key(state) -> tuple:
    """What the device state (tiles, a captured graph) depends on; a change rebuilds it."""
    tensors = (state.flat_params, state.flat_grads, state.exp_avg, state.exp_avg_sq,
               state.train_x, state.train_y, state.train_labels, state.train_weight)
    return (id(state), tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in tensors),
            tuple(state.train_size.tolist()), state.cfg, state.rows, state.optim.betas, state.optim.eps)


class _DeviceState:
    """Workspace, tiles, device copies of the host's per-model arrays and the optional CUDA graph."""

    def __init__(self, state, options: Options):
        self.options = options
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
        self.ws = Workspace.allocate(self.layout, state.M, dev)
        self.tiles = Tiles.build(state.train_size, options.block_n, dev)
        programs = options.programs
        if programs is None:
            programs = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
        major, minor = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else (9, 0)
        self.arch = 10 * major + minor
        # One scratch row per program: the activations of the tile it works on,
        # 39 MB in total on an H100 at the paper config, so that it stays in L2.
        self.scratch = torch.empty(min(programs, self.tiles.count), scratch_floats(self.layout, options.block_n),
                                   device=dev)
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

    def launch_tables_and_examples(self, state) -> None:
        """Launches 1 and 2: loss, the gradients of W_O..W_U and the summed row-table gradients."""
        o, L, ws = self.options, self.layout, self.ws
        tables_forward_launch(L, state.flat_params, state.flat_grads, ws, o.precision, block_k=o.block_k,
                              arch=self.arch)
        examples_launch(L, state.flat_params, state.flat_grads, ws, self.scratch, state.train_x, state.train_y,
                        state.train_labels, state.train_weight, self.tiles, o.precision, block_n=o.block_n,
                        block_c=o.block_c, block_k=o.block_k, arch=self.arch)

    def launch_step(self, state) -> None:
        self.launch_tables_and_examples(state)
        adamw_launch(self.layout, state.flat_params, state.flat_grads, state.exp_avg, state.exp_avg_sq, self.lr,
                     self.wd, self.failed, self.hyper, self.ws, state.optim.betas, state.optim.eps,
                     self.options.precision, arch=self.arch)

    def run_step(self, state) -> None:
        """The three launches: eagerly, or by replaying a graph captured after one eager step."""
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


class TritonBackend:
    """The fused Triton kernels as a backend (module docstring); options as in ``Options``."""

    name = "triton"
    precisions = ("fp32",)
    default_precision = "fp32"

    def __init__(self, precision: str = DEFAULT_PRECISION, cuda_graph: bool = False, block_n: int = 64,
                 block_c: int = 32, block_k: int = 32, programs: int | None = None):
        self.options = Options(precision, cuda_graph, block_n, block_c, block_k, programs)
        self._device_state: _DeviceState | None = None
        self._forward = TorchBackend()

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
        dev = self.device_state(state)
        dev.launch_tables_and_examples(state)
        tables_backward_launch(dev.layout, state.flat_params, state.flat_grads, dev.ws, self.options.precision,
                               arch=dev.arch)
        return dev.ws.loss.clone()

    def logits(self, state, models: np.ndarray, x: Tensor, y: Tensor) -> Tensor:
        """The torch backend's forward, one model at a time (evaluation is not the hot path)."""
        return self._forward.logits(state, models, x, y)


__all__ = ["TritonBackend", "Options"]
