#!/bin/bash
# Do the presets travel? (issue 25.5) DFM and Flow Matching on glyphs (dfm data glyphs: thin strokes, sharp edges,
# 36 classes, 32 px), at the preset's settings and predicting the data. One lane of one thread per call:
#   bash benchmarks/glyph_check.sh A     bash benchmarks/glyph_check.sh B
# then what might fix DFM on glyphs, on the data-predicting DFM of lane A (the better of its two rows): its sampler,
# not retrained (steps of the fine stage and the threshold; lane sampler), and the fine stage's share of the training
# draws (lane probs). Lane fmnist: both methods with both prediction targets on Fashion-MNIST (the `cpu`
# bench preset, 800 steps, scored on held-aside images), so that the presets are chosen across all kinds of data.
# Scores against a draw of the training glyphs (--reference fit: the held-out splits hold 6 fonts each, so that a
# distance to them measures which fonts as much as how good; docs/RESULTS.md); REFERENCE=val scores against the
# held-aside fonts. Results under runs/glyph-check.
set -e
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
bench() {  # name methods overrides...
  local name=$1 methods=$2; shift 2
  local args=()
  for o in "$@"; do args+=(-o "$o"); done
  dfm bench quality --preset cpu-glyph --reference ${REFERENCE:-fit} --methods "$methods" --seeds ${SEEDS:-0} \
    --steps ${STEPS:-1600} --eval-points 1 --num-samples 1000 --threads 1 "${args[@]}" --out "runs/glyph-check/$name" \
    > "runs/glyph-check/$name.log" 2>&1
}
resample() {  # name trained-name overrides...: score a finished seed-0 run with other sampler settings, not retrained
  local name=$1 trained=$2; shift 2
  local run
  run=$(basename runs/glyph-check/$trained/runs/dfm-*-s0)
  mkdir -p "runs/glyph-check/$name/runs"
  ln -sfn "../../$trained/runs/$run" "runs/glyph-check/$name/runs/$run"
  bench "$name" dfm "$@"
}
mkdir -p runs/glyph-check
case "$1" in
  A) bench dfm dfm; bench dfm-xpred dfm method.prediction=data ;;
  B) bench fm fm; bench fm-xpred fm method.prediction=data ;;
  sampler)  # the preset is Heun 15 + 5 at τ = 0.7
    resample dfm-xpred-steps10-10 dfm-xpred method.prediction=data sampler.steps=10,10
    resample dfm-xpred-tau0.9 dfm-xpred method.prediction=data sampler.thresholds=0.9
    resample dfm-xpred-tau0.5 dfm-xpred method.prediction=data sampler.thresholds=0.5
    ;;
  probs)  # the preset draws the fine stage as the main one half the time
    bench dfm-xpred-p0.3 dfm method.prediction=data method.stage_probs=0.3,0.7 ;;
  fmnist)  # one lane: the first run trains the bench's Fashion-MNIST classifier (once, cached)
    mkdir -p runs/preset-check
    for m in dfm fm; do
      for target in velocity data; do
        dfm bench quality --preset cpu --reference val --methods $m --seeds 0 --threads 1 -o method.prediction=$target \
          --out runs/preset-check/fmnist-$m-$target > runs/preset-check/fmnist-$m-$target.log 2>&1
      done
    done
    ;;
  *) echo "usage: bash benchmarks/glyph_check.sh A|B|sampler|probs|fmnist" >&2; exit 2 ;;
esac
