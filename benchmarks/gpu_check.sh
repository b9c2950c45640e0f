#!/usr/bin/env bash
# One device-tool call after a model change: the CUDA tests, vector-env throughput (as in gpu_speed.sh) and a
# short `--compile` training run. Usage (device tool, carry .whl and data):  bash benchmarks/gpu_check.sh
source benchmarks/gpu_setup.sh
cat $R/gpu.txt
timeout 120 python3 -m pytest -q -p no:cacheprovider tests -k cuda 2>&1 | tail -2 | tee $R/pytest_cuda.txt; pack
timeout 90 python3 benchmarks/env_throughput.py --device cuda --num-envs 4096 8192 16384 --steps 36 \
    --env-kwargs '{"dtype": "bfloat16"}' --out $R/env_throughput.md 2>&1 | tail -6; pack
timeout 90 python3 benchmarks/env_throughput.py --env AVE-ImageNet-v0 --fake-imagenet 24 --device cuda --num-envs 1024 4096 --steps 36 \
    --env-kwargs '{"model": "vit_small_patch16_224", "pretrained": false, "cache_images": true, "dtype": "bfloat16"}' \
    --out $R/env_throughput.md 2>&1 | tail -6; pack
timeout 150 python3 -m avex.train --dataset fashion-mnist --device cuda --steps 200 --batch-size 1024 --compile --eval-every 0 \
    --save-every 0 --eval-size 1000 --log-every 50 --no-progress --out /tmp/compiled 2>&1 | grep -v -i warn | tail -12 | tee $R/train_compile.log; pack
echo "job done"
