"""Fused Triton kernels of the fastgrok training step (one kernel per module).

A step is three launches, driven by ``fastgrok.triton_engine``:

1. ``kernels.tables_forward``: per model, the key/value/score tables of the
   2n + 2 (token, position) rows; clears the step's accumulators.
2. ``kernels.examples``: forward and backward of every training example in
   tiles (a persistent grid); the gradients of W_O..W_U and of the row tables
   are summed with atomics.
3. ``kernels.adamw``: per model, the gradients of W_E..W_V from the row tables
   (``kernels.tables_backward``), then AdamW with per-model lr and weight
   decay, skipping frozen and newly non-finite models.

``kernels.layout`` holds what they share: the flat parameter layout, the
chunked matmul, the precision modes, launch options and the per-step
workspace. ``kernels.aot`` compiles them for sm_80/sm_90 without a GPU.
"""
