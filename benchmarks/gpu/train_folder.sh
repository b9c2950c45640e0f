#!/usr/bin/env bash
# One device-tool call (about 3 minutes on one H200 with 16 cores): training on an ImageNet-layout folder of JPEGs,
# TORE against plain timm training of the same model, fed by the trainer's own loader (benchmarks/train_folder_speed.py).
#   1. a synthetic folder of $FILES real JPEGs of about 500x375 over 100 WordNet ids (benchmarks/make_jpeg_folder.py),
#      $ROOT/train, with all cores;
#   2. `avex data prepare` of it at 224 px into $STORES (AVEX_STORE_DIR), timed;
#   3. deit3_small_patch16_224 (random weights), batch $BATCH: plain timm, TORE's Training.step and a short
#      `avex train classifier` run, with the store on the GPU (the default for a store under a quarter of its memory);
#   4. plain and TORE without the store: every batch decoded on the host by $WORKERS read-ahead threads;
#   5. plain and TORE with the store on the host (AVEX_STORE_ON_DEVICE=0: rows gathered into pinned memory, as a store too
#      large for the GPU, ImageNet-train's 190 GB, is read);
#   6. plain and TORE for $GRAPHED_MODEL (vit_small_patch16_224: a ViT without layer scale, beside DeiT-III; both take
#      the graphed step now), store on the GPU.
# Results: $R/train_folder.md (all tables) and one .md + .json per run, copied to $OUT -> $OUT/results.tar.gz
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu/train_folder.sh
# Settings: FILES (20000), WORKERS (all cores), BATCH (256), STEPS (100 timed; decoding: 4 x WORKERS), WARMUP (20),
# MODEL (deit3_small_patch16_224), GRAPHED_MODEL (vit_small_patch16_224; empty: skip 6.), DEVICE (cuda; cpu with tiny
# FILES, BATCH and STEPS, IMG_SIZE=128 and MODEL=vit_tiny_patch16_224 checks the job itself), IMG_SIZE (224), EXTRA (more
# flags), STAGES (after the folder and its store; default "store_gpu decode store_host graphed"; "env" adds
# AVE-ImageNet-v0's env-steps/s on the store, ViT-S/16 and ViT-B/16 K=8 at ENV_ENVS, "4096 16384").
source "$(dirname "$0")/setup.sh"
FILES=${FILES:-20000} WORKERS=${WORKERS:-$(nproc)} BATCH=${BATCH:-256} STEPS=${STEPS:-100} WARMUP=${WARMUP:-20}
MODEL=${MODEL:-deit3_small_patch16_224} GRAPHED_MODEL=${GRAPHED_MODEL-vit_small_patch16_224} DEVICE=${DEVICE:-cuda}
ROOT=/tmp/jpeg-imagenet-train STORES=/tmp/avex-stores
read -r -a EXTRA <<< "${EXTRA:-}"
[ -n "${IMG_SIZE:-}" ] && EXTRA+=(--img-size "$IMG_SIZE")
S=(python3 benchmarks/train_folder_speed.py --root $ROOT --split train --device $DEVICE --batch-size $BATCH
   --warmup $WARMUP "${EXTRA[@]}")
quiet() { grep -v -i -E "warn|^\s*$" | cut -c1-300; }

rm -rf $ROOT $STORES
timeout 100 python3 benchmarks/make_jpeg_folder.py --out $ROOT --split train --files $FILES --workers $WORKERS \
    | tee $R/folder.txt
pack
start=$(date +%s%N)
AVEX_STORE_DIR=$STORES timeout 90 python3 -m avex.cli data prepare $ROOT --split train \
    --image-size ${IMG_SIZE:-224} --workers $WORKERS --quiet \
    | tee $R/prepare.txt
echo "avex data prepare: $(( ($(date +%s%N) - start) / 1000000 )) ms with start-up" | tee -a $R/prepare.txt
pack
on() { [[ " ${STAGES:-store_gpu decode store_host graphed} " == *" $1 "* ]]; }
if on store_gpu; then
  AVEX_STORE_DIR=$STORES timeout 100 "${S[@]}" --model $MODEL --steps $STEPS --out $R/store_gpu.md 2>&1 | quiet
  pack
fi
if on env; then  # AVE-ImageNet-v0 on this folder's store (train split), default settings but bf16, as RESULTS.md 11
  for m in "deit3_small_patch16_224 -" "vit_base_patch16_224 8"; do
    set -- $m
    kw="{\"root\": \"$ROOT\", \"split\": \"train\", \"model\": \"$1\", \"pretrained\": false, \"dtype\": \"bfloat16\""
    [ "$2" != - ] && kw="$kw, \"K\": $2"
    AVEX_STORE_DIR=$STORES timeout 100 python3 benchmarks/env_throughput.py --env AVE-ImageNet-v0 --device $DEVICE \
        --steps 36 --num-envs ${ENV_ENVS:-4096 16384} --env-kwargs "$kw}" --out $R/env_imagenet.md 2>&1 | tail -3
    pack
  done
fi
# No AVEX_STORE_DIR: the store is not found (the folder holds none), so every batch is decoded.
# Each read-ahead thread decodes a whole batch: time 4 rounds of $WORKERS batches after one round of warm-up.
if on decode; then
  timeout 100 "${S[@]}" --model $MODEL --steps $((4 * WORKERS)) --warmup $WORKERS --workers $WORKERS \
      --variants plain tore --out $R/decode.md 2>&1 | quiet
  pack
fi
if on store_host; then
  AVEX_STORE_DIR=$STORES AVEX_STORE_ON_DEVICE=0 timeout 60 "${S[@]}" --model $MODEL --steps $STEPS --variants plain tore \
      --out $R/store_host.md 2>&1 | quiet
  pack
fi
if [ -n "$GRAPHED_MODEL" ] && on graphed; then
  AVEX_STORE_DIR=$STORES timeout 90 "${S[@]}" --model $GRAPHED_MODEL --steps $STEPS --variants plain tore \
      --out $R/store_gpu_graphed.md 2>&1 | quiet
fi
{ echo "# Training on a folder of JPEGs, $(tail -n +2 $R/gpu.txt | head -1)"; echo;
  echo "- folder: $(cat $R/folder.txt)"; echo "- $(tr '\n' ' ' < $R/prepare.txt)"; echo;
  for f in store_gpu decode store_host store_gpu_graphed env_imagenet; do [ -f $R/$f.md ] && cat $R/$f.md && echo; done
} > $R/train_folder.md
cp $R/*.md $R/*.json "$OUT"/ 2>/dev/null
cat $R/train_folder.md
pack
