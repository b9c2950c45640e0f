#!/usr/bin/env bash
# One device-tool call: where a training step's time goes (benchmarks/profile_step.py train) at several batches.
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu/profile_train.sh   -> $OUT/results.tar.gz
#   BATCHES ("512 1024 2048").
source "$(dirname "$0")/setup.sh"
for B in ${BATCHES:-512 1024 2048}; do
  timeout 100 python3 benchmarks/profile_step.py train --device cuda --batch $B --steps 20 --rows 30 \
      --out $R/profile_train_b$B.md 2>/dev/null | sed -n 1,5p
  pack
done
