"""Export: a stored model, loaded the way its consumer loads it, gives the reference logits.

TransformerLens is not a test dependency (it pulls in transformers, datasets,
wandb...). Its consumer is reproduced here: ``hooked_transformer_forward`` is
HookedTransformer's forward (TransformerLens 3.9 ``components/embed.py``,
``pos_embed.py``, ``abstract_attention.py``, ``mlps/mlp.py``, ``unembed.py``)
for this architecture, reading only the exported keys; and the key/shape
table is the one a ``HookedTransformer`` of this config has. Both were
checked once against the real library (TransformerLens 3.9.0 and 2.16.1,
``model.load_state_dict(sd, strict=False)``), see the closing note of issue 4.

``to_transformer_lens`` builds the real thing, so its tests run only where
TransformerLens is installed (4.x: TransformerBridge, 2.x / 3.x:
HookedTransformer) and are skipped with the reason otherwise;
``bench/check_transformer_lens.sh [VERSION]`` runs them, and a logit
comparison, in a fresh venv.
"""
import math

import numpy as np
import pytest
import torch

from fastgrok.config import ModelConfig, OptimConfig, RunSpec, TaskConfig
import fastgrok.export
from fastgrok.export import (load_reference_model, reference_state_dict, to_transformer_lens,
                             transformer_lens_export, transformer_lens_version, unflatten)
from fastgrok.layout import PARAM_NAMES
from fastgrok.model import Transformer
from fastgrok.runner import run_experiment
from fastgrok.schedule import EvalSchedule
from fastgrok.store import read_params
from fastgrok.tasks import Task

TASK = TaskConfig("x+y", 11)
MODEL = ModelConfig.for_task(TASK, d_model=16, n_heads=2, d_head=8, d_mlp=32)


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "run.h5"
    runs = [RunSpec(train_size=60, data_seed=s, init_seed=s) for s in range(3)]
    pop = run_experiment(path, "export-test", TASK, MODEL, OptimConfig(lr=1e-2), runs, 30,
                         schedule=EvalSchedule(10, 30), snapshot_steps=[10], checkpoint_every=30)
    return path, pop


def tl_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a 1-layer, LayerNorm-free HookedTransformer."""
    V, T, D, H, Dh, F = cfg.d_vocab, cfg.n_ctx, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
    return {
        "embed.W_E": (V, D), "pos_embed.W_pos": (T, D),
        "blocks.0.attn.W_Q": (H, D, Dh), "blocks.0.attn.W_K": (H, D, Dh),
        "blocks.0.attn.W_V": (H, D, Dh), "blocks.0.attn.W_O": (H, Dh, D),
        "blocks.0.attn.b_Q": (H, Dh), "blocks.0.attn.b_K": (H, Dh), "blocks.0.attn.b_V": (H, Dh),
        "blocks.0.attn.b_O": (D,),
        "blocks.0.mlp.W_in": (D, F), "blocks.0.mlp.b_in": (F,),
        "blocks.0.mlp.W_out": (F, D), "blocks.0.mlp.b_out": (D,),
        "unembed.W_U": (D, V), "unembed.b_U": (V,),
    }


def hooked_transformer_forward(cfg: dict, sd: dict, tokens: torch.Tensor) -> torch.Tensor:
    """HookedTransformer.forward(tokens) for n_layers=1, no LayerNorm, standard positions."""
    assert cfg["n_layers"] == 1 and cfg["normalization_type"] is None and not cfg["attn_only"]
    assert cfg["positional_embedding_type"] == "standard" and cfg["act_fn"] == "relu"
    assert cfg["attention_dir"] == "causal" and cfg["use_attn_scale"]
    T = tokens.shape[1]
    resid = sd["embed.W_E"][tokens] + sd["pos_embed.W_pos"][:T].unsqueeze(0)           # (N, T, D)
    a = "blocks.0.attn."
    q = torch.einsum("npd,hde->nphe", resid, sd[a + "W_Q"]) + sd[a + "b_Q"]
    k = torch.einsum("npd,hde->nphe", resid, sd[a + "W_K"]) + sd[a + "b_K"]
    v = torch.einsum("npd,hde->nphe", resid, sd[a + "W_V"]) + sd[a + "b_V"]
    scores = torch.einsum("nqhe,nkhe->nhqk", q, k) / math.sqrt(cfg["d_head"])
    causal = torch.arange(T)[None, :] <= torch.arange(T)[:, None]
    scores = torch.where(causal, scores, torch.tensor(-torch.inf))
    pattern = scores.softmax(-1)
    pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
    z = torch.einsum("nkhe,nhqk->nqhe", v, pattern)
    W_O = sd[a + "W_O"].reshape(-1, cfg["d_model"]).T                                   # "h e d -> d (h e)"
    resid = resid + torch.nn.functional.linear(z.reshape(*z.shape[:2], -1), W_O, sd[a + "b_O"])
    m = "blocks.0.mlp."
    post = torch.relu(resid @ sd[m + "W_in"] + sd[m + "b_in"])
    resid = resid + post @ sd[m + "W_out"] + sd[m + "b_out"]
    return resid @ sd["unembed.W_U"] + sd["unembed.b_U"]


@pytest.mark.parametrize("step", [None, 10, 0])
def test_reference_state_dict_loads_strictly_and_reproduces_the_population(run_file, step):
    path, pop = run_file
    tokens = torch.as_tensor(Task(TASK).tokens)
    for m in range(pop.M):
        if step == 0:
            with pytest.raises(ValueError, match="no parameter snapshot at step 0; snapshots: \\[10\\]"):
                load_reference_model(path, m, step)
            continue
        net = load_reference_model(path, m, step)                 # load_state_dict(strict=True)
        _, flat = read_params(path, step, [m])
        stored = torch.cat([getattr(net, k).detach().reshape(-1) for k in PARAM_NAMES])
        np.testing.assert_array_equal(stored.numpy(), flat[0])
        if step is None:
            with torch.no_grad():
                np.testing.assert_allclose(net(tokens)[:, -1].numpy(), pop.all_logits(slice(m, m + 1))[0].numpy(),
                                           rtol=1e-4, atol=1e-5, err_msg=f"model {m}")


@pytest.mark.parametrize("step", [None, 10])
def test_transformer_lens_export_gives_reference_logits(run_file, step):
    path, pop = run_file
    tokens = torch.as_tensor(Task(TASK).tokens)
    for m in range(pop.M):
        cfg, sd = transformer_lens_export(path, m, step)
        assert {k: tuple(v.shape) for k, v in sd.items()} == tl_shapes(MODEL)
        assert all(v.dtype == torch.float32 for v in sd.values())
        for bias in ("blocks.0.attn.b_Q", "blocks.0.attn.b_K", "blocks.0.attn.b_V",
                     "blocks.0.attn.b_O", "unembed.b_U"):
            assert not sd[bias].any()
        assert (cfg["d_vocab"], cfg["d_vocab_out"], cfg["n_ctx"]) == (MODEL.d_vocab, MODEL.d_vocab, 4)
        _, state = reference_state_dict(path, m, step)
        net = Transformer(MODEL)
        net.load_state_dict(state)
        with torch.no_grad():
            want = net(tokens)                                        # (N, T, V) every position
            got = hooked_transformer_forward(cfg, sd, tokens)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"model {m}")


def test_unflatten_rejects_the_wrong_size():
    with pytest.raises(ValueError, match=r"flat parameters of shape \(5,\)"):
        unflatten(np.zeros(5), MODEL)


def test_reference_state_dict_rejects_a_non_integer_model_index(run_file):
    path, _ = run_file
    for bad in (1.5, True, "0"):
        with pytest.raises(TypeError, match=f"model index {bad!r}: must be an integer"):
            reference_state_dict(path, bad)


def test_to_transformer_lens_without_the_package_says_how_to_install_it(run_file, monkeypatch):
    monkeypatch.setattr(fastgrok.export, "transformer_lens_version", lambda: None)
    with pytest.raises(ImportError, match="pip install transformer-lens"):
        to_transformer_lens(run_file[0], 0)


def _transformer_lens():
    return pytest.importorskip(
        "transformer_lens", reason="TransformerLens is not installed (pip install transformer-lens, "
        "or bench/check_transformer_lens.sh runs these tests in a fresh venv)")


@pytest.mark.parametrize("step", [None, 10])
def test_to_transformer_lens_gives_reference_logits(run_file, step):
    _transformer_lens()
    version = transformer_lens_version()
    want_type = "TransformerBridge" if int(version.split(".")[0]) >= 4 else "HookedTransformer"
    path, pop = run_file
    tokens = torch.as_tensor(Task(TASK).tokens)                       # every task input, (N, T)
    for m in range(pop.M):
        rng = torch.random.get_rng_state()
        tl_model = to_transformer_lens(path, m, step)
        assert torch.equal(torch.random.get_rng_state(), rng), "to_transformer_lens moved the torch RNG"
        assert type(tl_model).__name__ == want_type and not tl_model.training
        with torch.no_grad():
            want = load_reference_model(path, m, step)(tokens)             # (N, T, V) every position
            got, cache = tl_model.run_with_cache(tokens)
        diff = (got - want).abs().max().item()
        assert got.shape == want.shape and diff <= 1e-5, \
            f"TransformerLens {version}, model {m}, step {step}: max |logit diff| {diff:.3g}"
        pattern = cache["blocks.0.attn.hook_pattern"]                      # (N, H, T, T)
        assert pattern.shape == (len(tokens), MODEL.n_heads, 4, 4)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))


def test_to_transformer_lens_names_a_bad_model_or_step(run_file):
    _transformer_lens()
    path, pop = run_file
    with pytest.raises(ValueError, match=f"model index {pop.M} is outside 0..{pop.M - 1}"):
        to_transformer_lens(path, pop.M)
    with pytest.raises(ValueError, match="no parameter snapshot at step 20; snapshots: \\[10\\]"):
        to_transformer_lens(path, 0, 20)
