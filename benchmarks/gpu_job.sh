#!/usr/bin/env bash
# One device-tool call: train the shipped Fashion-MNIST checkpoints, then run the GPU benchmarks.
# Stages run in priority order; every stage's output is packed into $OUT as soon as it exists, so a
# time-out still returns what finished. Usage (device tool, carry .whl and data):  bash benchmarks/gpu_job.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 AVEX_FASHION_MNIST=$PWD/data/fashion-mnist
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
R=/tmp/results; mkdir -p $R runs
pack() { tar -czf $OUT/results.tar.gz -C $R . 2>/dev/null; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $R/gpu.txt
python3 -c "import torch, timm, gymnasium; print('torch', torch.__version__, 'timm', timm.__version__, 'gym', gymnasium.__version__)" | tee -a $R/gpu.txt

# 1. Classifier (TRAIN=1): a 60-step calibration run measures images/s, then the real run fills TRAIN_S seconds.
if [ "${TRAIN:-0}" = 1 ]; then
TRAIN_S=${TRAIN_S:-170}
python3 -m avex.cli train classifier --device cuda --batch-size 512 --steps 60 --eval-size 256 --no-progress --out /tmp/cal > $R/calibrate.log 2>&1
IPS=$(grep -o '[0-9]* images/s' $R/calibrate.log | tail -1 | cut -d' ' -f1); IPS=${IPS:-5000}
STEPS=$(( IPS * TRAIN_S / 512 )); STEPS=$(( STEPS < 800 ? 800 : (STEPS > 30000 ? 30000 : STEPS) ))
echo "calibration: $IPS images/s -> $STEPS steps" | tee -a $R/calibrate.log
python3 -m avex.cli train classifier --device cuda --batch-size 512 --steps $STEPS --no-progress --log-every 200 \
    --out runs/fashion_mnist_tore --log-json $R/train_log.jsonl 2>&1 | tee $R/train_classifier.log
cp runs/fashion_mnist_tore.safetensors runs/fashion_mnist_tore.json avex/checkpoints/ || exit 2
cp runs/fashion_mnist_tore.eval.* $R/ ; tar -cf $OUT/tore_checkpoint.tar -C runs fashion_mnist_tore.safetensors fashion_mnist_tore.json; pack
fi

# 2. PPO on the batched vector env with the new classifier.
python3 -m avex.cli train ppo --device cuda --num-envs 256 --total-steps 3000000 --time-limit ${PPO_S:-80} --batch-size 2048 \
    --eval-episodes 2000 --out runs/fashion_mnist_ppo 2>&1 | tr '\r' '\n' | grep -v "^ppo: " | tee $R/train_ppo.log
cp runs/fashion_mnist_ppo.* $R/ && cp runs/fashion_mnist_ppo.* avex/checkpoints/; pack

# 3. The main job on the GPU: agents x K, 2000 episodes each.
timeout 130 python3 -m avex.cli benchmark --device cuda --episodes 2000 --num-envs 1000 --ppo runs/fashion_mnist_ppo.safetensors \
    --out $R/benchmark 2>&1 | tr '\r' '\n' | grep -v "^benchmark: " | tail -40; pack

# 4. TORE vs full recomputation, ViT-B/16, bf16.
timeout 120 python3 benchmarks/tore_speed.py --device cuda --dtype bf16 --model vit_base_patch16_224 --K 0 4 8 12 --batch 1 256 \
    --mode eager graph --out $R/tore_speed_h100.md --json $R/tore_speed_h100.json 2>&1 | tail -30; pack

# 5. Vector-env throughput.
timeout 60 python3 benchmarks/env_throughput.py --device cuda --num-envs 4096 16384 --steps 36 \
    --env-kwargs '{"dtype": "bfloat16"}' --out $R/env_throughput.md 2>&1 | tail -8; pack
timeout 80 python3 benchmarks/env_throughput.py --env AVE-ImageNet-v0 --fake-imagenet 24 --device cuda --num-envs 1024 4096 --steps 36 \
    --env-kwargs '{"model": "vit_small_patch16_224", "pretrained": false, "cache_images": true, "dtype": "bfloat16"}' \
    --out $R/env_throughput.md 2>&1 | tail -8; pack
echo "job done"
