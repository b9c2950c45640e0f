#!/usr/bin/env bash
# One device-tool call: benchmarks/decoder_probe.py on the GPU (the decoder's layout and AME's entropy agent).
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu_decoder_probe.sh   -> $OUT/results.tar.gz
source benchmarks/gpu_setup.sh
cat $R/gpu.txt
timeout ${PROBE_S:-480} python3 benchmarks/decoder_probe.py --device cuda --steps ${STEPS:-1500} --episodes 2000 \
    --out $R/decoder_probe 2>&1 | grep -v Warning | tail -30
rm -f $R/decoder_probe/*.safetensors; pack
echo "job done"
