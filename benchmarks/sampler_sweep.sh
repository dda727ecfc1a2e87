#!/bin/bash
# Sampling-only sweep on trained runs: how the split of the sampling steps between DFM's two stages and the solver
# change the scores of one trained DFM model, with Flow Matching's model sampled alongside. Nothing is trained;
# every setting samples the same seeds from the same EMA weights.
#
# Usage: bash benchmarks/sampler_sweep.sh DFM_RUN FM_RUN OUT [REFERENCES]
#   DFM_RUN, FM_RUN: run directories of a 2-stage DFM and a Flow Matching run (e.g. a `dfm bench quality` run's
#                    runs/<id>); their latest checkpoints are used.
#   REFERENCES:      what to score against, comma-separated (default fashion-mnist:val, the 5,000 held-aside
#                    training images, so that a choice made here is not made on the test split; add
#                    fashion-mnist:test to confirm a choice on the bench's split).
# Env: SEEDS (default 0-999), GUIDANCE (1.0), THREADS (1; give 2 when nothing else runs), CACHE (a bench cache with
#      the domain classifier fashion_cnn.safetensors; default ~/.cache/dfm/bench), NUM_REF (reference images, 5000),
#      STEP (sample the checkpoint of this training step instead of the latest), ONLY (comma-separated setting
#      names to run, default all), NO_SWD=1 (Fréchet distances only), DFM3_RUN (a 3-stage DFM run: adds the
#      dfm3-* settings, 20 + 10 + 10 Euler steps and Heun 10 + 5 + 5, thresholds 0.7 and 0.85).
# Each setting writes OUT/<name>/samples.npz and, per reference R, OUT/<name>/{fd,swd}_R.json; finished ones are
# skipped, so it resumes. It prints one table per reference.
set -eu
DFM_RUN=$1 FM_RUN=$2 OUT=$3 REFERENCES=${4:-fashion-mnist:val}
SEEDS=${SEEDS:-0-999} GUIDANCE=${GUIDANCE:-1.0} CACHE=${CACHE:-$HOME/.cache/dfm/bench} NUM_REF=${NUM_REF:-5000}
STEP=${STEP:-} ONLY=${ONLY:-} NO_SWD=${NO_SWD:-0} DFM3_RUN=${DFM3_RUN:-}
export OMP_NUM_THREADS=${THREADS:-1}
mkdir -p "$OUT"
S=(--seeds "$SEEDS" --guidance "$GUIDANCE" --npz --no-grid --no-progression --batch-size 500)
# name | run | sampler options (40 network evaluations, or 39 for Heun whose last step is an Euler step, unless said)
SETTINGS=(
    "dfm-30-10|$DFM_RUN|--steps 30,10 --thresholds 0.7"
    "dfm-20-20|$DFM_RUN|--steps 20,20 --thresholds 0.7"
    "dfm-30-30|$DFM_RUN|--steps 30,30 --thresholds 0.7"
    "dfm-heun-15-5|$DFM_RUN|--steps 15,5 --thresholds 0.7 --solver heun"
    "fm-40|$FM_RUN|--steps 40"
    "fm-heun-20|$FM_RUN|--steps 20 --solver heun"
)
[ -z "$DFM3_RUN" ] || SETTINGS+=(
    "dfm3-20-10-10|$DFM3_RUN|--steps 20,10,10 --thresholds 0.7,0.85"
    "dfm3-heun-10-5-5|$DFM3_RUN|--steps 10,5,5 --thresholds 0.7,0.85 --solver heun"
)
if [ -n "$ONLY" ]; then
    KEEP=()
    for entry in "${SETTINGS[@]}"; do [[ ",$ONLY," == *",${entry%%|*},"* ]] && KEEP+=("$entry"); done
    [ ${#KEEP[@]} -gt 0 ] || { echo "ONLY=$ONLY names no setting" >&2; exit 2; }
    SETTINGS=("${KEEP[@]}")
fi
for entry in "${SETTINGS[@]}"; do
    IFS='|' read -r name run options <<< "$entry"
    ckpt=()
    [ -n "$STEP" ] && ckpt=(--checkpoint "$run/checkpoints/step_$(printf %08d "$STEP")")
    # shellcheck disable=SC2086
    [ -f "$OUT/$name/samples.npz" ] || dfm sample "$run" "${S[@]}" "${ckpt[@]}" $options --out "$OUT/$name"
done

# The Fréchet distances against cached reference statistics when the bench made them (same protocol), else
# against the images; SWD always against the images (28 and 14 px levels, as the bench).
IFS=',' read -r -a REFLIST <<< "$REFERENCES"
for REF in "${REFLIST[@]}"; do
    tag=${REF//[:\/]/-}
    REFS=()
    for ex in 'efficientnet-lite0-default' 'fashion-cnn-*'; do
        f=$(ls "$CACHE"/ref_${ex}_${tag}_n${NUM_REF}.npz 2>/dev/null | head -n 1 || true)
        [ -n "$f" ] && REFS+=(--ref "$f")
    done
    [ ${#REFS[@]} = 4 ] || REFS=(--ref "$REF" --num-ref "$NUM_REF")
    for entry in "${SETTINGS[@]}"; do
        name=${entry%%|*}
        [ -f "$OUT/$name/fd_$tag.json" ] || dfm eval score "$OUT/$name/samples.npz" "${REFS[@]}" \
            --metrics fd:efficientnet-lite0,fd:fashion-cnn --weights "fashion-cnn=$CACHE/fashion_cnn.safetensors" \
            --no-download --no-progress --out "$OUT/$name/fd_$tag.json"
        [ "$NO_SWD" = 1 ] || [ -f "$OUT/$name/swd_$tag.json" ] || dfm eval score "$OUT/$name/samples.npz" --ref "$REF" \
            --num-ref "$NUM_REF" --metrics swd --swd-min-resolution 8 --no-progress --out "$OUT/$name/swd_$tag.json"
    done
    python3 - "$OUT" "$tag" "${SETTINGS[@]}" <<'PY'
import json
import sys

out, tag, entries = sys.argv[1], sys.argv[2], sys.argv[3:]
keys = ("fd_efficientnet-lite0", "fd_fashion-cnn", "swd_28", "swd_14")
print(f"\nagainst {tag}:\n| setting | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
for entry in entries:
    name = entry.split("|")[0]
    scores = {}
    for part in ("fd", "swd"):
        try:
            with open(f"{out}/{name}/{part}_{tag}.json") as f:
                scores.update(json.load(f)["scores"])
        except FileNotFoundError:
            pass
    print(f"| {name} | " + " | ".join(f"{scores[k]:.1f}" if k in scores else "-" for k in keys) + " |")
PY
done
