#!/usr/bin/env bash
# One device-tool call: the graphed training step of the tree before a change against this one, side by side in one
# call (RESULTS.md 7.1's measure), after the CUDA tests of the training kernels; then, optionally, the main job.
# 1. cuda_tests over TESTS (the training step's and its kernels' test files);
# 2. benchmarks/train_speed.py --modes graphed at batch 1024 with each tree's avex (this tree's script), the timed
#    pass and its kernel profile -> $R/train_before.md and train_after.md, their first losses side by side;
# 3. MAIN=1: the main job (`avex benchmark --device cuda --episodes 2000 --num-envs 1000`, every agent and K).
# Make the tree before first (runs/ is ignored by git, so it travels with carry):
#   rm -rf runs/before_train && mkdir -p runs/before_train && git archive HEAD avex agents envs | tar -x -C runs/before_train
# Usage (device tool, carry .whl, data and runs/before_train):  MAIN=1 bash benchmarks/gpu/train_ab.sh   (about 6 min)
#   BEFORE (runs/before_train), STEPS (40), MODES (graphed), TESTS (the default below), ROWS (the profile's kernels
#   listed; the script's default when unset).
source "$(dirname "$0")/setup.sh"
BEFORE=${BEFORE:-runs/before_train}
[ -d "$BEFORE/avex" ] || { echo "no tree before the change at $BEFORE: see this file's header"; exit 2; }
cuda_tests ${TESTS:-tests/test_train_fused_norm.py tests/test_train_step.py tests/test_train_fused_ls.py tests/test_layer_norm.py}
for tag in before after; do
  tree=$PWD; [ $tag = before ] && tree=$(cd "$BEFORE" && pwd)
  PYTHONPATH=/tmp/site:$tree timeout 150 python3 benchmarks/train_speed.py --device $DEVICE \
    --batch ${BATCH:-1024} --steps ${STEPS:-40} --modes ${MODES:-graphed} ${ROWS:+--rows $ROWS} --out $R/train_$tag.md 2>&1 \
    | grep -v -i warn | grep -E "^(graphed|fused|eager):|Error|error" | cut -c1-300 | sed "s/^/$tag: /"
  pack
done
grep -h -E "^\| (graphed|fused|eager)" $R/train_before.md $R/train_after.md
if [ "${MAIN:-0}" = 1 ]; then
  main_job
fi
