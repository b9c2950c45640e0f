#!/usr/bin/env bash
# One device-tool call: vector-env throughput of this tree against an older one, interleaved on one lease.
# Make the older tree first:  mkdir -p runs/ab_old && git archive <rev> avex envs agents benchmarks/env_throughput.py | tar -x -C runs/ab_old
# Usage (device tool, carry .whl, data and runs/ab_old):  bash benchmarks/gpu_ab_env.sh   -> $OUT/results.tar.gz
source benchmarks/gpu_setup.sh
cat $R/gpu.txt
IMNET=(--env AVE-ImageNet-v0 --fake-imagenet 24 --device cuda --num-envs 1024 4096 --steps 36
       --env-kwargs '{"model": "vit_small_patch16_224", "pretrained": false, "cache_images": true, "dtype": "bfloat16"}')
FMNIST=(--device cuda --num-envs 4096 16384 --steps 36 --env-kwargs '{"dtype": "bfloat16"}')
for round in 1 2; do
  for tree in new old; do
    if [ $tree = old ]; then root=$PWD/runs/ab_old; else root=$PWD; fi
    # Each tree's own script puts its own root first on sys.path.
    (cd $root && PYTHONPATH=/tmp/site:$root timeout 80 python3 benchmarks/env_throughput.py "${IMNET[@]}" --out $R/imagenet_${tree}_$round.md 2>&1 | tail -4)
    (cd $root && PYTHONPATH=/tmp/site:$root timeout 80 python3 benchmarks/env_throughput.py "${FMNIST[@]}" --out $R/fmnist_${tree}_$round.md 2>&1 | tail -3)
    pack
  done
done
echo "job done"
