#!/usr/bin/env bash
# One device-tool call: profile a vector-env cycle and a TORE episode, then continue training the shipped
# Fashion-MNIST classifier from its checkpoint (a warm restart: fresh warm-up, then cosine).
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu_train.sh   (EPOCHS=110, TRAIN_S=470 by default; a time-out keeps the last --save-every checkpoint)
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 AVEX_FASHION_MNIST=$PWD/data/fashion-mnist
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
R=/tmp/results; mkdir -p $R runs
pack() { tar -czf $OUT/results.tar.gz -C $R . 2>/dev/null; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $R/gpu.txt

# 1. Profiles (where a step's time goes), short.
timeout 60 python3 benchmarks/profile_step.py env --device cuda --num-envs 16384 --env-kwargs '{"dtype": "bfloat16"}' \
    --out $R/profile_env.md > /dev/null 2>$R/profile_env.err; pack
timeout 40 python3 benchmarks/profile_step.py tore --device cuda --K 12 --batch 256 --out $R/profile_tore.md > /dev/null 2>$R/profile_tore.err; pack

# 2. Continue the shipped classifier.
timeout ${TRAIN_S:-470} python3 -m avex.cli train classifier --device cuda --init avex/checkpoints/fashion_mnist_tore.safetensors \
    --epochs ${EPOCHS:-110} --batch-size 1024 --lr 1e-3 --warmup 0.03 --label-smoothing 0.1 --seed 1 \
    --eval-every 40 --save-every 40 --no-progress --log-every 200 \
    --out runs/fashion_mnist_tore --log-json $R/train_log.jsonl 2>&1 | tee $R/train_classifier.log
cp runs/fashion_mnist_tore.eval.* $R/ 2>/dev/null
tar -cf $OUT/tore_checkpoint.tar -C runs fashion_mnist_tore.safetensors fashion_mnist_tore.json; pack
echo "job done"
