#!/usr/bin/env bash
# One device-tool call after a model change: the CUDA tests, both envs' throughput and a short `--compile` training run.
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu/check.sh   -> $OUT/results.tar.gz
source "$(dirname "$0")/setup.sh"
cuda_tests
env_throughput env_throughput
timeout 150 python3 -m avex.train --dataset fashion-mnist --device cuda --steps 200 --batch-size 1024 --compile \
    --eval-every 0 --save-every 0 --eval-size 1000 --log-every 50 --no-progress --out /tmp/compiled 2>&1 \
    | grep -v -i warn | tail -12 | tee $R/train_compile.log
