#!/usr/bin/env bash
# One device-tool call: vector-env throughput of this tree against an older one, interleaved (two rounds) on one machine.
# Make the older tree first:
#   mkdir -p runs/ab_old && git archive <rev> avex envs agents benchmarks/env_throughput.py | tar -x -C runs/ab_old
# Usage (device tool, carry .whl, data and runs/ab_old):  bash benchmarks/gpu/ab_env.sh   -> $OUT/results.tar.gz
source "$(dirname "$0")/setup.sh"
for round in 1 2; do
  for tree in new old; do
    if [ $tree = old ]; then root=$PWD/runs/ab_old; else root=$PWD; fi
    # Each tree runs its own script and package: its root, not this one, on the path.
    (cd $root && PYTHONPATH=/tmp/site:$root timeout 80 python3 benchmarks/env_throughput.py "${ENV_IMAGENET[@]}" \
        --out $R/imagenet_${tree}_$round.md 2>&1 | tail -4)
    (cd $root && PYTHONPATH=/tmp/site:$root timeout 80 python3 benchmarks/env_throughput.py "${ENV_FMNIST[@]}" \
        --num-envs 4096 16384 --out $R/fmnist_${tree}_$round.md 2>&1 | tail -3)
    pack
  done
done
