#!/usr/bin/env bash
# One device-tool call: how much of a replayed TORE step is a fixed cost, whatever the batch (issue 15: the K=12
# wall ratio; RESULTS.md section 9.3). A saving the same at every K is what moves that ratio, unlike one in
# proportion to the rows.
#   batches  tore_speed.py --mode graph --decoder entropy, K 0 and 12, batches 1 to 256: ms per step against the batch
#   profile  profile_step.py tore --graph --decoder entropy at K 0 and 12, batches 1 and 256: kernels per step, their
#            summed time and the span they cover (what is not busy there lies between kernels)
#   tests    the CUDA tests of the inference kernels (layer norm, attention and the fused blocks, the model, the
#            entropy map) and of the residual norm kernel training shares
#   ab       tore_speed.py --mode graph --decoder entropy, K 0 4 8 12, batches 1 and 256, with the avex of the tree
#            before a change and of this one, twice in turn (before, after, before, after) -> $R/ab_<tree><round>.md;
#            TREES="tag:path ..." names other trees, timed in that order each round (default "before:$BEFORE after:.")
#            Make the tree before first (runs/ is ignored by git, so it travels with carry):
#              rm -rf runs/before_tore && mkdir -p runs/before_tore && git archive HEAD avex agents envs \
#                | tar -x -C runs/before_tore \
#                && rm -r runs/before_tore/avex/checkpoints
# Usage (device tool, carry .whl and data; and runs/before_tore for ab):  bash benchmarks/gpu/tore_fixed.sh
#   (about 3 minutes on a fresh H200)   STAGES ("batches profile"), BEFORE (runs/before_tore), TREES.
source "$(dirname "$0")/setup.sh"
STAGES=${STAGES:-batches profile}
for stage in $STAGES; do
  echo "== $stage $(date -u +%H:%M:%S)"
  case $stage in
    batches)
      timeout 200 "${TORE_SPEED[@]}" --mode graph --decoder entropy --K 0 12 --batch 1 16 64 128 256 \
        --out $R/tore_batches.md 2>&1 | grep "graph |"
      pack ;;
    profile)
      for K in 0 12; do
        for b in 1 256; do
          timeout 100 python3 benchmarks/profile_step.py tore --device cuda --graph --decoder entropy --K $K --batch $b \
            --rows 40 --out $R/profile_K${K}_b$b.md > /dev/null 2> $R/profile_K${K}_b$b.err || echo "K$K b$b: exit $?"
          grep "GPU activities" $R/profile_K${K}_b$b.md
          pack
        done
      done ;;
    tests) cuda_tests tests/test_layer_norm.py tests/test_attention.py tests/test_model.py tests/test_entropy_attention.py \
      tests/test_train_fused_norm.py ;;
    ab)
      TREES=${TREES:-before:${BEFORE:-runs/before_tore} after:.}
      for spec in $TREES; do
        [ -d "${spec#*:}/avex" ] || { echo "no tree at ${spec#*:} (${spec%%:*}): see this file's header"; exit 2; }
      done
      for round in 1 2; do
        for spec in $TREES; do
          tag=${spec%%:*}; tree=$(cd "${spec#*:}" && pwd)
          PYTHONPATH=/tmp/site:$tree timeout 100 "${TORE_SPEED[@]}" --mode graph --decoder entropy --K 0 4 8 12 \
            --batch 1 256 --out $R/ab_$tag$round.md 2>&1 | grep "graph |" | sed "s/^/$tag$round: /"
          pack
        done
      done ;;
  esac
done
