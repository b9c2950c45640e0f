#!/usr/bin/env bash
# One device-tool call: launch settings of training's blocked attention kernels, and where the graphed step's time goes.
# 1. benchmarks/blocked_sweep.py: each blocked kernel (forward, dK/dV, dQ) timed alone over a grid of (block_q,
#    block_k, warps, stages) at the decoder's and the aggregator's rows -> $R/blocked_sweep.md;
# 2. benchmarks/train_speed.py --modes graphed at batch 1024 over STEPS (200) steps, its top 60 kernels -> train_1024.md;
# 3. the same at batch 512 (one GPU's share of DDP's global 1,024 on two), no profile -> train_512.md.
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu/blocked_tune.sh   (about 6 minutes)
source "$(dirname "$0")/setup.sh"
timeout ${SWEEP_S:-300} python3 benchmarks/blocked_sweep.py --out $R/blocked_sweep.md 2>&1 | grep -v -i warn | tail -30
pack
for B in 1024 512; do
  extra=(--rows 60); [ $B = 512 ] && extra=(--no-profile)
  timeout 120 python3 benchmarks/train_speed.py --device cuda --batch $B --steps ${STEPS:-200} --modes graphed \
    "${extra[@]}" --out $R/train_$B.md 2>&1 | grep -v -i warn | grep -E "^graphed:|Error|error" | cut -c1-300
  pack
done
