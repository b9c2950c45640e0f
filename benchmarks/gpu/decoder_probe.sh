#!/usr/bin/env bash
# One device-tool call: benchmarks/decoder_probe.py on the GPU (re-fitted decoders and AME's entropy agent).
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu/decoder_probe.sh   -> $OUT/results.tar.gz
#   PROBE_S (480: time-out), STEPS (1500: re-fitting steps per variant).
source "$(dirname "$0")/setup.sh"
timeout ${PROBE_S:-480} python3 benchmarks/decoder_probe.py --device cuda --steps ${STEPS:-1500} --episodes 2000 \
    --out $R/decoder_probe 2>&1 | grep -v Warning | tail -30
rm -f $R/decoder_probe/*.safetensors
