#!/usr/bin/env bash
# One device-tool call: how many programs the training step's row kernels should run (avex.train.rows.PER_SM; 0: each
# kernel's ROW_LAUNCH rows per program at every row count).
#   sweep  benchmarks/rows_sweep.py: the residual norm's and layer norm's backward and the column sum at their default
#          settings, row counts 2,048 to 196,608, at each of SWEEP_PER_SM ("0 1 2 4 8") -> $R/per_sm_sweep.md
#   tests  the CUDA tests of TESTS (the training step's and its row kernels')
#   train  the graphed step (benchmarks/train_speed.py, STEPS=200 steps, profiled) at each batch of BATCHES
#          ("512 1024") with PER_SM set to each of TRAIN_PER_SM ("0 2") -> $R/train_b<batch>_per_sm<v>.md
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu/per_sm.sh   (STAGES: "sweep tests train")
source "$(dirname "$0")/setup.sh"
for stage in ${STAGES:-sweep tests train}; do
  echo "== $stage $(date -u +%H:%M:%S)"
  case $stage in
    sweep)
      timeout ${SWEEP_S:-240} python3 benchmarks/rows_sweep.py --device $DEVICE --stages first \
        --kernels residual_norm_backward layer_norm_backward column_sum \
        --rows ${ROWS:-2048 4096 8192 16384 32768 65536 131072 196608} --norm-widths 128 192 \
        --sum-widths 128 192 576 768 --tiles 2048 --warps 4 --per-program 256 --row-stages 2 \
        --per-sm ${SWEEP_PER_SM:-0 1 2 4 8} --out $R/per_sm_sweep.md 2>&1 | grep -v -i warn | tail -3
      pack ;;
    tests) cuda_tests ${TESTS:-tests/test_train_step.py tests/test_layer_norm.py} ;;
    train)
      for b in ${BATCHES:-512 1024}; do
        for v in ${TRAIN_PER_SM:-0 2}; do
          timeout 150 python3 -c "import runpy, sys; import avex.train.rows as R; R.PER_SM = $v
sys.argv = ['train_speed.py', '--device', '$DEVICE', '--batch', '$b', '--steps', '${STEPS:-200}', '--modes',
            'graphed', '--rows', '30', '--out', '$R/train_b${b}_per_sm$v.md']
runpy.run_path('benchmarks/train_speed.py', run_name='__main__')" 2>&1 | grep -v -i warn \
            | grep -E "^graphed:|Error|error" | cut -c1-200 | sed "s/^/b$b PER_SM=$v: /"
          pack
        done
      done
      grep -h -E "^\| graphed" $R/train_*.md ;;
  esac
done
