#!/usr/bin/env bash
# The oldest supported versions, tested: a named core subset of the suite in a venv with
#   torch 2.11.0, triton 3.6.0 (the lent GPU machine's versions), open_clip_torch 2.24.0,
#   safetensors 0.4.5, and numpy 2.2.6 (triton 3.6's interpreter breaks with numpy >= 2.3).
# These are the floors setup.py names. The main suite (.ci/run) covers the newest versions.
#
# Why torch 2.11 from the registry and not the torch 2.13 CPU build on local disk: 2.11 is what the
# GPU runs, and the CPU wheel of 2.13 has no matching torchvision (open_clip imports it). The
# registry's 2.11 wheel is a CUDA build (530 MB, plus 190 MB for triton; about 10 s to download and
# 40 s to install here). --no-deps and --system-site-packages: it reuses the CUDA 13 runtime
# libraries the main torch already installed, and loads fine without a GPU.
#
# The subset (CORE): torch.compile against eager for every block kind (the 2.11 silent-zero-gradient
# bug) and of a ViT-B/32-layout tower in one graph, the whole tiny tower through both backends against
# float64, the reference/torch ops, the plan's grouped compose (Triton 3.6's interpreter), and
# Triton's autotune disk cache read back the way triton 3.6 does.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${OLDEST_VENV:-${TMPDIR:-/tmp}/atlas-kernels-oldest}"
PINS=(torch==2.11.0 triton==3.6.0 torchvision==0.26.0 numpy==2.2.6 open_clip_torch==2.24.0 safetensors==0.4.5)
CORE=(atlas_kernels_tests/test_compile_gradients.py
      atlas_kernels_tests/test_triton_whole_model.py
      atlas_kernels_tests/test_reference_and_torch_ops.py
      atlas_kernels_tests/test_grouped_tower.py
      atlas_kernels_tests/test_autotune_cache.py)
t0=$(date +%s)
if ! "$VENV/bin/python" - "${PINS[@]}" 2>/dev/null <<'PY'
import importlib.metadata as md, sys
want = dict(p.split("==") for p in sys.argv[1:])
sys.exit(any(md.version(k).split("+")[0] != v for k, v in want.items()))
PY
then
  rm -rf "$VENV"
  python -m venv --system-site-packages "$VENV"
  "$VENV/bin/pip" install -q --no-deps "${PINS[@]}"
fi
"$VENV/bin/python" -c "import torch, triton, numpy, safetensors; print('oldest: torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'safetensors', safetensors.__version__)"
echo "oldest: venv ready in $(( $(date +%s) - t0 )) s"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "${OLDEST_SECONDS:-900}" \
  "$VENV/bin/python" -m pytest "${CORE[@]}" -q -p no:cacheprovider -W ignore::FutureWarning
echo "oldest: done in $(( $(date +%s) - t0 )) s"
