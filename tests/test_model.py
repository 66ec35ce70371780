"""The reference model against hand-written scalar loops and float64."""
import math

import numpy as np
import pytest
import torch

from fastgrok.config import ModelConfig
from fastgrok.layout import PARAM_NAMES
from fastgrok.model import Transformer, init_params, stable_cross_entropy, stable_cross_entropy_fwd_bwd

TINY = ModelConfig(d_vocab=5, d_model=4, n_heads=1, d_head=3, d_mlp=6)


def scalar_forward(P, tokens):
    """The paper's model on one sequence, written with plain Python loops."""
    D, T, F, V = TINY.d_model, len(tokens), TINY.d_mlp, TINY.d_vocab
    H, Dh = TINY.n_heads, TINY.d_head
    W = {k: v.tolist() for k, v in P.items()}
    resid = [[W["W_E"][tok][d] + W["W_pos"][t][d] for d in range(D)] for t, tok in enumerate(tokens)]
    attn = [[0.0] * D for _ in range(T)]
    for h in range(H):
        def proj(name, t):
            return [sum(resid[t][d] * W[name][h][d][e] for d in range(D)) for e in range(Dh)]
        q = [proj("W_Q", t) for t in range(T)]
        k = [proj("W_K", t) for t in range(T)]
        v = [proj("W_V", t) for t in range(T)]
        for t in range(T):
            scores = [sum(q[t][e] * k[s][e] for e in range(Dh)) / math.sqrt(Dh) for s in range(t + 1)]
            top = max(scores)
            w = [math.exp(s - top) for s in scores]
            w = [x / sum(w) for x in w]
            z = [sum(w[s] * v[s][e] for s in range(t + 1)) for e in range(Dh)]
            for d in range(D):
                attn[t][d] += sum(z[e] * W["W_O"][h][e][d] for e in range(Dh))
    logits = []
    for t in range(T):
        r = [resid[t][d] + attn[t][d] for d in range(D)]
        hidden = [max(0.0, sum(r[d] * W["W_in"][d][f] for d in range(D)) + W["b_in"][f]) for f in range(F)]
        r = [r[d] + sum(hidden[f] * W["W_out"][f][d] for f in range(F)) + W["b_out"][d] for d in range(D)]
        logits.append([sum(r[d] * W["W_U"][d][c] for d in range(D)) for c in range(V)])
    return logits


def test_forward_matches_scalar_loops():
    model = Transformer(TINY, init_seed=3).double()
    with torch.no_grad():  # non-zero biases so that they are exercised too
        model.b_in.normal_(0, 0.5)
        model.b_out.normal_(0, 0.5)
    P = {k: getattr(model, k).detach() for k in PARAM_NAMES}
    tokens = torch.tensor([[0, 3, 2, 4], [1, 3, 1, 4], [2, 3, 0, 4]])
    got = model(tokens)
    for i, seq in enumerate(tokens.tolist()):
        expected = torch.tensor(scalar_forward(P, seq), dtype=torch.float64)
        torch.testing.assert_close(got[i], expected, rtol=1e-12, atol=1e-12)


def test_gradients_match_finite_differences():
    model = Transformer(TINY, init_seed=1).double()
    tokens = torch.tensor([[0, 3, 2, 4], [1, 3, 1, 4], [2, 3, 2, 4], [0, 3, 0, 4]])
    labels = torch.tensor([2, 2, 1, 0])
    params = [getattr(model, k) for k in PARAM_NAMES]

    def loss_of(*ps):
        return torch.func.functional_call(model, dict(zip(PARAM_NAMES, ps)), (tokens,))[:, -1]

    def f(*ps):
        return stable_cross_entropy(loss_of(*ps), labels).mean()

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_init_is_a_pure_function_of_the_seed_with_paper_scales():
    cfg = ModelConfig(d_vocab=115)
    a, b, c = init_params(cfg, 7), init_params(cfg, 7), init_params(cfg, 8)
    for k in PARAM_NAMES:
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["W_E"], c["W_E"])
    assert (a["b_in"] == 0).all() and (a["b_out"] == 0).all()
    # Sample standard deviations within 3% of 1/sqrt(d_model) and 1/sqrt(d_vocab).
    assert abs(a["W_in"].std().item() * math.sqrt(128) - 1) < 0.03
    assert abs(a["W_E"].std().item() * math.sqrt(128) - 1) < 0.03
    assert abs(a["W_U"].std().item() * math.sqrt(115) - 1) < 0.03


def float64_cross_entropy(z, y):
    """Loss and gradient in float64, by the log1p formula (exact for large margins)."""
    z = z.astype(np.float64)
    other = np.exp(np.delete(z, y) - z[y]).sum()
    loss = np.log1p(other) if z[y] >= z.max() else np.log(np.exp(z - z.max()).sum()) - (z[y] - z.max())
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    grad = p.copy()
    grad[y] = -np.delete(p, y).sum()
    return loss, grad


@pytest.mark.parametrize("margin", [0.5, 5.0, 30.0, 45.0, 60.0, 80.0])
def test_loss_and_gradient_accurate_at_large_margins(margin):
    rng = np.random.default_rng(int(margin * 10))
    V = 115
    z = rng.normal(0, 1, (8, V)).astype(np.float32)
    y = rng.integers(0, V, 8)
    z[np.arange(8), y] = z.max(axis=1) + margin  # correct class ahead by >= margin
    loss, grad = stable_cross_entropy_fwd_bwd(torch.from_numpy(z), torch.from_numpy(y))
    for i in range(8):
        ref_loss, ref_grad = float64_cross_entropy(z[i], y[i])
        assert loss[i].item() > 0
        assert abs(loss[i].item() - ref_loss) <= 1e-3 * ref_loss, (i, loss[i].item(), ref_loss)
        # The correct-class entry is where p_y - 1 would round to zero.
        assert abs(grad[i, y[i]].item() - ref_grad[y[i]]) <= 1e-3 * abs(ref_grad[y[i]])
        np.testing.assert_allclose(grad[i].numpy(), ref_grad, rtol=1e-3, atol=0)


def test_loss_when_label_is_not_the_argmax():
    z = torch.tensor([[3.0, 40.0, -2.0]])
    loss, grad = stable_cross_entropy_fwd_bwd(z, torch.tensor([0]))
    ref_loss, ref_grad = float64_cross_entropy(z[0].numpy(), 0)
    assert abs(loss.item() - ref_loss) < 1e-5 * ref_loss
    np.testing.assert_allclose(grad[0].numpy(), ref_grad, rtol=1e-5, atol=1e-12)
