#!/usr/bin/env bash
# One device-tool call: the main job on the GPU, the GPU speed benchmarks of issue 5 (TORE vs full recomputation,
# vector-env throughput) and a profile of a TORE episode. Usage (device tool, carry .whl and data):  bash benchmarks/gpu_speed.sh
# Every stage's output is packed into $OUT/results.tar.gz as soon as it exists, so a time-out keeps what finished.
source benchmarks/gpu_setup.sh
cat $R/gpu.txt
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_model.py -k cuda 2>&1 | tail -2 | tee $R/pytest_cuda.txt; pack

# 0. The main job on the GPU with the shipped checkpoints: agents x K, 2000 episodes each.
timeout 120 python3 -m avex.cli benchmark --device cuda --episodes 2000 --num-envs 1000 --out $R/benchmark 2>&1 \
    | tr '\r' '\n' | grep -v "^benchmark: " | tail -30; pack

# 1. TORE vs full recomputation, ViT-B/16, bf16 (attention kernels: avex's rule for short sequences).
timeout 150 python3 benchmarks/tore_speed.py --device cuda --dtype bf16 --model vit_base_patch16_224 --K 0 4 8 12 --batch 1 256 \
    --mode eager graph --out $R/tore_speed_h100.md --json $R/tore_speed_h100.json 2>&1 | tail -30; pack
# 1b. Batch 256, K=0 and 12 again (the spread between runs), and under the SDPA rule the Triton kernel replaced.
timeout 50 python3 benchmarks/tore_speed.py --device cuda --dtype bf16 --model vit_base_patch16_224 --K 0 12 \
    --batch 256 --mode graph --out $R/tore_speed_h100_repeat.md 2>&1 | grep "graph | 256"; pack
AVEX_SDPA=efficient,flash,math timeout 50 python3 benchmarks/tore_speed.py --device cuda --dtype bf16 --model vit_base_patch16_224 --K 0 12 \
    --batch 256 --mode graph --out $R/tore_speed_h100_sdpa_efficient.md 2>&1 | grep "graph | 256"; pack

# 2. Vector-env throughput.
timeout 90 python3 benchmarks/env_throughput.py --device cuda --num-envs 4096 8192 16384 --steps 36 \
    --env-kwargs '{"dtype": "bfloat16"}' --out $R/env_throughput.md 2>&1 | tail -8; pack
timeout 90 python3 benchmarks/env_throughput.py --env AVE-ImageNet-v0 --fake-imagenet 24 --device cuda --num-envs 1024 4096 --steps 36 \
    --env-kwargs '{"model": "vit_small_patch16_224", "pretrained": false, "cache_images": true, "dtype": "bfloat16"}' \
    --out $R/env_throughput.md 2>&1 | tail -8; pack

# 3. Where a TORE step's time goes now.
timeout 40 python3 benchmarks/profile_step.py tore --device cuda --K 12 --batch 256 --out $R/profile_tore.md > /dev/null 2>$R/profile_tore.err; pack
echo "job done"
