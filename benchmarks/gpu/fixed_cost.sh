#!/usr/bin/env bash
# One device-tool call: where the training step's time that does not halve with the batch goes (issue 19, item 3: at
# the recipe's global batch of 1,024, two GPUs run 512 images each, and DDP's scaling is what that step's time is).
#   shapes  benchmarks/profile_step.py train --step fused --shapes at batches 512 and 1024: each op's GPU time per
#           (op, input shapes), so that every matrix product shows apart (the graphed step's kernels lose their ops)
#   rows    benchmarks/rows_sweep.py at one launch setting (tiles of 1,024 elements, 4 warps, 64 rows per program,
#           loads one tile ahead), row counts 2,048 to 131,072, widths 128 and 192: us per call of the residual
#           norm's two passes and the layer norm's backward
#   main    the main job (setup.sh's main_job) on this tree
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu/fixed_cost.sh   (about 6 minutes on a fresh H200)
#   STAGES ("shapes rows main").
source "$(dirname "$0")/setup.sh"
STAGES=${STAGES:-shapes rows main}
for stage in $STAGES; do
  echo "== $stage $(date -u +%H:%M:%S)"
  case $stage in
    shapes)
      for b in 512 1024; do
        timeout 150 python3 benchmarks/profile_step.py train --device $DEVICE --batch $b --steps 20 --step fused \
          --shapes --rows 70 --out $R/shapes_b$b.md > /dev/null 2> $R/shapes_b$b.err || echo "shapes b$b: exit $?"
        pack
      done ;;
    rows)
      timeout 200 python3 benchmarks/rows_sweep.py --device $DEVICE --stages first \
        --kernels residual_norm_backward residual_norm_forward layer_norm_backward \
        --rows 2048 4096 8192 16384 32768 65536 131072 --norm-widths 128 192 --tiles 1024 --warps 4 \
        --per-program 64 --row-stages 2 --out $R/rows_by_m.md 2>&1 | grep -v -i warn | tail -5
      pack ;;
    main) main_job ;;
  esac
done
