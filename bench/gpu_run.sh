#!/usr/bin/env bash
# One command on the lent GPU machine: make open_clip importable, run the benchmark for at most
# BENCH_MINUTES (default 8) minutes, and copy results, plot and log to $OUT.
#
#   run(command="ATLAS_KERNELS_COMMIT=<sha> bash bench/gpu_run.sh --full", carry=["wheels"])
#
# Resuming across commands: the machine may start bare each time, so copy the fetched JSONL back to
# bench/results/ here (same name) before the next command; it travels with the work tree and the
# benchmark skips the jobs already in it. Extra arguments go to `python -m bench`.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bench_out}"
mkdir -p "$OUT"
if ! python -c "import open_clip" >/dev/null 2>&1; then
  # open_clip_torch (+ ftfy, wcwidth, regex, ...) wheels from a git-ignored folder; with only the
  # open_clip_torch wheel, bench builds the image tower from open_clip.model without the package's
  # __init__ (see bench/towers.py), so missing tokenizer/transform dependencies do not matter.
  ls "${WHEELS:-wheels}"/*.whl >/dev/null 2>&1 && pip install --no-index --no-deps "${WHEELS:-wheels}"/*.whl >"$OUT/pip.log" 2>&1
fi
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/bench.log"
python -m bench --max-minutes "${BENCH_MINUTES:-8}" "$@" 2>&1 | tee -a "$OUT/bench.log"
rc=${PIPESTATUS[0]}
cp bench/results/*.jsonl bench/results/*.png "$OUT/" 2>/dev/null
python -m bench.report "$(ls -t bench/results/*.jsonl | head -1)" > "$OUT/report.md" 2>>"$OUT/bench.log"
exit "$rc"
