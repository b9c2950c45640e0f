#!/usr/bin/env bash
# One device-tool call: attention kernels on TORE's short sequences, per call (sdpa_short.py) and inside whole TORE
# episodes (tore_speed.py, batch 256, K=0 and 12) under each AVEX_SDPA choice.
# Usage (device tool, carry .whl):  bash benchmarks/gpu/sdpa.sh   -> $OUT/results.tar.gz
source "$(dirname "$0")/setup.sh"
timeout 90 python3 benchmarks/sdpa_short.py --out $R/sdpa_short.md
pack
for choice in default math efficient flash; do
  AVEX_SDPA=$choice tore_speed_b256 tore_speed_sdpa_$choice
done
