#!/usr/bin/env bash
# One device-tool call: several `avex train ppo` runs side by side on one GPU (SB3's host work leaves the GPU mostly
# idle, so they overlap), each with a greedy evaluation every EVAL_EVERY env-steps (its training curve, in the policy's
# JSON under eval_history) and a final one on 2000 test episodes.
# Usage (device tool, carry .whl and data):  VARIANTS='tag: flags; tag: flags' bash benchmarks/gpu/ppo_sweep.sh
#   PPO_S (300): each run's time limit; EVAL_EVERY (200000). The policies (.safetensors + .json) come back in $OUT
#   (the first three variants) and in results.tar.gz (all).
# Example (RESULTS.md section 2.1):
#   VARIANTS='k3: --K 3; k3_e8: --K 3 --n-epochs 8 --ent-coef 0.003; k6: --K 6' bash benchmarks/gpu/ppo_sweep.sh
source "$(dirname "$0")/setup.sh"
mkdir -p runs
IFS=';' read -ra LIST <<< "${VARIANTS:?set VARIANTS='tag: flags; ...'}"
for v in "${LIST[@]}"; do
  tag=$(echo ${v%%:*}); flags=${v#*:}
  echo "variant $tag: $flags" | tee -a $R/variants.txt
  # The time limit stops training; the final evaluation and the save come after it, hence the margin.
  timeout $(( ${PPO_S:-300} + 120 )) python3 -m avex.cli train ppo --device cuda --num-envs 256 --total-steps 20000000 \
      --time-limit ${PPO_S:-300} --batch-size 2048 --eval-every ${EVAL_EVERY:-200000} --eval-episodes 2000 $flags \
      --out runs/ppo_$tag > $R/$tag.log 2>&1 &
done
wait
for v in "${LIST[@]}"; do
  tag=$(echo ${v%%:*})
  echo "== $tag"; tr '\r' '\n' < $R/$tag.log | grep -E "eval|limit|Error|error" | tail -20
  cp runs/ppo_$tag.json $R/ 2>/dev/null; cp runs/ppo_$tag.safetensors $R/ 2>/dev/null
done
pack
for v in "${LIST[@]:0:${TO_OUT:-3}}"; do  # $OUT takes at most 8 files (TO_OUT: how many variants go there)
  tag=$(echo ${v%%:*})
  cp runs/ppo_$tag.safetensors runs/ppo_$tag.json $OUT/ 2>/dev/null || echo "variant $tag: no policy"
done
