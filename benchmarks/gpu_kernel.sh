#!/usr/bin/env bash
# One device-tool call: avex's Triton attention kernel for short sequences (avex/attention.py) on the GPU:
# its CUDA tests, its time per call beside every SDPA backend (and its launch settings), whole TORE episodes
# and the Fashion-MNIST vector env with it (the default) and under the SDPA rule it replaced, on one lease.
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu_kernel.sh     -> $OUT/results.tar.gz
source benchmarks/gpu_setup.sh
cat $R/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee $R/versions.txt
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_model.py -k cuda 2>&1 | tail -2 | tee $R/pytest_cuda.txt; pack
timeout 120 python3 benchmarks/sdpa_short.py --tune --out $R/sdpa_short.md | tail -32; pack
TS="python3 benchmarks/tore_speed.py --device cuda --dtype bf16 --model vit_base_patch16_224 --mode graph"
timeout 60 $TS --K 0 4 8 12 --batch 1 256 --out $R/tore_speed_auto.md 2>&1 | grep "graph |"; pack
AVEX_SDPA=efficient,flash,math timeout 50 $TS --K 0 12 --batch 256 --out $R/tore_speed_sdpa_efficient.md 2>&1 | grep "graph |"; pack
timeout 50 $TS --K 0 12 --batch 256 --out $R/tore_speed_auto_repeat.md 2>&1 | grep "graph |"; pack
for choice in auto efficient,flash,math; do
  AVEX_SDPA=$choice timeout 80 python3 benchmarks/env_throughput.py --device cuda --num-envs 4096 16384 --steps 36 \
      --env-kwargs '{"dtype": "bfloat16"}' --out $R/env_throughput_$choice.md 2>&1 | tail -4; pack
done
timeout 40 python3 benchmarks/profile_step.py tore --device cuda --K 12 --batch 256 --out $R/profile_tore.md > /dev/null 2>$R/profile_tore.err; pack
echo "job done"
