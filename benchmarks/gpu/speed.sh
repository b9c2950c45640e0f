#!/usr/bin/env bash
# One device-tool call: the GPU speed benchmarks (RESULTS.md sections 2 to 4). The CUDA kernel tests, the main job
# with the shipped checkpoints, TORE against full recomputation (ViT-B/16, bf16; again at batch 256, and under the
# SDPA rule that avex's Triton kernel replaced), both envs' throughput and a profile of a TORE step.
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu/speed.sh   -> $OUT/results.tar.gz
source "$(dirname "$0")/setup.sh"
cuda_tests tests/test_attention.py tests/test_model.py
main_job
timeout 150 "${TORE_SPEED[@]}" --K 0 4 8 12 --batch 1 256 --mode eager graph --out $R/tore_speed.md \
    --json $R/tore_speed.json 2>&1 | tail -30
pack
tore_speed_b256 tore_speed_repeat
AVEX_SDPA=efficient,flash,math tore_speed_b256 tore_speed_sdpa_efficient
env_throughput env_throughput
profile_tore
