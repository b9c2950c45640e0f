#!/usr/bin/env bash
# One device-tool call (about 9 minutes on one H200): do continuous (y, x, z) glimpses pay (issue 18, item 3)?
#   1. the shipped classifier continued for EPOCHS epochs with a share P of its batches on random continuous glimpses
#      (--continuous-glimpses P), as runs/cont.safetensors (.json, .eval.md);
#   2. PPO in the continuous mode on that classifier (PPO_S seconds), and, from the start, PPO in the continuous mode
#      on the shipped classifier (PPO_S + 120 s), the recipe of RESULTS.md section 2.1;
#   3. the main job (2000 episodes, K=3) on that classifier: the continuous PPO policy and uniformly random (y, x, z)
#      glimpses, then random discrete glimpses on the same classifier; and, from the start, the main job with the
#      shipped discrete policies (`main_job --agents random ppo --K 3 6`: issue 18, item 2).
# Results: $OUT/results.tar.gz (logs, tables, policies' JSON) and the continuous policy and classifier beside it.
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu/continuous.sh     P (0.5), EPOCHS (20), PPO_S (300)
source "$(dirname "$0")/setup.sh"
mkdir -p runs
P=${P:-0.5} PPO_S=${PPO_S:-300}
BIG=(--num-envs 512 --batch-size 4096 --n-epochs 8 --ent-coef 0.003 --total-steps 20000000 --eval-every 500000
     --eval-episodes 2000)
ppo_cont() {  # tag, seconds, env kwargs
  timeout $(($2 + 90)) python3 -m avex.cli train ppo --device cuda --action-mode continuous --env-kwargs "$3" \
      "${BIG[@]}" --time-limit $2 --out runs/ppo_$1 > $R/ppo_$1.log 2>&1
  tr '\r' '\n' < $R/ppo_$1.log | grep -E "eval|limit|accuracy|Error" | tail -8
  cp runs/ppo_$1.json $R/ 2>/dev/null
  pack
}
ppo_cont shipped_cls $((PPO_S + 120)) '{}' > $R/ppo_shipped_cls.txt &
main_job --agents random ppo --K 3 6 > $R/main_job_discrete.txt 2>&1 &
timeout 200 python3 -m avex.cli train classifier --device cuda --dataset fashion-mnist --label-smoothing 0.1 --seed 2 \
    --fused-step off --save-every 0 --no-progress --log-every 500 --eval-every 0 \
    --init avex/checkpoints/fashion_mnist_tore.safetensors --epochs ${EPOCHS:-20} --lr 5e-4 --warmup 0.03 \
    --batch-size 1024 --continuous-glimpses $P --out runs/cont > $R/cont.log 2>&1
grep -v "^\[avex.train\] step" $R/cont.log | tail -12
cp runs/cont.eval.md runs/cont.json $R/ 2>/dev/null
pack
CONT='{"checkpoint": "runs/cont.safetensors"}'
ppo_cont cont_cls $PPO_S "$CONT"
timeout 80 python3 -m avex.cli benchmark --device cuda --episodes 2000 --num-envs 1000 --K 3 --agents random ppo \
    --ppo runs/ppo_cont_cls.safetensors --env-kwargs '{"checkpoint": "runs/cont.safetensors", "action_mode": "continuous"}' \
    --out $R/benchmark_continuous 2>&1 | tr '\r' '\n' | grep -v "^benchmark: " | tail -25
pack
timeout 60 python3 -m avex.cli benchmark --device cuda --episodes 2000 --num-envs 1000 --K 3 --agents random \
    --env-kwargs "$CONT" --out $R/benchmark_discrete_cont_cls 2>&1 | tr '\r' '\n' | grep -v "^benchmark: " | tail -12
pack
wait
echo "== continuous PPO on the shipped classifier"; cat $R/ppo_shipped_cls.txt
echo "== main job, shipped discrete policies"; cat $R/main_job_discrete.txt
cp runs/ppo_cont_cls.safetensors runs/ppo_cont_cls.json runs/cont.safetensors runs/cont.json runs/ppo_shipped_cls.safetensors \
   runs/ppo_shipped_cls.json $OUT/ 2>/dev/null
pack
