#!/usr/bin/env bash
# One device-tool call: does self-distillation (--distill) or training on continuous glimpses as well
# (--continuous-glimpses) give one set of weights the accuracy of specialists (issue 18, items 3 and 4)?
#
# What it measures: four continuations of the shipped Fashion-MNIST classifier with run 4's optimiser settings
# (RESULTS.md section 1), side by side on one GPU (one process each), identical but for the tag's flags:
#   baseline: TORE's objective as shipped;  distill05 / distill10: + 0.5 / 1.0 x KL(full view at K=0 || glimpses),
#   the teacher being the model's own prediction with every patch revealed at K=0, without gradient;
#   cont25_distill05: a quarter of the batches on random continuous (y, x, z) glimpses, + 0.5 x KL.
# Every variant runs the eager step (--fused-step off: the fused step computes neither option, and the baseline
# must run the same arithmetic) and ends with the trainer's evaluation on the whole test split (10,000 cluttered
# canvases): top-1 at K = 0, 3, 6 (report_ks) with every patch revealed ('all') and after 1..12 random grid
# glimpses. $R/summary.md gathers the columns the issue asks about: K=0/3/6 every patch and K=0/3/6 after 12
# glimpses, one row per variant. Targets (issue 18): every patch within 1 point of a specialist at each K (K=6:
# 88.6, section 1.2) and >= 80 after 12 random glimpses at K=3 (shipped: 77.8); ship only if at least as good
# everywhere. It does NOT measure PPO in the continuous mode (item 3's last step): that needs the chosen checkpoint.
#
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu/distill.sh
#   EPOCHS (20), TRAIN_S (540: a time-out per variant; --eval-every 10 leaves subset evaluations in the logs if it
#   strikes), VARIANTS ('tag: flags; ...'), COMMON (flags every variant gets), DEVICE (cuda). Results:
#   $OUT/results.tar.gz (logs, JSON Lines, eval tables, summary.md); the first two non-baseline checkpoints beside it.
# Time: an eager step of this model at batch 1,024 takes 38 ms on an H200 with the GPU 94% busy (RESULTS.md 7.1), and
#   the teacher's pass (every patch, no gradient) makes a distilled step about 1.8x that (measured on the CPU at the
#   shipped model's size, batch 64); 20 epochs are 1,160 steps, so the four runs need about 45 + 3 x 80 s of GPU
#   time: about 5 minutes side by side, plus the evaluations. A 60-epoch comparison (section 1.1's length) needs
#   three calls of at most two variants, e.g. EPOCHS=60 VARIANTS='baseline: ; distill05: --distill 0.5'.
source "$(dirname "$0")/setup.sh"
mkdir -p runs
DEVICE=${DEVICE:-cuda}
COMMON=${COMMON:---init avex/checkpoints/fashion_mnist_tore.safetensors --epochs ${EPOCHS:-20} --lr 5e-4 --warmup 0.03 \
--batch-size 1024 --eval-every 10}
VARIANTS=${VARIANTS:-baseline: ; distill05: --distill 0.5; distill10: --distill 1.0; cont25_distill05: \
--continuous-glimpses 0.25 --distill 0.5}
IFS=';' read -ra LIST <<< "$VARIANTS"
TAGS=()
for v in "${LIST[@]}"; do
  tag=$(echo ${v%%:*}); flags=${v#*:}; TAGS+=("$tag")
  echo "variant $tag: $COMMON $flags" | tee -a $R/variants.txt
  timeout ${TRAIN_S:-540} python3 -m avex.cli train classifier --device $DEVICE --dataset fashion-mnist \
      --label-smoothing 0.1 --seed 2 --fused-step off --save-every 0 --no-progress --log-every 500 $COMMON $flags \
      --out runs/$tag --log-json $R/${tag}_log.jsonl > $R/${tag}.log 2>&1 &
done
wait
for tag in "${TAGS[@]}"; do
  echo "== $tag"; grep -v "^\[avex.train\] step" $R/$tag.log | tail -12
  cp runs/$tag.eval.md runs/$tag.eval.json $R/ 2>/dev/null || echo "variant $tag: no final evaluation"
done
# One row per variant: every patch and 12 glimpses at each K (from each run's final evaluation table).
python3 benchmarks/eval_summary.py "$R" "${TAGS[@]}" | tee $R/summary.md
pack
n=0
for tag in "${TAGS[@]}"; do  # $OUT takes at most 8 files: two checkpoints besides the results
  [ "$tag" = baseline ] && continue
  [ $n -ge 2 ] && break
  cp runs/$tag.safetensors runs/$tag.json $OUT/ 2>/dev/null && n=$((n + 1)) || echo "variant $tag: no checkpoint"
done
