#!/usr/bin/env bash
# One command for a lent GPU machine (see DESIGN section 7): install what it lacks from a carried,
# git-ignored wheels/ folder, install this project without touching its torch/triton, run the
# whole test suite on the GPU (GPU-only tests included), then the benchmark's headline configs.
#
#   here:  pip download --no-deps -d wheels/ open_clip_torch ftfy wcwidth regex tqdm
#   run(command="ATLAS_KERNELS_COMMIT=$(git rev-parse --short HEAD) bash .ci/gpu.sh", carry=["wheels"])
#
# Logs and results land in $OUT (fetched back by the device tool); commit bench/results from there.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
if ls wheels/*.whl >/dev/null 2>&1; then
  pip install --no-index --no-deps wheels/*.whl >"$OUT/pip.log" 2>&1 || echo "wheel install failed (see pip.log)"
fi
pip install --no-deps --no-build-isolation -e . >>"$OUT/pip.log" 2>&1
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
timeout "${TEST_SECONDS:-300}" python -m pytest atlas_kernels_tests -q -x -p no:cacheprovider \
  --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1
echo "tests exit $?" | tee -a "$OUT/tests.log"
tail -5 "$OUT/tests.log"
# The fused-vs-compose crossover that FUSED_MAX_M should be set from (ops/triton_backend.py).
timeout "${CROSSOVER_SECONDS:-150}" python -m bench.crossover >"$OUT/crossover.log" 2>&1
tail -3 "$OUT/crossover.log"
cp bench/results/*-crossover.jsonl "$OUT/" 2>/dev/null
BENCH_MINUTES="${BENCH_MINUTES:-4}" bash bench/gpu_run.sh "$@"
