"""The Triton backend of ``Population.step``: a training step in three fused launches.

``available(device)`` and ``step(pop)`` are the contract of
``fastgrok.engine.resolve_backend``. A step of the population is

1. ``kernels.tables_forward``  grid (M, row blocks)       key/value/score tables
2. ``kernels.examples``        grid (programs,)           loss, gradients of W_O..W_U
                               persistent over tiles      and of the row tables
3. ``kernels.adamw``           grid (M, 1 + param blocks) gradients of W_E..W_V,
                                                          AdamW of healthy models

and computes what ``Population.step`` computes: the same last-position,
row-table algorithm, the same stable cross-entropy, torch.optim.AdamW with
per-model lr and weight decay and the optimiser's warm-up, fp32 parameters,
gradients (left in ``pop.flat_grads`` as the torch engine does) and moments,
and the same freezing of non-finite models.

Options (``configure(pop, ...)`` or environment variables for the CLI):

* precision (FASTGROK_TRITON_PRECISION): matmul inputs, one of
  kernels.layout.PRECISIONS. The default "tf32x3" is fp32-class (~2^-21
  relative error per product, against 2^-24) on tensor cores; "ieee" is fp32
  FMA on the CUDA cores (3x slower on an H100);
  "tf32" and "bf16" trade input precision for speed (fp32 accumulation and
  master weights in every mode).
* cuda_graph (FASTGROK_TRITON_CUDA_GRAPH=1): capture the three launches in a
  CUDA graph once the kernels are compiled and replay it every step.
* block_n, block_c, block_k, programs: tiles and persistent grid of the
  example kernel (the defaults compile without spills on sm_80 and sm_90;
  bench/triton_resources.py).

Per step the host writes 4 doubles (step, warm-up factor, bias corrections)
to the device and reads back M int32 failure flags for
``pop.mark_failures`` (one small synchronisation per step).
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from kernels.adamw import adamw_launch, step_scalars
from kernels.examples import Tiles, examples_launch, scratch_floats
from kernels.layout import DEFAULT_PRECISION, PRECISIONS, Layout, Workspace
from kernels.tables_forward import tables_forward_launch


def available(device) -> tuple[bool, str]:
    """(True, "") when ``device`` is a usable CUDA device (Triton imported with this module)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"device {str(device)!r} is not a CUDA device (the Triton kernels need a CUDA GPU)"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA GPU"
    return True, ""


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
        if self.programs is not None and self.programs < 1:
            raise ValueError(f"programs={self.programs}: must be >= 1 (or None for one per SM)")
        for name in ("block_n", "block_c", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}={value}: must be a power of two >= 16 (tl.dot's minimum)")

    @classmethod
    def from_env(cls) -> "Options":
        return cls(precision=os.environ.get("FASTGROK_TRITON_PRECISION", DEFAULT_PRECISION),
                   cuda_graph=os.environ.get("FASTGROK_TRITON_CUDA_GRAPH", "0") == "1")


class _State:
    """Device buffers, tiles and the optional CUDA graph of one population."""

    def __init__(self, pop, options: Options):
        self.options = options
        self.layout = Layout.from_config(pop.cfg)
        if self.layout.P != pop.flat_params.shape[1]:
            raise ValueError(f"flat parameter rows have {pop.flat_params.shape[1]} entries; "
                             f"the model config implies {self.layout.P}")
        dev = pop.device
        self.key = self._key(pop)
        self.ws = Workspace.allocate(self.layout, pop.M, dev)
        self.tiles = Tiles.build(pop.train_size, options.block_n, dev)
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
        self.lr = torch.tensor(pop.lr, dtype=torch.float64, device=dev)
        self.wd = torch.tensor(pop.weight_decay, dtype=torch.float64, device=dev)
        self.failed = torch.tensor(pop.failed_step, dtype=torch.int32, device=dev)
        self.synced = (pop.lr.copy(), pop.weight_decay.copy(), pop.failed_step.copy())
        self.graph = None
        self.compiled = False

    @staticmethod
    def _key(pop) -> tuple:
        """What the tiles and a captured graph depend on; a change rebuilds the state."""
        tensors = (pop.flat_params, pop.flat_grads, pop.exp_avg, pop.exp_avg_sq,
                   pop.train_x, pop.train_y, pop.train_labels, pop.train_weight)
        return (tuple((t.data_ptr(), tuple(t.shape)) for t in tensors), tuple(pop.train_size.tolist()),
                pop.cfg, pop.optim.betas, pop.optim.eps)

    def upload_host_changes(self, pop) -> None:
        """Copy lr, weight decay and failure flags the host changed since the last step."""
        lr, wd, failed = self.synced
        if not np.array_equal(lr, pop.lr):
            self.lr.copy_(torch.as_tensor(pop.lr, dtype=torch.float64))
        if not np.array_equal(wd, pop.weight_decay):
            self.wd.copy_(torch.as_tensor(pop.weight_decay, dtype=torch.float64))
        if not np.array_equal(failed, pop.failed_step):
            self.failed.copy_(torch.as_tensor(pop.failed_step, dtype=torch.int32))
        self.synced = (pop.lr.copy(), pop.weight_decay.copy(), pop.failed_step.copy())

    def launch(self, pop) -> None:
        o, L, ws = self.options, self.layout, self.ws
        tables_forward_launch(L, pop.flat_params, pop.flat_grads, ws, o.precision, block_k=o.block_k,
                              arch=self.arch)
        examples_launch(L, pop.flat_params, pop.flat_grads, ws, self.scratch, pop.train_x, pop.train_y,
                        pop.train_labels, pop.train_weight, self.tiles, o.precision, block_n=o.block_n,
                        block_c=o.block_c, block_k=o.block_k, arch=self.arch)
        adamw_launch(L, pop.flat_params, pop.flat_grads, pop.exp_avg, pop.exp_avg_sq, self.lr, self.wd,
                     self.failed, self.hyper, ws, pop.optim.betas, pop.optim.eps, o.precision, arch=self.arch)

    def run(self, pop) -> None:
        """The three launches: eagerly, or by replaying a graph captured after one eager step."""
        if not self.options.cuda_graph:
            self.launch(pop)
            return
        if pop.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device; the population is on {pop.device}")
        if not self.compiled:
            self.launch(pop)  # compiles the kernels outside the capture
            self.compiled = True
            return
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.launch(pop)
        self.graph.replay()


_states: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_options: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def configure(pop, **options) -> Options:
    """Set this population's Triton options (see the module docstring); returns them."""
    current = _options.get(pop) or Options.from_env()
    _options[pop] = replace(current, **options)
    _states.pop(pop, None)
    return _options[pop]


def _state(pop) -> _State:
    state = _states.get(pop)
    if state is None or state.key != _State._key(pop):
        state = _State(pop, _options.get(pop) or Options.from_env())
        _states[pop] = state
    return state


def step(pop) -> Tensor:
    """One full-batch AdamW step of every healthy model of ``pop``; the mean losses (M,)."""
    state = _state(pop)
    state.upload_host_changes(pop)
    step_count = pop.step_count + 1
    scalars = step_scalars(step_count, pop.optim.lr_at(step_count, 1.0), pop.optim.betas)
    state.hyper.copy_(torch.tensor(scalars, dtype=torch.float64))
    state.run(pop)
    pop.step_count = step_count
    newly_failed = state.failed.cpu().numpy() == step_count
    pop.mark_failures(torch.from_numpy(~newly_failed))
    state.synced = (state.synced[0], state.synced[1], pop.failed_step.copy())
    return state.ws.loss.clone()
