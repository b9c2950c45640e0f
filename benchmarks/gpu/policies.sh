#!/usr/bin/env bash
# One device-tool call (about 9.5 minutes on one H200): issue 18's training runs side by side on one GPU, where only
# accuracy counts (no timing is read from this call):
#   - PPO (benchmarks/gpu/ppo_sweep.sh): the shipped K=3 policy and the K=6 specialist continued (--init) with the
#     recipe of RESULTS.md section 2.1 (512 envs, batch 4096, 8 epochs, entropy bonus 0.003), PPO_S seconds each;
#   - the classifier (benchmarks/gpu/distill.sh): the shipped classifier continued with self-distillation and/or
#     continuous glimpses, against the same continuation without them.
# Results: $OUT/ppo.tar.gz (logs, curves, the policies) and $OUT/distill.tar.gz (logs, eval tables, summary.md), the
# first two distilled checkpoints beside them.
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu/policies.sh      PPO_S (390), TRAIN_S (530)
cd "$(dirname "$0")" || exit 1
BIG="--num-envs 512 --batch-size 4096 --n-epochs 8 --ent-coef 0.003"
R=/tmp/r_ppo PACK=ppo TO_OUT=0 PPO_S=${PPO_S:-390} EVAL_EVERY=500000 \
  VARIANTS="k3_cont: --K 3 --init avex/checkpoints/fashion_mnist_ppo $BIG; \
k6_cont: --K 6 --init avex/checkpoints/fashion_mnist_ppo_k6 $BIG; \
k3_cont_lr: --K 3 --init avex/checkpoints/fashion_mnist_ppo --lr 1e-4 $BIG" bash ppo_sweep.sh > /tmp/ppo_job.log 2>&1 &
sleep 20  # the first job installs the wheels
R=/tmp/r_distill PACK=distill TRAIN_S=${TRAIN_S:-530} bash distill.sh > /tmp/distill_job.log 2>&1 &
wait
echo "== PPO"; tail -40 /tmp/ppo_job.log
echo "== distill"; tail -30 /tmp/distill_job.log
