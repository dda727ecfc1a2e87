#!/bin/bash
# One short session on a lent GPU, prepared to run once:
#   1. the CUDA speed bench: DiT-XL/2 on a 512 px latent (64x64x4), bf16, DFM against Flow Matching (the paper's
#      Table 2 setting);
#   2. the training-step time of the `gpu` quality preset's model at its batch (DiT-Mini, 32x32x1, batch 256, bf16);
#   3. a time-boxed version of `dfm bench quality --preset gpu`: seed 0, DFM and Flow Matching trained side by side
#      (one process each, so the two share the GPU), with the number of optimiser steps chosen from step 2 so that
#      training fits in QUALITY_SECONDS (the full preset is 3 seeds x 20,000 steps); QUALITY_ARGS replaces the
#      preset and its options.
# Every part runs even when an earlier one fails; everything lands in $OUT (results.tgz holds the reports, plots,
# scores and sample grids, not the checkpoints).
#
# Usage: OUT=dir [QUALITY_SECONDS=240] [QUALITY_ARGS='--preset ...'] [QUALITY_THREADS=4] [FIXED_STEPS=n] [SKIP_SPEED=1] [QUALITY_TIMEOUT=s] [MAX_STEPS=20000] [DEVICE=cuda] [DFM_DATA_DIR=...] [CACHE=...] \
#        bash benchmarks/gpu_session.sh
#   DFM_DATA_DIR: a folder holding fashion-mnist/ (default: the usual search, /usr/share/datasets/fashion-mnist);
#   CACHE: a bench cache to start from (the domain classifier, reference statistics), copied once per method.
# Test it on a CPU first: DEVICE=cpu SMOKE=1 OUT=/tmp/gs bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-runs/gpu-session}
DEVICE=${DEVICE:-cuda}
QUALITY_SECONDS=${QUALITY_SECONDS:-240}
MAX_STEPS=${MAX_STEPS:-20000}
PY=${PYTHON:-python3}
# CPU threads per quality process: two processes with torch's default (one per core each) would oversubscribe the
# cores for the CPU side of a step (data, noise draws, logging).
QUALITY_THREADS=${QUALITY_THREADS:-4}
WORK=${WORK:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
T0=$(date +%s)
stamp() { echo "[gpu_session +$(( $(date +%s) - T0 ))s] $*"; }

if [ "${SMOKE:-0}" = 1 ]; then  # a few seconds on a CPU: the same commands, tiny sizes
    SPEED=(--model DiT-Tiny --input 16x16x4 --batch 2 --repeats 1 --warmup 1 --sample-repeats 1 --steps 2,2)
    MINI=(--model DiT-Tiny --input 32x32x1 --batch 4 --repeats 1 --warmup 1 --sample-repeats 1 --steps 2,2)
    QUALITY=(--preset smoke --num-samples 16 --sample-batch 16)
    STEP_OVERHEAD=1
else
    SPEED=(--model DiT-XL/2 --input 64x64x4 --precision bf16)
    MINI=(--model DiT-Mini --input 32x32x1 --batch 256 --precision bf16 --no-memory --repeats 20 --sample-repeats 1)
    # The preset's model, batch, optimiser and sampler; fewer evaluations (2 points, 5,000 samples, guidance 1.0
    # and 1.5 at the end) so that scoring stays a small part of the box.
    QUALITY=(--preset gpu --eval-points 2 --num-samples 5000 --guidance 1.0,1.5)
    # Or another comparison, e.g. the CPU study's settings far past a CPU's budget:
    #   QUALITY_ARGS="--preset cpu --guidance 1.0 --eval-points 8" FIXED_STEPS=25600
    if [ -n "${QUALITY_ARGS:-}" ]; then read -r -a QUALITY <<< "$QUALITY_ARGS"; fi
    # The bench's loop costs more than the bare step (EMA, data, logging, the evaluations), and the two processes
    # share the GPU: budget 2x the measured step.
    STEP_OVERHEAD=${STEP_OVERHEAD:-2}
fi

{
    stamp "hardware"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', \
platform.python_version()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda')"
    nproc
} > "$OUT/hardware.txt" 2>&1
cat "$OUT/hardware.txt"

if [ "${SKIP_SPEED:-0}" = 1 ]; then SPEED_CMD=(true); MINI_CMD=(true); else SPEED_CMD=(timeout 180); MINI_CMD=(timeout 120); fi
stamp "1. speed bench: ${SPEED[*]}"
"${SPEED_CMD[@]}" "$PY" -m dfm.cli bench speed --device "$DEVICE" "${SPEED[@]}" --out "$WORK/speed-xl" 2>&1 \
    | tee "$OUT/speed-xl.log"

stamp "2. step time of the gpu preset's model: ${MINI[*]}"
"${MINI_CMD[@]}" "$PY" -m dfm.cli bench speed --device "$DEVICE" "${MINI[@]}" --out "$WORK/speed-mini" 2>&1 \
    | tee "$OUT/speed-mini.log"
STEPS=$("$PY" - "$WORK/speed-mini/speed.json" "$QUALITY_SECONDS" "$STEP_OVERHEAD" "$MAX_STEPS" <<'EOF'
import json, sys
path, seconds, overhead, cap = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
try:
    methods = json.load(open(path))["methods"]
    step = max(m["train_step_s"]["median"] for m in methods.values())
except (OSError, KeyError, ValueError):
    step = 0.05  # no measurement: assume 20 steps/s
print(max(100, min(cap, int(seconds / (step * overhead)) // 100 * 100)))
EOF
)
[ "${SMOKE:-0}" = 1 ] && STEPS=4
STEPS=${FIXED_STEPS:-$STEPS}
stamp "3. quality: ${QUALITY[*]} --seeds 0 --steps $STEPS, dfm and fm side by side"
for m in dfm fm; do
    if [ -n "${CACHE:-}" ]; then mkdir -p "$WORK/cache-$m" && cp -r "$CACHE"/. "$WORK/cache-$m/"; fi
    timeout "${QUALITY_TIMEOUT:-$((QUALITY_SECONDS * 2 + 120))}" "$PY" -m dfm.cli bench quality "${QUALITY[@]}" --seeds 0 --methods $m \
        --steps "$STEPS" --device "$DEVICE" --threads "$QUALITY_THREADS" --cache "$WORK/cache-$m" --out "$WORK/quality-$m" \
        > "$OUT/quality-$m.log" 2>&1 &
done
wait
stamp "quality done"
tail -n 30 "$OUT/quality-dfm.log" "$OUT/quality-fm.log"
for m in dfm fm; do [ -f "$WORK/quality-$m/report.md" ] && cat "$WORK/quality-$m/report.md"; done

tar -C "$WORK" --exclude='checkpoints' --exclude='*.safetensors' --exclude='cache-*' --exclude='pretrained' \
    -czf "$OUT/results.tgz" . && ls -la "$OUT"
stamp "done"
