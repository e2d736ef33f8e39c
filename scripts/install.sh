#!/usr/bin/env bash
# Install convscale (editable) with its dependencies on a fresh machine.
#   bash scripts/install.sh          # the package and the `convscale` command
#   bash scripts/install.sh --test   # ... plus the test tools, and timm (the reference that
#                                    # tests/test_timm.py checks checkpoints against)
# A torch that is already installed is kept (GPU builds included). Where there is none, the CPU
# build torch==2.13.0 is installed first: an unpinned torch would pull several GB of CUDA packages.
# timm (--test only) goes in with --no-deps for the same reason: its dependencies would pull
# torchvision (a CUDA build; benchmarks/timm_shim.py stands in for it) and with it another torch;
# its other imports, huggingface_hub and pyyaml, install with their own (pure Python, no torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pipq() {
  # pip's own exit status decides; only its noise about running as root is filtered.
  "$PY" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -e '^WARNING: Running pip as' -e 'is ignored: it is neither' || true; }
  return "${PIPESTATUS[0]}"
}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "convscale install: no torch found; installing torch==2.13.0 (CPU build)"
  pipq "torch==2.13.0"
fi
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
pipq -e ".${extra}"
if [ -n "$extra" ]; then
  pipq --no-deps "timm==1.0.31"
  pipq huggingface_hub pyyaml
fi
"$PY" -c "import torch, convscale; print(f'convscale {convscale.__version__} with torch {torch.__version__}')"
