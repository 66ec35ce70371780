"""The reference model: one readable 1-layer transformer, the oracle.

Every faster rung of fastgrok (the batched engine, the Triton kernels, the C++
engine) is tested against this file. It computes the whole sequence the plain
way, with autograd; nothing here is clever.

Dimensions: N examples, T positions (n_ctx = 4), D d_model, H heads,
Dh d_head, F d_mlp, V d_vocab. Weight shapes follow TransformerLens.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastgrok import precision as mp
from fastgrok.config import ModelConfig
from fastgrok.layout import param_shapes

# Fixed order in which weights are drawn from the init seed; every backend
# stacks, flattens and checkpoints parameters in this order.
def init_params(cfg: ModelConfig, init_seed: int) -> dict[str, Tensor]:
    """Initial weights as a pure function of the seed (Nanda et al. 2023 scales).

    Every weight matrix ~ N(0, 1/d_model) except W_U ~ N(0, 1/d_vocab); biases
    zero. Drawn on the CPU in float32 so that every backend and device starts
    from the same bits; move the result afterwards.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(init_seed))
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.startswith("b_"):
            params[name] = torch.zeros(shape)
        else:
            std = 1 / math.sqrt(cfg.d_vocab if name == "W_U" else cfg.d_model)
            params[name] = torch.randn(shape, generator=gen) * std
    return params


class _StableCrossEntropy(torch.autograd.Function):
    """Per-example cross-entropy that stays accurate down to losses of 1e-30.

    With the max logit m subtracted, the loss is log1p(sum_{j != y} e^{z_j - z_y})
    when y is the argmax (the regime of a trained model), which float32 keeps
    to full relative precision; the textbook logsumexp(z) - z_y would round
    log(1 + tiny) to 0. The correct-class gradient is -(sum of the other
    probabilities), never p_y - 1, which rounds to 0 while the wrong classes
    keep their gradient (docs/design.md, "Numerics").
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:
        loss, dlogits = stable_cross_entropy_fwd_bwd(logits, labels)
        ctx.save_for_backward(dlogits)
        return loss

    @staticmethod
    def backward(ctx, dloss: Tensor):
        (dlogits,) = ctx.saved_tensors
        return dlogits * dloss.unsqueeze(-1), None


def stable_cross_entropy_fwd_bwd(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example loss (...,) and its gradient w.r.t. logits (..., V).

    logits: (..., V), labels: (...) int64. Shared by every PyTorch backend.
    With m the max logit and e_j = exp(z_j - m): the wrong-class mass
    other = sum_{j != y} e_j is summed with the label's entry zeroed, so it
    keeps full relative precision however small it is.
    """
    y = labels.unsqueeze(-1)
    m = logits.amax(dim=-1, keepdim=True)
    z_y = (logits.gather(-1, y) - m).squeeze(-1)                    # (...), <= 0
    e = (logits - m).exp_()                                         # (..., V)
    e_y = e.gather(-1, y).squeeze(-1)
    e.scatter_(-1, y, 0.0)
    other = e.sum(-1)                                               # (...)
    total = other + e_y
    # Where y is the argmax (e_y = 1) the loss is log1p(other), exact for
    # tiny other; elsewhere it is >= ~log 2 and logsumexp - z_y is accurate.
    loss = torch.where(z_y == 0, other.log1p(), total.log() - z_y)
    dlogits = e.div_(total.unsqueeze(-1))                           # p_j, j != y
    dlogits.scatter_(-1, y, (-other / total).unsqueeze(-1))         # -(sum of the others)
    return loss, dlogits


def stable_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example cross-entropy with the numerically careful gradient."""
    return _StableCrossEntropy.apply(logits, labels)


class _RoundedProduct(torch.autograd.Function):
    """act @ W with both operands taken at a matmul precision, forward and backward.

    The backward products take their operands at the same precision:
    d_act = d_out @ W^T and dW = act^T @ d_out (fastgrok.precision).
    """

    @staticmethod
    def forward(ctx, act: Tensor, W: Tensor, precision: str) -> Tensor:
        ctx.save_for_backward(act, W)
        ctx.precision = precision
        return mp.matmul(act, W, precision)

    @staticmethod
    def backward(ctx, d_out: Tensor):
        act, W = ctx.saved_tensors
        d_act = mp.matmul(d_out, W.T, ctx.precision)
        dW = mp.matmul(act.reshape(-1, act.shape[-1]).T, d_out.reshape(-1, d_out.shape[-1]), ctx.precision)
        return d_act, dW, None


class Transformer(nn.Module):
    """The paper's 1-layer transformer: no LayerNorm, learned positions,
    untied embed/unembed, ReLU MLP with biases, attention without biases.

    precision: how the products with W_O, W_in, W_out and W_U take their
    operands (``fastgrok.precision``; "fp32": as they are).
    """

    def __init__(self, cfg: ModelConfig, init_seed: int = 0, precision: str = "fp32"):
        super().__init__()
        self.cfg = cfg
        self.precision = mp.check_precision(precision)
        for name, value in init_params(cfg, init_seed).items():
            self.register_parameter(name, nn.Parameter(value))

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (N, T) int64 -> logits (N, T, V)."""
        T = tokens.shape[1]
        resid = self.W_E[tokens] + self.W_pos[:T]                               # (N, T, D)

        q = torch.einsum("ntd,hde->nhte", resid, self.W_Q)                      # (N, H, T, Dh)
        k = torch.einsum("ntd,hde->nhte", resid, self.W_K)                      # (N, H, T, Dh)
        v = torch.einsum("ntd,hde->nhte", resid, self.W_V)                      # (N, H, T, Dh)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.cfg.d_head)           # (N, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        pattern = scores.softmax(dim=-1)                                        # (N, H, T, T)
        z = pattern @ v                                                         # (N, H, T, Dh)
        N, H, _, Dh = z.shape
        z = z.transpose(1, 2).reshape(N, T, H * Dh)                             # (N, T, H*Dh)
        resid = resid + self._product(z, self.W_O.reshape(H * Dh, -1))          # (N, T, D)

        pre = self._product(resid, self.W_in) + self.b_in                       # (N, T, F)
        resid = resid + self._product(torch.relu(pre), self.W_out) + self.b_out # (N, T, D)
        return self._product(resid, self.W_U)                                   # (N, T, V)

    def _product(self, act: Tensor, W: Tensor) -> Tensor:
        if self.precision == "fp32":
            return act @ W
        return _RoundedProduct.apply(act, W, self.precision)

    def loss(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy at the last position over the given examples."""
        return stable_cross_entropy(self(tokens)[:, -1], labels).mean()
