#!/usr/bin/env bash
# One command for one 15-minute GPU window (a start of a minute or more included): at most 9 minutes
# (GPU_BUDGET_SECONDS, default 530: each stage's limit is cut to what is left of it).
#
#   here:  pip download --no-deps -d wheels/ open_clip_torch ftfy wcwidth regex tqdm
#   run(command="ATLAS_KERNELS_COMMIT=$(git rev-parse --short HEAD) bash .ci/gpu.sh", carry=["wheels"],
#       timeout_s=560)
#   rehearsal on a CPU (CI runs it):  GPU_REHEARSAL=1 bash .ci/gpu.sh   (< 3 minutes)
#
# Stages, each under its own `timeout`, each writing to $OUT as it goes, each run whatever the one
# before did (no `set -e`):
#   0 setup       carried wheels, this project (no deps: the machine's torch/triton stay), versions
#   1 gpu tests   GPU-only correctness (CUDA-graph capture, inductor), then the real-shape GPU tests
#   2 crossover   python -m bench.crossover (fused vs compose-then-matmul; suggests FUSED_MAX_M)
#   3 headline    ViT-B/32, N=21, bf16, batch 16 and 128: ceiling, floor, naive, merge_once,
#                 atlas:torch, atlas:triton (rows carry first-step ms and CUDA kernel launches/step)
#   4 limited     ViT-L/14, N=30, batch 32, int8 task vectors (atlas:triton)
# Triton: the autotuner's choices and compiled kernels are cached under $OUT/triton-cache; carry a
# fetched triton-cache/ folder back (carry=["wheels","triton-cache"]) and the next call reuses it.
# Every row records first_step_ms (compile + autotune + step) apart from the steady step_ms.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
T0=$(date +%s)
log() { echo "[gpu.sh +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/stages.log"; }
BUDGET="${GPU_BUDGET_SECONDS:-530}"  # the whole command; every stage's limit is cut to what is left
stage() {  # stage NAME SECONDS CMD...: run CMD under a time limit, log to $OUT/NAME.log, never abort
  local name=$1 secs=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) - 5 ))
  if [ "$left" -lt 15 ]; then log "skip $name: ${left}s of the budget left"; return 0; fi
  [ "$secs" -gt "$left" ] && secs=$left
  log "start $name (limit ${secs}s)"
  timeout -k 10 "$secs" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  log "end $name rc=$rc"; tail -3 "$OUT/$name.log" | sed "s/^/    /" | tee -a "$OUT/stages.log"
  return 0
}

REHEARSAL=0
if [ "${GPU_REHEARSAL:-0}" = 1 ] && ! python -c "import torch,sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  REHEARSAL=1  # no GPU: every stage, tiny shapes, torch backend (Triton's interpreter is too slow)
fi
export TRITON_CACHE_DIR="$OUT/triton-cache" TRITON_CACHE_AUTOTUNING=1
mkdir -p "$TRITON_CACHE_DIR"
[ -d triton-cache ] && cp -r triton-cache/. "$TRITON_CACHE_DIR/" 2>/dev/null
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES="$OUT/results"; mkdir -p "$RES"

# ---- 0 setup
if [ "$REHEARSAL" = 0 ]; then
  if ls wheels/*.whl >/dev/null 2>&1; then
    pip install --no-index --no-deps wheels/*.whl >"$OUT/pip.log" 2>&1 || log "wheel install failed (pip.log)"
  fi
  pip install --no-deps --no-build-isolation -e . >>"$OUT/pip.log" 2>&1 || log "editable install failed (PYTHONPATH used)"
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
fi
python -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 | tee "$OUT/versions.txt"
log "rehearsal=$REHEARSAL"

# ---- 1 GPU tests: GPU-only correctness first, then the real-shape tests (skip, with reasons, on CPU)
stage tests_gpu_only "${GPU_ONLY_SECONDS:-50}" python -m pytest -q -p no:cacheprovider -rs \
  --junitxml="$OUT/tests_gpu_only.xml" atlas_kernels_tests/test_cuda_graph.py \
  atlas_kernels_tests/test_ops_triton.py::test_gpu_compile_inductor atlas_kernels_tests/test_kernels_triton.py::test_gpu_int64_offsets
stage tests_real_shapes "${REAL_SHAPES_SECONDS:-90}" python -m pytest -q -p no:cacheprovider -rs \
  --junitxml="$OUT/tests_real_shapes.xml" -k "real_shapes" \
  atlas_kernels_tests/test_kernels_triton.py atlas_kernels_tests/test_ops_triton.py

# ---- 2 crossover
if [ "$REHEARSAL" = 1 ]; then
  stage crossover 60 python -m bench.crossover --smoke --n 2 --shapes 64x32 --m 1,8 --reps 1 --out "$RES/crossover.jsonl"
else
  stage crossover "${CROSSOVER_SECONDS:-90}" python -m bench.crossover --out "$RES/crossover.jsonl"
fi

# ---- 3 headline rows, 4 limited-VRAM row
if [ "$REHEARSAL" = 1 ]; then
  stage headline 90 python -m bench --models ViT-tiny --n 2 --batch 2,4 --precision fp32 --storage float32 \
    --only ceiling,floor,naive,merge_once,atlas:torch --warmup 1 --steps 1 --in-process --no-plot \
    --out "$RES/headline.jsonl"
  stage limited 45 python -m bench --models ViT-tiny --n 3 --batch 2 --precision fp32 --storage int8 \
    --only atlas:torch --warmup 1 --steps 1 --in-process --no-plot --out "$RES/limited.jsonl"
else
  stage headline "${HEADLINE_SECONDS:-200}" python -m bench --models ViT-B-32 --n 21 --batch 16,128 \
    --precision bf16 --storage float16 --only ceiling,floor,naive,merge_once,atlas:torch,atlas:triton \
    --in-process --out "$RES/headline.jsonl"
  stage limited "${LIMITED_SECONDS:-80}" python -m bench --models ViT-L-14 --n 30 --batch 32 --precision bf16 \
    --storage int8 --only atlas:triton --in-process --out "$RES/limited.jsonl"
fi
for f in "$RES"/headline.jsonl "$RES"/limited.jsonl; do
  [ -s "$f" ] && python -m bench.report "$f" >"${f%.jsonl}.md" 2>>"$OUT/stages.log"
done
log "all stages done"
