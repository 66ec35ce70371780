"""One model of a run, as the reference model's or TransformerLens's state dict.

A run file stores every model's parameters flat, (M, P) in ``PARAM_NAMES``
order (``fastgrok.store``): the latest state, and snapshots at chosen steps.
This module cuts one model out and names it for its consumer:

* ``reference_state_dict``: keys ``PARAM_NAMES``, shapes of
  ``fastgrok.model.param_shapes``; ``Transformer(cfg).load_state_dict(sd)``.
* ``transformer_lens_export``: a ``HookedTransformerConfig`` keyword dict and
  a ``HookedTransformer`` state dict (TransformerLens 2.x / 3.x; 4.x removed
  HookedTransformer). Our weights already use TransformerLens's layouts, so
  W_Q, W_K, W_V are [n_heads, d_model, d_head], W_O [n_heads, d_head,
  d_model]; the biases we do not have (b_Q, b_K, b_V, b_O, b_U) are zeros.
  Load it with::

      model = HookedTransformer(HookedTransformerConfig(**cfg))
      model.load_state_dict(state_dict, strict=False)

  ``strict=False`` because the attention's buffers (``mask``, ``IGNORE``)
  are not parameters and their shapes differ between TransformerLens
  versions; every parameter key is present. ``load_and_process_state_dict``
  works too, but its default ``center_unembed=True`` shifts every logit of a
  position by the same amount (log-probabilities are unchanged).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

from fastgrok.config import ModelConfig
from fastgrok.model import PARAM_NAMES, Transformer, param_shapes
from fastgrok.store import read_params, read_run


def unflatten(flat: np.ndarray | Tensor, cfg: ModelConfig) -> dict[str, Tensor]:
    """One model's flat parameters (P,) -> reference state dict (copies, float32)."""
    flat = torch.as_tensor(np.asarray(flat, dtype=np.float32) if not isinstance(flat, Tensor) else flat)
    shapes = param_shapes(cfg)
    sizes = [math.prod(shapes[k]) for k in PARAM_NAMES]
    if flat.shape != (sum(sizes),):
        raise ValueError(f"flat parameters of shape {tuple(flat.shape)}; the model {cfg} has "
                         f"({sum(sizes)},)")
    parts = torch.split(flat.detach().to(torch.float32), sizes)
    return {k: part.reshape(shapes[k]).clone() for k, part in zip(PARAM_NAMES, parts)}


def reference_state_dict(path: str | os.PathLike, model: int,
                         step: int | None = None) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(config, state dict) of model ``model`` of a run file: latest state, or snapshot ``step``."""
    cfg = read_run(path).header.model
    _, flat = read_params(path, step, [model])
    return cfg, unflatten(flat[0], cfg)


def load_reference_model(path: str | os.PathLike, model: int, step: int | None = None) -> Transformer:
    """The reference ``Transformer`` holding model ``model`` of a run file."""
    cfg, state = reference_state_dict(path, model, step)
    net = Transformer(cfg)
    net.load_state_dict(state)
    return net


def transformer_lens_config(cfg: ModelConfig) -> dict:
    """``HookedTransformerConfig`` keyword arguments of the paper's architecture."""
    return dict(
        n_layers=1, d_model=cfg.d_model, n_ctx=cfg.n_ctx, d_head=cfg.d_head, n_heads=cfg.n_heads,
        d_mlp=cfg.d_mlp, d_vocab=cfg.d_vocab, d_vocab_out=cfg.d_vocab, act_fn="relu",
        normalization_type=None, attn_only=False, positional_embedding_type="standard",
        attention_dir="causal", use_attn_scale=True,
    )


def transformer_lens_state_dict(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Reference state dict -> ``HookedTransformer`` parameter state dict."""
    H, Dh, D, V = cfg.n_heads, cfg.d_head, cfg.d_model, cfg.d_vocab
    zeros = lambda *shape: torch.zeros(shape, dtype=state["W_E"].dtype)  # noqa: E731
    return {
        "embed.W_E": state["W_E"].clone(),                    # [d_vocab, d_model]
        "pos_embed.W_pos": state["W_pos"].clone(),            # [n_ctx, d_model]
        "blocks.0.attn.W_Q": state["W_Q"].clone(),            # [n_heads, d_model, d_head]
        "blocks.0.attn.W_K": state["W_K"].clone(),
        "blocks.0.attn.W_V": state["W_V"].clone(),
        "blocks.0.attn.W_O": state["W_O"].clone(),            # [n_heads, d_head, d_model]
        "blocks.0.attn.b_Q": zeros(H, Dh),
        "blocks.0.attn.b_K": zeros(H, Dh),
        "blocks.0.attn.b_V": zeros(H, Dh),
        "blocks.0.attn.b_O": zeros(D),
        "blocks.0.mlp.W_in": state["W_in"].clone(),           # [d_model, d_mlp]
        "blocks.0.mlp.b_in": state["b_in"].clone(),
        "blocks.0.mlp.W_out": state["W_out"].clone(),         # [d_mlp, d_model]
        "blocks.0.mlp.b_out": state["b_out"].clone(),
        "unembed.W_U": state["W_U"].clone(),                  # [d_model, d_vocab]
        "unembed.b_U": zeros(V),
    }


def transformer_lens_export(path: str | os.PathLike, model: int,
                            step: int | None = None) -> tuple[dict, dict[str, Tensor]]:
    """(HookedTransformerConfig kwargs, state dict) of model ``model`` of a run file."""
    cfg, state = reference_state_dict(path, model, step)
    return transformer_lens_config(cfg), transformer_lens_state_dict(state, cfg)


__all__ = ["unflatten", "reference_state_dict", "load_reference_model", "transformer_lens_config",
           "transformer_lens_state_dict", "transformer_lens_export"]
