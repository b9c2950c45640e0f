#!/usr/bin/env bash
# One device-tool call: continue training the shipped Fashion-MNIST classifier from its checkpoint (a warm restart:
# fresh warm-up, then cosine), retrain the PPO policy on it, then run the main job (RESULTS.md sections 1 and 2).
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu/train.sh   -> $OUT/results.tar.gz, $OUT/tore_checkpoint.tar
#   EPOCHS (100), LR (1e-3), SEED (2), TRAIN_S (400: a time-out keeps the last --save-every checkpoint), PPO_S (100).
source "$(dirname "$0")/setup.sh"
mkdir -p runs

# 1. Continue the shipped classifier.
timeout ${TRAIN_S:-400} python3 -m avex.cli train classifier --device cuda --init avex/checkpoints/fashion_mnist_tore.safetensors \
    --epochs ${EPOCHS:-100} --batch-size 1024 --lr ${LR:-1e-3} --warmup 0.03 --label-smoothing 0.1 --seed ${SEED:-2} \
    --eval-every 50 --save-every 50 --no-progress --log-every 200 \
    --out runs/fashion_mnist_tore --log-json $R/train_log.jsonl 2>&1 | tee $R/train_classifier.log
cp runs/fashion_mnist_tore.eval.* $R/ 2>/dev/null
tar -cf $OUT/tore_checkpoint.tar -C runs fashion_mnist_tore.safetensors fashion_mnist_tore.json
pack
cp runs/fashion_mnist_tore.safetensors runs/fashion_mnist_tore.json avex/checkpoints/ || exit 2  # the env's default model from here on

# 2. PPO on the batched vector env with the new classifier.
python3 -m avex.cli train ppo --device cuda --num-envs 256 --total-steps 3000000 --time-limit ${PPO_S:-100} --batch-size 2048 \
    --eval-episodes 2000 --out runs/fashion_mnist_ppo 2>&1 | tr '\r' '\n' | grep -v "^ppo: " | tee $R/train_ppo.log
cp runs/fashion_mnist_ppo.* $R/ && cp runs/fashion_mnist_ppo.* avex/checkpoints/
pack

# 3. The main job with both new checkpoints.
main_job --ppo runs/fashion_mnist_ppo.safetensors
