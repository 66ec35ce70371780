"""One model of a run, as the reference model, a TransformerLens model, or their state dicts.

A run file stores every model's parameters flat, (M, P) in ``PARAM_NAMES``
order (``fastgrok.store``): the latest state, and snapshots at chosen steps.
This module cuts one model out and names it for its consumer:

* ``reference_state_dict`` / ``load_reference_model``: keys ``PARAM_NAMES``,
  shapes of ``fastgrok.model.param_shapes``; the oracle ``Transformer``.
* ``to_transformer_lens(path, model, step=None, device="cpu")``: a live
  TransformerLens model in eval mode, on whichever TransformerLens is
  installed (``pip install transformer-lens``; it is not a dependency):

  - 4.x (which removed ``HookedTransformer`` and ``HookedTransformerConfig``):
    ``TransformerBridge.boot_native(TransformerBridgeConfig(...))``, the
    TL-native 1-layer model, loaded strictly with the HookedTransformer-format
    state dict below passed through
    ``transformer_lens.utilities.tl_checkpoint_conversion.convert_tl_checkpoint``.
    Hook names are TransformerLens's usual ones (``blocks.0.attn.hook_pattern``,
    ``blocks.0.mlp.hook_post``, ...); ``enable_compatibility_mode()`` is not
    called, so the weights are exactly the stored ones.
  - 2.x / 3.x: ``HookedTransformer(HookedTransformerConfig(...))``.

  Its logits are the reference model's at every position: float32 rounding
  apart (3.8e-6 at logits up to 26, TransformerLens 4.3.0 and 3.9.0), 1e-14
  with both models cast to float64. ``tests/test_export.py`` (when
  TransformerLens is installed) and ``bench/check_transformer_lens.sh
  [VERSION]`` (in a fresh venv) check 1e-5 against the real package. The
  caller's torch RNG is untouched.
* ``transformer_lens_export``: the pieces, without TransformerLens: a
  ``HookedTransformerConfig`` keyword dict and a ``HookedTransformer`` state
  dict (2.x / 3.x format; on 4.x the same dict is what ``convert_tl_checkpoint``
  reads). Our weights already use TransformerLens's layouts, so W_Q, W_K, W_V
  are [n_heads, d_model, d_head], W_O [n_heads, d_head, d_model]; the biases
  we do not have (b_Q, b_K, b_V, b_O, b_U) are zeros. By hand on 3.x::

      model = HookedTransformer(HookedTransformerConfig(**cfg))
      model.load_state_dict(state_dict, strict=False)

  ``strict=False`` because the attention's buffers (``mask``, ``IGNORE``)
  are not parameters and their shapes differ between TransformerLens
  versions; every parameter key is present. ``load_and_process_state_dict``
  works too, but its default ``center_unembed=True`` shifts every logit of a
  position by the same amount (log-probabilities are unchanged).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import operator
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastgrok.config import ModelConfig
from fastgrok.layout import ParamLayout
from fastgrok.model import Transformer
from fastgrok.store import read_params, read_run


def unflatten(flat: np.ndarray | Tensor, cfg: ModelConfig) -> dict[str, Tensor]:
    """One model's flat parameters (P,) -> reference state dict (copies, float32)."""
    flat = torch.as_tensor(np.asarray(flat, dtype=np.float32) if not isinstance(flat, Tensor) else flat)
    layout = ParamLayout.from_config(cfg)
    if flat.shape != (layout.P,):
        raise ValueError(f"flat parameters of shape {tuple(flat.shape)}; the model {cfg} has ({layout.P},)")
    return {k: v.clone() for k, v in layout.unflatten(flat.detach().to(torch.float32)).items()}


def reference_state_dict(path: str | os.PathLike, model: int,
                         step: int | None = None) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(config, state dict) of model ``model`` of a run file: latest state, or snapshot ``step``."""
    model = _model_index(model)
    cfg = read_run(path).header.model
    _, flat = read_params(path, step, [model])
    return cfg, unflatten(flat[0], cfg)


def _model_index(model) -> int:
    # read_params checks the range; a float or bool index would otherwise be
    # truncated to some other model without a word.
    if isinstance(model, bool):
        raise TypeError(f"model index {model!r}: must be an integer")
    try:
        return operator.index(model)
    except TypeError:
        raise TypeError(f"model index {model!r}: must be an integer") from None


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


TL_INSTALL_HINT = "to_transformer_lens needs TransformerLens: pip install transformer-lens"


def transformer_lens_version() -> str | None:
    """The installed TransformerLens version ("4.3.0"), or None when it is not installed."""
    if importlib.util.find_spec("transformer_lens") is None:
        return None
    try:
        return importlib.metadata.version("transformer-lens")
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path
        return "unknown"


def _uses_bridge(version: str) -> bool:
    """True for TransformerLens >= 4 (no HookedTransformer; TransformerBridge.boot_native)."""
    major = version.split(".")[0]
    if major.isdigit():
        return int(major) >= 4
    # No usable version: 4.x raises ImportError for the removed names.
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return True
    return False


def to_transformer_lens(path: str | os.PathLike, model: int, step: int | None = None,
                        device: str | torch.device = "cpu"):
    """Model ``model`` of a run file (latest state, or snapshot ``step``) as a live
    TransformerLens model in eval mode: a ``TransformerBridge`` on TransformerLens
    4.x, a ``HookedTransformer`` on 2.x / 3.x. Its logits are the reference model's.
    """
    version = transformer_lens_version()
    if version is None:
        raise ImportError(TL_INSTALL_HINT)
    # Read (and validate model / step) before the slow TransformerLens import.
    cfg, state = reference_state_dict(path, model, step)
    tl_cfg = dict(transformer_lens_config(cfg), init_weights=False,
                  model_name=f"fastgrok:{Path(path).name}:model{model}"
                             + ("" if step is None else f":step{step}"))
    sd = transformer_lens_state_dict(state, cfg)
    # Construction happens on the CPU in both versions (moved afterwards), and
    # 4.x's nn.Linear / nn.Embedding draw default weights from the global
    # generator even with init_weights=False: keep the caller's stream intact.
    with torch.random.fork_rng(devices=[]):
        net = _boot_bridge(tl_cfg, sd, device) if _uses_bridge(version) else \
            _hooked_transformer(tl_cfg, sd, device)
    return net.eval()


def _boot_bridge(tl_cfg: dict, sd: dict[str, Tensor], device):
    """TransformerLens 4.x: the TL-native model behind a TransformerBridge."""
    from transformer_lens import TransformerBridge, TransformerBridgeConfig
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    bridge_cfg = TransformerBridgeConfig(**tl_cfg, architecture="TransformerLensNative")
    bridge = TransformerBridge.boot_native(bridge_cfg, device=device, dtype=torch.float32,
                                           model_name=tl_cfg["model_name"])
    # strict: a key the bridge gains in a later 4.x would otherwise keep a random weight.
    bridge.load_state_dict(convert_tl_checkpoint(sd, bridge_cfg), strict=True)
    return bridge


def _hooked_transformer(tl_cfg: dict, sd: dict[str, Tensor], device):
    """TransformerLens 2.x / 3.x: a HookedTransformer."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with warnings.catch_warnings():
        # 3.x warns that HookedTransformer goes away in 4.0; on 4.x we use the bridge.
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated",
                                category=DeprecationWarning)
        net = HookedTransformer(HookedTransformerConfig(**tl_cfg, device=str(device)))
    result = net.load_state_dict(sd, strict=False)
    buffers = {name for name, _ in net.named_buffers()}
    missing = [k for k in result.missing_keys if k not in buffers]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"HookedTransformer state dict mismatch: missing {missing}, "
                           f"unexpected {result.unexpected_keys}")
    return net


__all__ = ["unflatten", "reference_state_dict", "load_reference_model", "transformer_lens_config",
           "transformer_lens_state_dict", "transformer_lens_export", "transformer_lens_version",
           "to_transformer_lens"]
