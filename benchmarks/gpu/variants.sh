#!/usr/bin/env bash
# One device-tool call: several classifier trainings side by side on one GPU (one process each: this small model
# leaves the GPU idle between launches, so they overlap), each keeping its log and final evaluation table.
# Usage (device tool, carry .whl and data):  VARIANTS='tag: flags; tag: flags' bash benchmarks/gpu/variants.sh
#   COMMON: flags every variant gets (default: continue the shipped checkpoint with run 4's optimiser settings,
#   RESULTS.md section 1); TRAIN_S (540: a time-out per variant). The first three variants' checkpoints come back
#   in $OUT beside results.tar.gz; $R/summary.md gives every patch and 12 random glimpses at K = 0, 3, 6.
# Example (the K=depth probe of RESULTS.md section 1):
#   VARIANTS='all_k: ; k6: --train-k 6; k6_lr1e3: --train-k 6 --lr 1e-3' bash benchmarks/gpu/variants.sh
source "$(dirname "$0")/setup.sh"
mkdir -p runs
COMMON=${COMMON:---init avex/checkpoints/fashion_mnist_tore.safetensors --epochs 60 --lr 5e-4 --warmup 0.03}
IFS=';' read -ra LIST <<< "${VARIANTS:?set VARIANTS='tag: flags; ...'}"
TAGS=()
for v in "${LIST[@]}"; do
  tag=$(echo ${v%%:*}); flags=${v#*:}; TAGS+=("$tag")
  echo "variant $tag: $COMMON $flags" | tee -a $R/variants.txt
  timeout ${TRAIN_S:-540} python3 -m avex.cli train classifier --device $DEVICE --dataset fashion-mnist --batch-size 1024 \
      --label-smoothing 0.1 --seed 2 --eval-every 20 --save-every 0 --no-progress --log-every 500 $COMMON $flags \
      --out runs/$tag --log-json $R/${tag}_log.jsonl > $R/${tag}.log 2>&1 &
done
wait
for f in $R/*.log; do echo "== $f"; grep -v "^\[avex.train\] step" $f | tail -12; done
for tag in "${TAGS[@]}"; do cp runs/$tag.eval.md runs/$tag.eval.json $R/ 2>/dev/null || echo "variant $tag: no final evaluation"; done
# Every patch and 12 random glimpses at K = 0, 3, 6, one row per variant (issue 18, item 4's columns).
python3 benchmarks/eval_summary.py "$R" "${TAGS[@]}" | tee $R/summary.md
pack
for v in "${LIST[@]:0:3}"; do  # $OUT takes at most 8 files
  tag=$(echo ${v%%:*})
  cp runs/$tag.safetensors runs/$tag.json $OUT/ 2>/dev/null || echo "variant $tag: no checkpoint"
done
