#!/usr/bin/env bash
# Set up tolaria in the current Python environment, compiling its extension.
#   bash scripts/setup.sh            # runtime + demo extras
#   bash scripts/setup.sh test,dev   # what the test suite and the linters need
# torch comes first, and only where none is installed: `torch==2.13.0` takes the CPU build
# from this machine's local wheel instead of a multi-GB CUDA download; an existing torch (a
# GPU machine's 2.11, say) is kept, since tolaria only asks for a lower bound.
# pip runs quietly; each long step says what it is doing before it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo}"
python="${PYTHON:-python3}"
say() { printf 'setup: %s\n' "$*"; }
if ! "$python" -c "import torch" 2>/dev/null; then
  say "installing torch 2.13.0 (CPU build)..."
  "$python" -m pip install --quiet "torch==2.13.0"
else
  say "keeping the installed torch $("$python" -c 'import torch; print(torch.__version__)')"
fi
# Pin the torch installed now: an extra's frameworks (lightning, transformers, accelerate) must
# never swap it for another build (a multi-GB CUDA download here, a mismatched one on a GPU machine).
# (2.13.0, the build installed just above, where torch cannot be asked.)
torch_version="$("$python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==${torch_version}" > "$constraints"
say "installing tolaria[${extras}] and its dependencies (keeping $(cat "$constraints")), building its compiled extension tolaria._C (about a minute)..."
"$python" -m pip install --quiet -c "$constraints" -e ".[${extras}]"
# pyenv serves commands through shims: make the new `tolaria` console script visible at once.
if command -v pyenv >/dev/null 2>&1; then
  pyenv rehash || true
fi
say "done; \`tolaria doctor\` shows what was built"
