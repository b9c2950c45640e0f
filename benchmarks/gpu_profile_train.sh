#!/usr/bin/env bash
# One device-tool call: where a training step's time goes (benchmarks/profile_step.py train) at several batches.
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu_profile_train.sh   -> $OUT/results.tar.gz
source benchmarks/gpu_setup.sh
cat $R/gpu.txt
for B in ${BATCHES:-512 1024 2048}; do
  timeout 100 python3 benchmarks/profile_step.py train --device cuda --batch $B --steps 20 --rows 30 \
      --out $R/profile_train_b$B.md 2>/dev/null | sed -n 1,5p; pack
done
echo "job done"
