#!/usr/bin/env bash
# One device-tool call: launch settings of training's row kernels (avex.train.rows: ROW_LAUNCH, SUM_LAUNCH), and the
# graphed step before and after a change to them.
# 1. SWEEP=1: benchmarks/rows_sweep.py (STAGES: first second), each row kernel alone over a grid of (tile, warps,
#    rows per program), and the column sums' second stage by PyTorch or sum_partials -> $R/rows_sweep.md; SWEEP_ARGS
#    go to the script (its default grid with STAGES=first, and the three step runs, took 408 s in one call on a fresh
#    H200);
# 2. cuda_tests over TESTS (the training kernels' test files; TESTS=none skips them);
# 3. the graphed step (benchmarks/train_speed.py, batch 1024, STEPS=200 steps) with the tree before (BEFORE, made as
#    train_ab.sh's header says), this tree, and this tree with the sweep's fastest settings set for the run
#    -> $R/train_before.md, train_after.md, train_fastest.md (put those settings into avex/train/rows.py if it wins).
# Usage (device tool, carry .whl, data and runs/before_train):  TESTS=none bash benchmarks/gpu/rows_tune.sh
# (about 7 minutes; the CUDA tests add about 3)
source "$(dirname "$0")/setup.sh"
BEFORE=${BEFORE:-runs/before_train}
[ -d "$BEFORE/avex" ] || { echo "no tree before the change at $BEFORE: see train_ab.sh's header"; exit 2; }
if [ "${SWEEP:-1}" = 1 ]; then
  timeout ${SWEEP_S:-300} python3 benchmarks/rows_sweep.py --stages ${STAGES:-first second} ${SWEEP_ARGS:-} \
    --out $R/rows_sweep.md \
    2>&1 | grep -v -i warn | tee $R/rows_sweep.log | grep -E "^\||compiled|Error|error" | tail -14
  pack
fi
[ "${TESTS:-}" != none ] && cuda_tests ${TESTS:-tests/test_train_step.py tests/test_train_fused_norm.py tests/test_layer_norm.py}
fastest=$(grep -oP "^fastest: \K.*" $R/rows_sweep.log 2>/dev/null)  # {'ROW_LAUNCH': {...}, 'SUM_LAUNCH': (...)}
speed() {  # tag, tree, Python run before the step's script (-P: the tree given, not the working directory, first)
  PYTHONPATH=/tmp/site:$2 timeout 150 python3 -P -c "import runpy, sys; import avex.train.rows as R; $3
sys.argv = ['train_speed.py', '--device', '$DEVICE', '--batch', '1024', '--steps', '${STEPS:-200}', '--modes',
            'graphed', '--out', '$R/train_$1.md']
runpy.run_path('benchmarks/train_speed.py', run_name='__main__')" 2>&1 | grep -v -i warn \
    | grep -E "^graphed:|Error|error" | cut -c1-300 | sed "s/^/$1: /"
  pack
}
speed before "$(cd "$BEFORE" && pwd)" ""
speed after "$PWD" ""
if [ -n "$fastest" ]; then
  speed fastest "$PWD" "f = $fastest
R.ROW_LAUNCH.update({k: R.RowLaunch(*v) for k, v in f.get('ROW_LAUNCH', {}).items()})
R.SUM_LAUNCH = f.get('SUM_LAUNCH', R.SUM_LAUNCH)"
fi
grep -h -E "^\| graphed" $R/train_*.md
