"""Fused Triton kernels of the fastgrok training step (one kernel per module).

A step is four launches, driven by ``fastgrok.backends.triton_engine``:

1. ``tables_forward``: per model, the key/value/score tables of the
   (token, position) rows.
2. ``examples``: forward and backward of every training example in tiles (a
   persistent grid over groups of tiles); each group's sums in its own
   workspace row, the row-table gradients of x and y rows per example.
3. ``reduce``: those sums completed in a fixed order (no floating-point
   atomics anywhere: runs are bitwise repeatable and batch-invariant).
4. ``adamw``: per model, the gradients of W_E..W_V from the row tables
   (``tables_backward``), then AdamW with per-model lr and weight decay,
   skipping frozen and newly non-finite models.

A loss and gradient without an update (``Backend.loss_and_grad``) replaces
launch 4 with ``tables_backward``'s own kernel.

``layout`` holds what they share: the parameter offsets and row numbers of
``fastgrok.layout`` as constexprs, the chunked matmul, the precision modes and their operand rounding,
launch options and the per-step workspace. ``aot`` compiles them for
sm_80/sm_90 without a GPU.
"""
