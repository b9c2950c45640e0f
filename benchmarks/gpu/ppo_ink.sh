#!/usr/bin/env bash
# One device-tool call (about 9.5 minutes on one H200): PPO policies that also read the ink map (`avex train ppo
# --ink`: the revealed canvas pooled per patch, agents.belief.INK), trained from scratch at K=3 and K=6 side by side
# with the recipe of RESULTS.md section 2.1 (512 envs, batch 4096, 8 epochs, entropy bonus 0.003), PPO_S seconds
# each; then the main job's protocol at EPISODES episodes (seed 0, 1000 envs, `avex benchmark --agents ppo`) for each
# new policy and, beside the training, for the shipped policy at the same K (the same episodes).
# Results: $OUT/ppo.tar.gz (logs, curves, policies), $OUT/results.tar.gz (the benchmarks), the new policies in $OUT.
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu/ppo_ink.sh     PPO_S (380), EPISODES (10000)
#   INIT3, INIT6: continue these policies (--init) instead of starting from scratch; SHIPPED=0: no shipped rows.
source "$(dirname "$0")/setup.sh"
BIG="--num-envs 512 --batch-size 4096 --n-epochs 8 --ent-coef 0.003"
EPISODES=${EPISODES:-10000}
bench() {  # tag K policy
  timeout 200 python3 -m avex.cli benchmark --device $DEVICE --episodes $EPISODES --num-envs 1000 --agents ppo --K $2 \
    --ppo $3 --out $R/bench_$1 > $R/bench_$1.log 2>&1
  grep -m1 -E "^\| *ppo" $R/bench_$1.log | sed "s/^/$1: /" | tee -a $R/summary.txt
}
init3=${INIT3:+--init $INIT3}; init6=${INIT6:+--init $INIT6}
(cd benchmarks/gpu && R=/tmp/r_ppo PACK=ppo TO_OUT=2 PPO_S=${PPO_S:-380} EVAL_EVERY=250000 \
  VARIANTS="k3_ink: --K 3 --ink $init3 $BIG; k6_ink: --K 6 --ink $init6 $BIG" bash ppo_sweep.sh > /tmp/ppo_job.log 2>&1) &

if [ "${SHIPPED:-1}" = 1 ]; then
  bench k3_shipped 3 shipped:fashion-mnist
  bench k6_shipped 6 shipped:fashion-mnist
  pack
fi
wait
tail -30 /tmp/ppo_job.log
bench k3_ink 3 runs/ppo_k3_ink.safetensors
bench k6_ink 6 runs/ppo_k6_ink.safetensors
pack
cat $R/summary.txt
