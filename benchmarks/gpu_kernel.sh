#!/usr/bin/env bash
# One device-tool call: avex's Triton attention kernel for short sequences (avex/attention.py) on the GPU:
# its CUDA tests, its time per call beside every SDPA backend, and whole TORE episodes with it (the default)
# against the SDPA rule it replaces, on the same lease.  Usage (device tool, carry .whl and data):
#   bash benchmarks/gpu_kernel.sh     -> $OUT/results.tar.gz
source benchmarks/gpu_setup.sh
cat $R/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee $R/versions.txt
timeout 120 python3 -m pytest -q tests/test_attention.py tests/test_model.py -p no:cacheprovider 2>&1 | tail -5 | tee $R/pytest_cuda.txt; pack
timeout 150 python3 benchmarks/sdpa_short.py --tune --out $R/sdpa_short.md | tail -40; pack
for choice in auto efficient,flash,math; do
  AVEX_SDPA=$choice timeout 60 python3 benchmarks/tore_speed.py --device cuda --dtype bf16 --model vit_base_patch16_224 \
      --K 0 4 8 12 --batch 1 256 --mode graph --out $R/tore_speed_$choice.md 2>&1 | grep "graph |"; pack
done
timeout 40 python3 benchmarks/profile_step.py tore --device cuda --K 12 --batch 256 --out $R/profile_tore.md > /dev/null 2>$R/profile_tore.err; pack
timeout 90 python3 benchmarks/env_throughput.py --device cuda --num-envs 4096 16384 --steps 36 \
    --env-kwargs '{"dtype": "bfloat16"}' --out $R/env_throughput.md 2>&1 | tail -6; pack
echo "job done"
