#!/usr/bin/env bash
# One device-tool call: avex's Triton attention kernel for short sequences (avex/attention.py). Its CUDA tests, its
# time per call beside every SDPA backend and its launch settings (sdpa_short.py --tune), then TORE episodes and the
# Fashion-MNIST vector env with it (the default) and under the SDPA rule it replaced, on one machine, and a profile.
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu/kernel.sh   -> $OUT/results.tar.gz
source "$(dirname "$0")/setup.sh"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee $R/versions.txt
cuda_tests tests/test_attention.py tests/test_model.py
timeout 120 python3 benchmarks/sdpa_short.py --tune --out $R/sdpa_short.md | tail -32
pack
timeout 60 "${TORE_SPEED[@]}" --mode graph --K 0 4 8 12 --batch 1 256 --out $R/tore_speed.md 2>&1 | grep "graph |"
pack
AVEX_SDPA=efficient,flash,math tore_speed_b256 tore_speed_sdpa_efficient
tore_speed_b256 tore_speed_repeat
for choice in auto efficient,flash,math; do
  AVEX_SDPA=$choice timeout 80 python3 benchmarks/env_throughput.py "${ENV_FMNIST[@]}" --num-envs 4096 16384 \
      --out $R/env_throughput_$choice.md 2>&1 | tail -4
  pack
done
profile_tore
