#!/usr/bin/env bash
# One device-tool call (or the first part of one): attention kernels on TORE's short sequences, per call
# (sdpa_short.py) and inside whole TORE episodes (tore_speed.py, batch 256, K=0 and 12, under AVEX_SDPA choices).
# Usage (device tool, carry .whl):  bash benchmarks/gpu_sdpa.sh     -> $OUT/results.tar.gz
source benchmarks/gpu_setup.sh
timeout 90 python3 benchmarks/sdpa_short.py --out $R/sdpa_short.md; pack
for choice in default math efficient flash; do
  AVEX_SDPA=$choice timeout 40 python3 benchmarks/tore_speed.py --device cuda --dtype bf16 --model vit_base_patch16_224 --K 0 12 \
      --batch 256 --mode graph --out $R/tore_speed_sdpa_$choice.md 2>&1 | grep "graph | 256"; pack
done
