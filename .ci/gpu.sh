#!/usr/bin/env bash
# One command for one 15-minute GPU window (a start of a minute or more included): at most 9 minutes
# (GPU_BUDGET_SECONDS, default 530: each stage's limit is cut to what is left of it).
#
#   here:  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#            -d wheels open_clip_torch==3.3.0 ftfy wcwidth        (the GPU image has no open_clip)
#   run(command="ATLAS_KERNELS_COMMIT=<hash> bash .ci/gpu.sh", carry=["wheels"], timeout_s=580)
#       with <hash> written out here (git rev-parse --short HEAD): a $(git ...) in the command runs on
#       the GPU machine, whose copy of .git is not this checkout's HEAD (2026-12-04: rows said 174a2b6)
#   rehearsal on a CPU (CI runs it):  GPU_REHEARSAL=1 bash .ci/gpu.sh   (< 3 minutes)
#
# Stages, each under its own `timeout`, each writing to $OUT as it goes, each run whatever the one
# before did (no `set -e`):
#   0 setup        carried wheels installed with *this* python (`python -m pip --target`: the image's
#                  `pip` serves another interpreter), the project from the tree (PYTHONPATH), versions
#   1 gpu tests    GPU-only correctness (CUDA graphs, inductor, int64 offsets), the real-shape tests
#   2 kernels      python -m bench.group_kernels --sweep: the grouped compose / coefficient gradient
#                  of ViT-B/32 (N=21, fp16) against the copy bandwidth, per (BLOCK, warps)
#   3 headline     ViT-B/32, N=21, bf16, batch 16 and 128: ceiling, floor, naive, merge_once,
#                  atlas:torch, atlas:triton, each eager and replayed from one CUDA graph
#   4 limited      ViT-L/14, N=30, batch 32, int8 task vectors (atlas:triton): the 24 GiB goal
#   5 ext          the compiled extension built for sm_90, its headline rows beside triton's
# Triton: the autotuner's choices and compiled kernels are cached under $OUT/triton-cache (with
# TRITON_CACHE_AUTOTUNING=1: the disk cache rebuilds configs with Config(**json)); carry a fetched
# triton-cache/ folder back (carry=["wheels","triton-cache"]) and the next call reuses it.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
T0=$(date +%s)
log() { echo "[gpu.sh +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/stages.log"; }
BUDGET="${GPU_BUDGET_SECONDS:-530}"  # the whole command; every stage's limit is cut to what is left
STAGES="${GPU_STAGES:-tests,kernels,headline,limited,ext}"  # a comma list: a shorter call runs fewer
want() { case ",$STAGES," in *",$1,"*) return 0;; *) return 1;; esac; }
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
SITE="${GPU_SITE:-/tmp/atlas-site}"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
RES="$OUT/results"; mkdir -p "$RES"

# ---- 0 setup
if [ "$REHEARSAL" = 0 ]; then
  if ls wheels/*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-index --no-deps --no-compile --target "$SITE" wheels/*.whl >"$OUT/pip.log" 2>&1 \
      || log "wheel install failed (pip.log)"
  fi
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
fi
python -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 | tee "$OUT/versions.txt"
python -c "import open_clip, atlas_kernels; print('open_clip', open_clip.__version__, 'atlas_kernels', atlas_kernels.__file__)" >>"$OUT/versions.txt" 2>&1 \
  || log "open_clip or atlas_kernels not importable (see versions.txt)"
log "rehearsal=$REHEARSAL"

# ---- 1 GPU tests: GPU-only correctness first, then the real-shape tests (skip, with reasons, on CPU)
if want tests; then
stage tests_gpu_only "${GPU_ONLY_SECONDS:-60}" python -m pytest -q -p no:cacheprovider -rs \
  --junitxml="$OUT/tests_gpu_only.xml" atlas_kernels_tests/test_cuda_graph.py \
  atlas_kernels_tests/test_ops_triton.py::test_gpu_compile_inductor atlas_kernels_tests/test_kernels_triton.py::test_gpu_int64_offsets \
  atlas_kernels_tests/test_autotune_cache.py
stage tests_real_shapes "${REAL_SHAPES_SECONDS:-90}" python -m pytest -q -p no:cacheprovider -rs \
  --junitxml="$OUT/tests_real_shapes.xml" -k "${GPU_REAL_SHAPES_K:-real_shapes}" \
  atlas_kernels_tests/test_kernels_triton.py atlas_kernels_tests/test_ops_triton.py
fi

# ---- 2 the grouped kernels against the copy bandwidth
if ! want kernels; then :
elif [ "$REHEARSAL" = 1 ]; then
  stage kernels 30 bash -c 'python -m bench.group_kernels; test $? -eq 2'  # says "no GPU", exits 2
else
  stage kernels "${KERNELS_SECONDS:-60}" python -m bench.group_kernels --sweep --out "$RES/group_kernels.jsonl"
fi

# ---- 3 headline rows (eager and graph-replayed), 4 limited-VRAM row
HEADLINE_ONLY="${GPU_HEADLINE_ONLY:-ceiling,floor,naive,merge_once,atlas:torch,atlas:triton}"
if ! want headline; then :
elif [ "$REHEARSAL" = 1 ]; then
  stage headline 90 python -m bench --models ViT-tiny --n 2 --batch 2,4 --precision fp32 --storage float32 \
    --only ceiling,floor,naive,merge_once,atlas:torch --warmup 1 --steps 1 --in-process --no-plot \
    --out "$RES/headline.jsonl"
  stage limited 45 python -m bench --models ViT-tiny --n 3 --batch 2 --precision fp32 --storage int8 \
    --only atlas:torch --warmup 1 --steps 1 --in-process --no-plot --out "$RES/limited.jsonl"
else
  stage headline "${HEADLINE_SECONDS:-220}" python -m bench --models ViT-B-32 --n 21 --batch 128,16 \
    --precision bf16 --storage float16 --only "$HEADLINE_ONLY" --in-process --out "$RES/headline.jsonl"
  want limited && stage limited "${LIMITED_SECONDS:-70}" python -m bench --models ViT-L-14 --n 30 --batch 32 \
    --precision bf16 --storage int8 --only atlas:triton --in-process --no-graph --out "$RES/limited.jsonl"
fi
for f in "$RES"/headline.jsonl "$RES"/limited.jsonl; do
  [ -s "$f" ] && python -m bench.report "$f" >"${f%.jsonl}.md" 2>>"$OUT/stages.log"
done

# ---- 5 the compiled extension on this GPU (built here, sm_90), beside triton
if [ "$REHEARSAL" = 0 ] && want ext; then
  stage ext_build "${EXT_BUILD_SECONDS:-100}" env TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=16 ATLAS_KERNELS_BUILD_EXT=1 \
    CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" python setup.py build_ext --inplace
  stage ext_headline "${EXT_SECONDS:-60}" python -m bench --models ViT-B-32 --n 21 --batch 128 --precision bf16 \
    --storage float16 --only floor,atlas:ext,atlas:triton --in-process --no-profile --out "$RES/ext_headline.jsonl"
  [ -s "$RES/ext_headline.jsonl" ] && python -m bench.report "$RES/ext_headline.jsonl" >"$RES/ext_headline.md" 2>>"$OUT/stages.log"
fi
log "all stages done"
if [ "$REHEARSAL" = 0 ]; then
  # At most 8 files come back from a lent GPU: everything in one archive, the readable summaries beside it.
  ( cd "$OUT" && tar czf /tmp/gpu_all.tgz --exclude=./all.tgz . 2>/dev/null && mv /tmp/gpu_all.tgz all.tgz
    for f in results/headline.md results/limited.md results/ext_headline.md results/group_kernels.jsonl; do
      [ -f "$f" ] && cp "$f" .
    done
    find . -mindepth 1 -maxdepth 1 ! -name all.tgz ! -name stages.log ! -name versions.txt ! -name '*.md' \
      ! -name group_kernels.jsonl -exec rm -rf {} + )
fi
