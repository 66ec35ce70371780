"""Configuration dataclasses and named presets.

One dataclass per concern (task, model, optimiser, per-model run), derived
values as properties, and a name -> dict preset registry (gpt-fast style).
"""
from __future__ import annotations

from dataclasses import dataclass

# The tasks (fastgrok.tasks defines each operation): Power et al.'s modular
# operations, and the permutation-group tasks over S5 (120 elements).
MODULAR_OP_NAMES = ("x+y", "x-y", "x*y", "x/y", "x^2+y^2", "x^2+xy+y^2", "x^2+xy+y^2+x", "x^3+xy", "x^3+xy^2+y")
S5_OPS = ("S5:x*y", "S5:x*y*x^-1", "S5:x*y*x")
OPS = MODULAR_OP_NAMES + S5_OPS


def is_prime(p: int) -> bool:
    if p < 2:
        return False
    return all(p % d for d in range(2, int(p**0.5) + 1))


def validate_task(op: str, p: int) -> None:
    """Raise ValueError naming the bad value and what would be valid."""
    if op not in OPS:
        raise ValueError(f"unknown task {op!r}; valid tasks: {', '.join(OPS)}")
    if op in S5_OPS:
        return
    if not isinstance(p, int) or p < 2:
        raise ValueError(f"p={p!r}: the modulus must be an integer >= 2")
    if op == "x/y" and not is_prime(p):
        raise ValueError(f"p={p}: division needs a prime modulus (e.g. 97, 113)")


@dataclass(frozen=True)
class TaskConfig:
    """A binary operation ``x o y`` over ``n`` elements.

    op: one of ``fastgrok.tasks.OPS`` (``"x+y"``, ``"x/y"``, ``"S5:x*y"``...).
    p:  modulus for the modular tasks; ignored by the S5 tasks (n = 120).
    """

    op: str = "x+y"
    p: int = 113

    def __post_init__(self):
        validate_task(self.op, self.p)

    @property
    def n(self) -> int:
        """Number of elements (answer classes)."""
        return 120 if self.op.startswith("S5:") else self.p

    @property
    def d_vocab(self) -> int:
        """Elements, then the operator token, then ``=``."""
        return self.n + 2

    @property
    def n_pairs(self) -> int:
        """Size of the full dataset (pairs with y = 0 are excluded for division)."""
        return self.n * (self.n - 1) if self.op == "x/y" else self.n * self.n


@dataclass(frozen=True)
class ModelConfig:
    """1-layer decoder-only transformer of the paper (Appendix A)."""

    d_vocab: int
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    n_ctx: int = 4

    def __post_init__(self):
        for name in ("d_vocab", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name}={value!r}: must be a positive integer")

    @classmethod
    def for_task(cls, task: TaskConfig, **sizes) -> "ModelConfig":
        return cls(d_vocab=task.d_vocab, **sizes)


@dataclass(frozen=True)
class OptimConfig:
    """Full-batch AdamW with ``torch.optim.AdamW`` semantics (paper Appendix A).

    weight_decay is decoupled and applies to every parameter.
    warmup_steps: linear warm-up of the learning rate from lr/warmup_steps to
    lr over that many steps; 0 turns it off.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 1.0
    warmup_steps: int = 0

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}: must be > 0")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay={self.weight_decay!r}: must be >= 0")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ValueError(f"betas={self.betas!r}: each must be in [0, 1)")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r}: must be >= 0")

    def lr_at(self, step: int, lr: float | None = None) -> float:
        """Learning rate used by optimiser step ``step`` (1-based)."""
        base = self.lr if lr is None else lr
        if self.warmup_steps == 0:
            return base
        return base * min(1.0, step / self.warmup_steps)


@dataclass(frozen=True)
class RunSpec:
    """What makes one model of a population different from the others."""

    train_size: int
    data_seed: int = 0
    init_seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 1.0
    random_labels: bool = False


# Presets: name -> keyword arguments for TaskConfig, ModelConfig and the
# defaults of a run. "paper" is Appendix A; "cpu" is sized to grok within a
# few minutes on two CPU cores.
PRESETS: dict[str, dict] = {
    "paper": dict(op="x+y", p=113, d_model=128, n_heads=4, d_head=32, d_mlp=512,
                  lr=1e-3, weight_decay=1.0, train_size=3830, steps=30_000),
    "cpu": dict(op="x+y", p=43, d_model=64, n_heads=4, d_head=16, d_mlp=256,
                lr=1e-3, weight_decay=1.0, train_size=925, steps=5000),
}

_TASK_KEYS = ("op", "p")
_MODEL_KEYS = ("d_model", "n_heads", "d_head", "d_mlp")


@dataclass(frozen=True)
class Preset:
    name: str
    task: TaskConfig
    model: ModelConfig
    optim: OptimConfig
    train_size: int
    steps: int


def get_preset(name: str, **overrides) -> Preset:
    """Build a preset by name; keyword overrides replace any preset field."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(values) - set(PRESETS[name])
    if unknown:
        raise ValueError(f"unknown preset field(s) {sorted(unknown)}; valid: {sorted(PRESETS[name])}")
    task = TaskConfig(**{k: values[k] for k in _TASK_KEYS})
    model = ModelConfig.for_task(task, **{k: values[k] for k in _MODEL_KEYS})
    optim = OptimConfig(lr=values["lr"], weight_decay=values["weight_decay"])
    return Preset(name, task, model, optim, int(values["train_size"]), int(values["steps"]))


__all__ = ["OPS", "S5_OPS", "MODULAR_OP_NAMES", "validate_task", "is_prime", "TaskConfig", "ModelConfig", "OptimConfig", "RunSpec", "PRESETS", "Preset", "get_preset"]
