"""Fused Triton kernels of the fastgrok training step (one kernel per module).

A step is three launches, driven by ``fastgrok.triton_engine``:

1. ``kernels.tables_forward``: per model, the key/value/score tables of the
   2n + 2 (token, position) rows; clears the step's accumulators.
2. ``kernels.examples``: forward and backward of every training example in
   tiles, gradients summed with atomics; the last tile of each model runs
   ``kernels.tables_backward`` for the embedding and attention gradients.
3. ``kernels.adamw``: AdamW with per-model lr and weight decay, skipping
   frozen and newly non-finite models.

``kernels.layout`` holds what they share: the flat parameter layout, padded
block sizes, the matmul precision and the per-step workspace.
"""
