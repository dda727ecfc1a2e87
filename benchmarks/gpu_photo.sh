#!/bin/bash
# Issue 25.4, prepared for a lent GPU: the 128 px photograph comparison, DFM (three stages) against Flow Matching,
# a ~30M-parameter DiT-S/8 (256 tokens at 128 px), bf16, batch 256, trained side by side for a fixed budget, scored
# against a draw of the training crops (--reference fit) with the ImageNet-feature FD and the per-level SWD.
#
# The photographs are not on the GPU machine (they come from Debian wallpaper packages) and a device call carries at
# most 64 MiB, so build a smaller set here first and carry it:
#   dfm data photos --source debian-photos --crops-per-photo 48 --resolutions 128 --out data/photos-gpu
#   (about 40 MB; `du -sh data/photos-gpu`), then on the device, with carry=["data/photos-gpu"]:
#   OUT=$OUT bash benchmarks/gpu_photo.sh
# Everything else is benchmarks/gpu_session.sh (its speed parts skipped): both methods train at once on the one GPU
# for STEPS steps (default 3000: ~4 minutes each at ~0.08 s per shared step on an H200, to be confirmed by the first
# run), then sample 2,000 images each at two evaluation points. Keep QUALITY_TIMEOUT under the device's per-call
# limit (600 s). Test it on a CPU first (seconds): DEVICE=cpu TINY=1 OUT=/tmp/gp bash benchmarks/gpu_photo.sh
set -u
cd "$(dirname "$0")/.."
DATA=${DATA:-data/photos-gpu/128/fit}
if [ ! -d "$DATA" ]; then
    echo "gpu_photo: $DATA is missing: build it with dfm data photos (see the top of this script) and carry it" >&2
    exit 2
fi
ARGS="--preset cpu-photo --reference fit --eval-points 2 --guidance 1.0 -o data.dataset=$DATA -o data.resolution=128"
ARGS="$ARGS -o method.stages=3 -o method.stage_probs=0.4,0.3,0.3 -o sampler.steps=10,5,5 -o sampler.thresholds=0.7,0.85"
# both with the overlapping output head, each method's best on the CPU photographs (docs/RESULTS.md, "Token seams");
# OVERLAP=false for the plain head. Flow Matching trains at main_loc -1.0, the cpu-photo preset's setting for it.
ARGS="$ARGS -o model.overrides.head_overlap=${OVERLAP:-true}"
if [ "${TINY:-0}" = 1 ]; then  # the same commands at toy sizes, for a CPU
    ARGS="$ARGS --num-samples 16 --sample-batch 16 -o model.overrides.depth=1 -o model.overrides.hidden_size=32"
    ARGS="$ARGS -o model.overrides.num_heads=2 -o train.batch_size=4 -o model.overrides.patch_size=16"
    export FIXED_STEPS=${STEPS:-2}
else
    ARGS="$ARGS --num-samples 2000 --sample-batch 500 -o model.name=DFM-DiT-S/8 -o model.overrides.patch_size=8"
    ARGS="$ARGS -o model.overrides.hidden_size=384"  # DiT-S's own width (the cpu-photo preset sets 192)
    ARGS="$ARGS -o train.batch_size=256 -o train.precision=bf16 -o optim.lr=5e-4 -o optim.warmup_steps=300"
    export FIXED_STEPS=${STEPS:-3000}
fi
export QUALITY_ARGS="$ARGS" SKIP_SPEED=1 QUALITY_TIMEOUT=${QUALITY_TIMEOUT:-540}
exec bash benchmarks/gpu_session.sh
