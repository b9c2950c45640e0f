#!/usr/bin/env bash
# One device-tool call on nvidia-h200-x2 (about 5 minutes): DDP scaling of the training step (RESULTS.md section 7,
# issue 19 item 3), 1 GPU then 2 GPUs at the same global batch, the graphed step (the all-reduce inside each graph).
#   0. the CUDA tests of tests/test_train_allreduce.py: on 2 GPUs (NCCL) the graphed step with the all-reduce in its
#      graphs gives the fused step's losses and weights without graphs -> $R/pytest_cuda.txt;
#   1. benchmarks/train_speed.py under torchrun, the shipped architecture at global batch $BATCH (1024), $STEPS (300)
#      steps: a first pass captures a graph per (K, T), a second over the same step indices is timed;
#   2. the same for DeiT-III-S (deit3_small_patch16_224, random weights, layer scale, 224 px, patch 16, on
#      one-channel Fashion-MNIST canvases) at global batch $DEIT_BATCH (512), $DEIT_STEPS (120) steps;
#      a 2-GPU graphed run that fails is followed by the same run with --modes fused (no graphs), for comparison;
#   3. benchmarks/ddp_report.py: images/s in total and per GPU, scaling efficiency, the loss curves' difference
#      -> $R/ddp_speed.md and ddp_speed_loss.png (also copied to $OUT), every run's .json and .log;
#   4. optional, BATCHES="1024 2048": the trainer's own command (`torchrun -m avex.train`, $TRAIN_STEPS steps) per
#      global batch on 1 and 2 GPUs, its images/s after the first 50 steps (graph captures included) -> ddp$TAG.md.
# Usage (device tool, kind nvidia-h200-x2, carry .whl and data):  bash benchmarks/gpu/ddp.sh   -> $OUT/results.tar.gz
#   LOCAL (1: each of 1. and 2. also runs one GPU alone at the per-GPU batch, half the global one; 0: not),
#   BATCH, STEPS, DEIT_BATCH, DEIT_STEPS (0: skip 2.), BATCHES (""), TRAIN_STEPS (400), TAG, EXTRA (more trainer flags);
#   DEVICE=cpu MODE=fused with tiny BATCH, STEPS, DEIT_BATCH and DEIT_STEPS checks the job itself (gloo, no graphs).
source "$(dirname "$0")/setup.sh"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off
python3 -c "import torch; print('torch', torch.__version__, 'GPUs', torch.cuda.device_count(), 'NCCL', torch.cuda.nccl.version())" \
    | tee $R/versions.txt
DEVICE=${DEVICE:-cuda} MODE=${MODE:-graphed}
[ $DEVICE = cuda ] && cuda_tests tests/test_train_allreduce.py
quiet() { grep -v -i warn | tee "$1" | grep -E "^(graphed|fused):|Error|error" | cut -c1-400; }

# speed NAME STEPS GLOBAL_BATCH [train_speed.py flags]: 1 GPU, then 2 GPUs -> $R/speed_NAME_np{1,2}.json
speed() {
  local name=$1 steps=$2 batch=$3 np run
  for np in 1 2; do
    run=(torchrun --standalone --nproc_per_node=$np benchmarks/train_speed.py --device $DEVICE --batch $batch --steps $steps
         --no-profile --json $R/speed_${name}_np$np.json "${@:4}")
    timeout 150 "${run[@]}" --modes $MODE 2>&1 | quiet $R/speed_${name}_np$np.log
    if [ $np = 2 ] && [ $MODE = graphed ] && [ ! -f $R/speed_${name}_np2.json ]; then
      echo "$name: the graphed 2-GPU run failed (its log: speed_${name}_np2.log); the fused step without graphs:"
      tail -5 $R/speed_${name}_np2.log
      timeout 100 "${run[@]}" --modes fused 2>&1 | quiet $R/speed_${name}_np2_fused.log
    fi
    pack
  done
  if [ "${LOCAL:-1}" = 1 ]; then  # one GPU at the per-GPU batch: the smaller batch's cost apart from the all-reduce
    run=(torchrun --standalone --nproc_per_node=1 benchmarks/train_speed.py --device $DEVICE --batch $((batch / 2))
         --steps $steps --no-profile --json $R/speed_${name}_local.json "${@:4}")
    timeout 150 "${run[@]}" --modes $MODE 2>&1 | quiet $R/speed_${name}_local.log
    pack
  fi
}
speed shipped_b${BATCH:-1024} ${STEPS:-300} ${BATCH:-1024}
DEIT=(--model deit3_small_patch16_224 --img-size 224 --patch 16 --depth 12 --embed-dim 384 --num-heads 6)
[ "${DEIT_STEPS:-120}" -gt 0 ] && speed deit3s_b${DEIT_BATCH:-512} ${DEIT_STEPS:-120} ${DEIT_BATCH:-512} "${DEIT[@]}"

T=${TAG:-}
for B in ${BATCHES:-}; do
  for NP in 1 2; do
    RUN=$R/ddp${T}_b${B}_np${NP}
    CMD="torchrun --standalone --nproc_per_node=$NP -m avex.train --dataset fashion-mnist --device cuda --steps ${TRAIN_STEPS:-400} \
--batch-size $B --lr 1e-3 --warmup 0.03 --label-smoothing 0.1 --seed 0 --eval-every 0 --save-every 0 --eval-size 2000 \
--log-every 50 --no-progress --log-json $RUN.jsonl --out /tmp/ddp_b${B}_np${NP} ${EXTRA:-}"
    echo "$CMD" > $RUN.cmd
    timeout 170 $CMD 2>&1 | grep -v -i warn | tee $RUN.log | grep "avex.train\]"
    pack
  done
done
python3 benchmarks/ddp_report.py $R --out $R --tag "$T" 2>&1 | tee $R/ddp_report.txt
cp $R/ddp*.md $R/ddp*.png "$OUT"/ 2>/dev/null
pack
