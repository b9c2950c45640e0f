#!/usr/bin/env bash
# One device-tool call: images/s of a training step at batch 1024, the eager step against the new one (RESULTS.md 7.1).
# 1. benchmarks/train_speed.py: the trainer's own run per mode (eager, fused, graphed), same seed and draws; the
#    steady-state ms per step, images/s, GPU kernel time per step and top kernels, the first losses of each mode;
# 2. the same `python -m avex.train` command twice, --fused-step off --cuda-graphs off (eager) and the defaults
#    (auto: graphed on one GPU): the trainer's own images/s over a short run, graph captures included.
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu/train_speed.sh  -> $OUT/train_speed.md, results.tar.gz
#   BATCH (1024), STEPS (40: steps per timed pass), MODES ("eager fused graphed"), TRAIN_STEPS (150; 0: skip 2.)
# About 2 minutes on one H200 (Triton compiles its kernels once per machine: the first run takes ~20 s more).
source "$(dirname "$0")/setup.sh"
B=${BATCH:-1024}
timeout 90 python3 benchmarks/train_speed.py --device cuda --batch $B --steps ${STEPS:-40} --modes ${MODES:-eager fused graphed} \
    --out $R/train_speed.md 2>&1 | grep -v -i warn | grep -E "^(eager|fused|graphed):|Error|error" | cut -c1-400
cp $R/train_speed.md $OUT/ 2>/dev/null
pack
if [ "${TRAIN_STEPS:-150}" -gt 0 ]; then
  printf '\n### The trainer command, eager against the defaults\n\n| step | command | images/s (after the first 50 steps) | last loss |\n|---|---|---|---|\n' \
      >> $R/train_speed.md
  for FLAGS in "--fused-step off --cuda-graphs off" ""; do
    CMD="python3 -m avex.train --dataset fashion-mnist --device cuda --steps ${TRAIN_STEPS:-150} --batch-size $B --lr 1e-3 \
--seed 0 --eval-every 0 --save-every 0 --eval-size 1000 --log-every 50 --no-progress --out /tmp/train_speed $FLAGS"
    LOG=$(timeout 60 $CMD 2>&1 | grep "avex.train\]" | tr '\n' ' ')
    echo "$LOG" | cut -c1-600
    python3 - "$CMD" "$LOG" >> $R/train_speed.md <<'EOF'
import re, sys
cmd, log = sys.argv[1:]
step = re.search(r"(eager|fused|graphed) step", log)
rate = re.search(r"([\d.]+) images/s per process; last loss ([\d.]+)", log)
print(f"| {step.group(1) if step else '?'} | `{' '.join(cmd.split())}` | {rate.group(1) if rate else 'failed'} "
      f"| {rate.group(2) if rate else ''} |")
EOF
    cp $R/train_speed.md $OUT/
    pack
  done
fi
cat $R/train_speed.md
