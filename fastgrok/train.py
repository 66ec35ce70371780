"""The reference trainer: one model, full-batch ``torch.optim.AdamW``.

This is the loop researchers write today, kept as the oracle that the batched
engine, the Triton kernels and the C++ engine are compared with.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fastgrok.config import ModelConfig, OptimConfig, RunSpec
from fastgrok.model import Transformer, stable_cross_entropy
from fastgrok.tasks import Task


@dataclass
class History:
    """Evaluation points of one run; lists grow as training goes."""

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def evaluate(model: Transformer, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean last-position loss and accuracy; (nan, nan) on an empty set."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    logits = model(tokens)[:, -1]
    loss = stable_cross_entropy(logits, labels).mean().item()
    acc = (logits.argmax(-1) == labels).float().mean().item()
    return loss, acc


def train_reference(
    task: Task,
    model_cfg: ModelConfig,
    run: RunSpec,
    steps: int,
    optim_cfg: OptimConfig = OptimConfig(),
    eval_every: int = 100,
    device: str | torch.device = "cpu",
    log=None,
    dtype: torch.dtype = torch.float32,
    precision: str = "fp32",
) -> tuple[Transformer, History]:
    """Train one model for ``steps`` full-batch AdamW steps.

    run.lr and run.weight_decay override the optimiser config's; betas, eps
    and warm-up come from ``optim_cfg``. Evaluates at step 0, every
    ``eval_every`` steps and at the end. ``log(step, history)`` is called after
    each evaluation if given. ``dtype=torch.float64`` gives the run that
    fp32 backends are measured against (same initial weights, cast up).
    ``precision``: the matmul precision of the model (``fastgrok.precision``).
    """
    split = task.split(run.data_seed, run.train_size, run.random_labels)
    tokens = torch.as_tensor(task.tokens, device=device)
    train_x, train_y = tokens[split.train_idx], torch.as_tensor(split.train_labels, device=device)
    test_x, test_y = tokens[split.test_idx], torch.as_tensor(split.test_labels, device=device)

    model = Transformer(model_cfg, run.init_seed, precision).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(
        model.parameters(), lr=run.lr, betas=optim_cfg.betas, eps=optim_cfg.eps,
        weight_decay=run.weight_decay,
    )
    hist = History()

    def record(step: int):
        train_loss, train_acc = evaluate(model, train_x, train_y)
        test_loss, test_acc = evaluate(model, test_x, test_y)
        for name, value in zip(("step", "train_loss", "train_acc", "test_loss", "test_acc"),
                               (step, train_loss, train_acc, test_loss, test_acc)):
            getattr(hist, name).append(value)
        if log is not None:
            log(step, hist)

    start = time.perf_counter()
    record(0)
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = optim_cfg.lr_at(step, run.lr)
        opt.zero_grad(set_to_none=True)
        model.loss(train_x, train_y).backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            record(step)
    hist.seconds = time.perf_counter() - start
    return model, hist
