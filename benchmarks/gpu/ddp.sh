#!/usr/bin/env bash
# One device-tool call on nvidia-h200-x2: DDP scaling of `avex train classifier` (RESULTS.md section 7). The same
# command (same global batch, steps and seed) under torchrun with 1 and with 2 processes, one GPU each, at each
# global batch; the per-step JSON logs give images/s per GPU and the two loss curves (benchmarks/ddp_report.py).
# Usage (device tool, kind nvidia-h200-x2, carry .whl and data):  bash benchmarks/gpu/ddp.sh   -> $OUT/results.tar.gz
#   BATCHES ("1024 2048"), STEPS (400), TAG (file-name tag), EXTRA (more trainer flags, e.g. --compile).
source "$(dirname "$0")/setup.sh"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off
python3 -c "import torch; print('torch', torch.__version__, 'GPUs', torch.cuda.device_count(), 'NCCL', torch.cuda.nccl.version())" \
    | tee $R/versions.txt
T=${TAG:-}
for B in ${BATCHES:-1024 2048}; do
  for NP in 1 2; do
    RUN=$R/ddp${T}_b${B}_np${NP}
    CMD="torchrun --standalone --nproc_per_node=$NP -m avex.train --dataset fashion-mnist --device cuda --steps ${STEPS:-400} \
--batch-size $B --lr 1e-3 --warmup 0.03 --label-smoothing 0.1 --seed 0 --eval-every 0 --save-every 0 --eval-size 2000 \
--log-every 50 --no-progress --log-json $RUN.jsonl --out /tmp/ddp_b${B}_np${NP} ${EXTRA:-}"
    echo "$CMD" > $RUN.cmd
    timeout 170 $CMD 2>&1 | grep -v -i warn | tee $RUN.log | grep "avex.train\]"
    pack
  done
done
