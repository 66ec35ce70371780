#!/usr/bin/env bash
# Check fastgrok's TransformerLens export against the real package, in a fresh venv.
#
#   bench/check_transformer_lens.sh            # latest transformer-lens on PyPI (4.x today)
#   bench/check_transformer_lens.sh 3.9.0      # an exact version
#   bench/check_transformer_lens.sh '<4'       # or any pip version specifier
#
# It creates a venv in a temporary directory, installs torch==2.13.0 first (so a
# CPU-only machine gets the CPU build), then transformer-lens, pytest and
# hypothesis, then fastgrok from a copy of this working tree (tracked and
# untracked files, no build outputs, so nothing is written into the checkout).
# It trains a tiny run with the CLI, loads every model with
# fastgrok.export.to_transformer_lens and compares its logits, on every input
# of the task at every position, with the reference model's; then runs
# tests/test_export.py there. Prints the TransformerLens version and the max
# absolute logit difference in float32 (the stored weights) and, both models
# cast, float64; exits non-zero if float32's exceeds 1e-5 (float64's 1e-12) or
# a test fails.
# KEEP=1 keeps the temporary directory; EXTRA="pkg<v ..." adds pip requirements
# to the transformer-lens install (2.16.1 pins numpy<2 but lets the newest
# pyarrow in, which needs numpy 2: EXTRA="pyarrow<21"). Needs python3 (>= 3.10)
# and PyPI.
set -euo pipefail

SPEC="${1:-}"
case "$SPEC" in
    "") PKG="transformer-lens" ;;
    [0-9]*) PKG="transformer-lens==$SPEC" ;;
    *) PKG="transformer-lens$SPEC" ;;
esac
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastgrok-tl-check.XXXXXX")"
if [ "${KEEP:-0}" = 1 ]; then
    trap 'echo "kept $WORK"' EXIT
else
    trap 'rm -rf "$WORK"' EXIT
fi
log() { echo "== $*" >&2; }

log "venv in $WORK/venv"
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
log "pip install torch==2.13.0"
"${PIP[@]}" torch==2.13.0
log "pip install '$PKG' pytest hypothesis ${EXTRA:-}"
# shellcheck disable=SC2086  # EXTRA is a list of requirements
"${PIP[@]}" "$PKG" pytest hypothesis ${EXTRA:-}

# The working tree as git sees it (uncommitted edits included), without
# ignored build outputs (*.so, *.egg-info, runs/).
log "copy $REPO -> $WORK/src"
mkdir "$WORK/src"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -I{} sh -c '[ ! -e "$1" ] || printf "%s\0" "$1"' _ {} \
        | tar --null -T - -cf -) | tar -C "$WORK/src" -xf -
else
    cp -a "$REPO/." "$WORK/src/"
    find "$WORK/src" \( -name '*.so' -o -name '*.egg-info' -o -name __pycache__ \) -prune -exec rm -rf {} +
fi
log "pip install fastgrok (the C++ engine build may fail harmlessly; training here uses --backend torch)"
"${PIP[@]}" "$WORK/src"

log "train a tiny run"
"$WORK/venv/bin/fastgrok" grok --preset cpu --p 7 --sizes 30 --steps 100 --lr 3e-3 --seeds 2 \
    --backend torch --quiet --no-plot --out "$WORK/run.h5"

log "compare logits"
(cd "$WORK" && "$PY" - "$WORK/run.h5" <<'EOF'
import contextlib
import io
import sys

import torch

from fastgrok.export import load_reference_model, to_transformer_lens, transformer_lens_version
from fastgrok.store import read_run
from fastgrok.tasks import Task

TOLERANCE = 1e-5                   # float32, as stored; float64 shows the maps are the same function
path = sys.argv[1]
header = read_run(path).header
tokens = torch.as_tensor(Task(header.task).tokens)                # every input, (N, T)
worst = {torch.float32: 0.0, torch.float64: 0.0}
scale, kind = 0.0, None
for m in range(len(header.runs)):
    for dtype in worst:
        with contextlib.redirect_stdout(io.StringIO()):       # "Changing model dtype to ..."
            tl_model = to_transformer_lens(path, m).to(dtype)
        kind = type(tl_model).__name__
        with torch.no_grad():
            want = load_reference_model(path, m).to(dtype)(tokens)  # (N, T, V) every position
            diff = (tl_model(tokens) - want).abs().max().item()
        worst[dtype] = max(worst[dtype], diff)
        scale = max(scale, want.abs().max().item())
print(f"transformer-lens {transformer_lens_version()} ({kind}), torch {torch.__version__}: "
      f"{len(header.runs)} models x {tokens.shape[0]} inputs x {tokens.shape[1]} positions, "
      f"max |logit| {scale:.3g}; max |logit diff| vs reference: float32 {worst[torch.float32]:.3g} "
      f"(tolerance {TOLERANCE:g}), float64 {worst[torch.float64]:.3g}")
sys.exit(0 if worst[torch.float32] <= TOLERANCE and worst[torch.float64] <= 1e-12 else 1)
EOF
)

log "tests/test_export.py"
(cd "$WORK/src" && "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_export.py)
echo "OK: transformer-lens $("$PY" -c 'import importlib.metadata as m; print(m.version("transformer-lens"))')"
