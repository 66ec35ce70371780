"""Launch 3 (fastgrok.kernels.reduce) in the interpreter: its sums and the finiteness
checksum it leaves in Workspace.check, against float64 sums written out in torch."""
import numpy as np
import torch

import fastgrok.kernels.reduce as reduce  # not in the interpreted fixture (tests/conftest.py)
from fastgrok.config import ModelConfig

CFG = ModelConfig(d_vocab=9, d_model=12, n_heads=2, d_head=5, d_mlp=24)
SIZES = (5, 9, 7)          # examples per model
BLOCK_N, GROUP_TILES = 2, 2  # several groups per model


def reduced(interpreted, seed: int, poison=None):
    """Random partial rows, dz and co reduced by launch 3; ``poison(ws, tiles)`` edits them first.
    Returns the layout, the workspace, the gradients, the tiles and the inputs."""
    L = interpreted.layout.Layout.from_config(CFG)
    n, M, N = L.rows.n, len(SIZES), max(SIZES)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, n, (M, N), generator=gen), torch.randint(0, n, (M, N), generator=gen)
    tiles = interpreted.examples.Tiles.build(np.array(SIZES), x, y, n, BLOCK_N, GROUP_TILES, "cpu")
    ws = interpreted.layout.Workspace.allocate(L, M, N, tiles.count, "cpu")
    ws.partial.copy_(torch.randn(ws.partial.shape, generator=gen))
    ws.dz.copy_(torch.randn(ws.dz.shape, generator=gen))
    ws.co.copy_(torch.randn(ws.co.shape, generator=gen))
    if poison is not None:
        poison(ws, tiles)
    inputs = (ws.partial.clone(), ws.dz.clone(), ws.co.clone())
    grads = torch.zeros(M, L.P)
    reduce.reduce_launch(L, grads, ws, tiles, N)
    return L, ws, grads, tiles, inputs


def expected_check(L, tiles, inputs, m: int) -> float:
    """Everything launch 3 writes for model m but the loss, summed in float64 from its inputs:
    the model's partial rows up to the loss column, and a dz and ds of every real example."""
    partial, dz, co = (t.double() for t in inputs)
    first, last = int(tiles.group_first[m]), int(tiles.group_first[m + 1])
    total = partial[first:last, :L.tail["TAIL_LOSS"]].sum()
    H, Dh = L.H, L.Dh
    for e in range(SIZES[m]):
        for which in (0, 1):  # x-row: a_x, ds_x; y-row: a_y, ds_y
            a, ds = co[m, e, which], co[m, e, 2 + which]
            total += (a[:, None] * dz[m, e].view(H, Dh)).sum() + ds.sum()
    return total.item()


def test_the_checksum_is_the_sum_of_every_gradient_written(interpreted):
    L, ws, grads, tiles, inputs = reduced(interpreted, seed=3)
    assert ws.check.shape == (len(SIZES), L.reduce_programs())
    for m in range(len(SIZES)):
        want = expected_check(L, tiles, inputs, m)
        got = ws.check[m].double().sum().item()
        assert abs(got - want) <= 1e-4 * (1 + abs(want)), f"model {m}: check {got}, float64 sum {want}"


def test_a_non_finite_contribution_makes_only_its_models_checksum_non_finite(interpreted):
    def poison(ws, tiles):
        ws.partial[int(tiles.group_first[1]) + 1, 3] = float("inf")   # model 1's second group, a W_O gradient
        ws.dz[2, SIZES[2] - 1, 4] = float("nan")                       # model 2's last real example
        ws.dz[0, SIZES[0]:] = float("nan")                              # slots past model 0's examples: unused
    _, ws, grads, *_ = reduced(interpreted, seed=4, poison=poison)
    sums = ws.check.sum(dim=1)
    assert torch.isfinite(sums[0]), "slots past a model's training set are not its gradients"
    assert not torch.isfinite(sums[1]) and not torch.isfinite(sums[2])
    assert torch.isfinite(grads[0]).all() and not torch.isfinite(grads[1]).all()
