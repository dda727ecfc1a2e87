#!/bin/bash
# Models for benchmarks/decomposed_tools.py: the quick start (Laplacian, two stages), the same with Haar, and three stages.
set -e
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
dfm train --preset quickstart --out runs/tools/lap2 --resume auto --no-progress -o train.threads=1 -o data.dataset=fashion-mnist:fit > runs/tools/lap2.log 2>&1
dfm train --preset quickstart --out runs/tools/haar2 --resume auto --no-progress -o train.threads=1 -o data.dataset=fashion-mnist:fit -o method.decomposition=haar > runs/tools/haar2.log 2>&1
dfm train --preset quickstart --out runs/tools/lap3 --resume auto --no-progress -o train.threads=1 -o data.dataset=fashion-mnist:fit -o method.stages=3 -o method.stage_probs=0.4,0.3,0.3 -o sampler.steps=10,5,5 -o sampler.thresholds=0.7,0.85 > runs/tools/lap3.log 2>&1
echo done > runs/tools/DONE
