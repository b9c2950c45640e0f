#!/usr/bin/env bash
# One device-tool call: is a candidate classifier worth shipping? The main job (`avex benchmark`, 2,000 episodes,
# every agent, K = 0, 3, 6) on the candidate checkpoint, to set beside the shipped checkpoint's main job (README; the
# episodes are the same, seed 0); meanwhile, in the background, classifier trainings side by side
# (benchmarks/gpu/variants.sh: e.g. the specialists the candidate is compared with).
# Usage (device tool, carry .whl, data and the candidate's folder):
#   CKPT=runs/cand/t12_49.safetensors VARIANTS='k0: --train-k 0; k3: --train-k 3' bash benchmarks/gpu/candidate.sh
#   VARIANTS='' runs the main job alone; BENCH_S (300): its time-out (the background trainings share the GPU).
# Results: $OUT/results.tar.gz (the main job), $OUT/variants.tar.gz and the variants' checkpoints (variants.sh).
source "$(dirname "$0")/setup.sh"
if [ -n "${VARIANTS:-}" ]; then
  (cd benchmarks/gpu && R=/tmp/r_variants PACK=variants bash variants.sh > /tmp/variants_job.log 2>&1) &
fi
MAIN_S=${BENCH_S:-300} main_job --episodes ${EPISODES:-2000} \
  --env-kwargs "{\"checkpoint\": \"${CKPT:?set CKPT=<candidate .safetensors>}\"}"
wait
[ -f /tmp/variants_job.log ] && grep -A12 "^| variant" /tmp/variants_job.log
