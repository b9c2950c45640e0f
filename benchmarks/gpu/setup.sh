# The set-up every job in this folder sources first:  source "$(dirname "$0")/setup.sh"
#
# A job is one device-tool call, run from the repository root with `.whl` (wheels for the GPU image's Python:
# timm, gymnasium, stable-baselines3, sb3-contrib) and `data` (the Fashion-MNIST IDX files) carried along.
# This file installs the wheels beside the image's torch, keeps the hub offline, points avex at the carried data,
# makes a fresh results folder $R and defines `pack`, which puts $R into $OUT/results.tar.gz: jobs call it after
# every stage, so that a time-out keeps what finished (and it runs once more on exit). Below: the stages that
# several jobs share.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1  # the repository root
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 AVEX_FASHION_MNIST=$PWD/data/fashion-mnist
# DEVICE=cpu: a job checked here with tiny sizes, on this machine's own packages (no wheels, no GPU).
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
  export PYTHONPATH=$PWD
else
  # Once per machine: a second job started beside the first (benchmarks/gpu/policies.sh) must not reinstall under it.
  if [ ! -f /tmp/site/.avex-wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 1
    touch /tmp/site/.avex-wheels
  fi
  export PYTHONPATH=/tmp/site:$PWD
fi
# R and PACK may be set by a caller that runs two jobs side by side in one call (benchmarks/gpu/policies.sh).
R=${R:-/tmp/results}
rm -rf $R && mkdir -p $R  # fresh per job: a warm machine keeps /tmp between calls
pack() { tar -czf "$OUT/${PACK:-results}.tar.gz" -C $R . 2>/dev/null; }
trap 'pack; echo "job done"' EXIT
if [ "$DEVICE" = cpu ]; then echo "cpu" > $R/gpu.txt; else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $R/gpu.txt; fi

# ViT-B/16 TORE episodes in bf16 (benchmarks/tore_speed.py, RESULTS.md section 3); add --mode, --K, --batch, --out.
TORE_SPEED=(python3 benchmarks/tore_speed.py --device cuda --dtype bf16 --model vit_base_patch16_224)
# Vector-env throughput (benchmarks/env_throughput.py, RESULTS.md section 4): Fashion-MNIST (add --num-envs) and
# ImageNet with ViT-S/16, random weights, on a fake 16-class folder.
ENV_FMNIST=(--device cuda --steps 36 --env-kwargs '{"dtype": "bfloat16"}')
ENV_IMAGENET=(--env AVE-ImageNet-v0 --fake-imagenet 24 --device cuda --num-envs 1024 4096 --steps 36
              --env-kwargs '{"model": "vit_small_patch16_224", "pretrained": false, "cache_images": true, "dtype": "bfloat16"}')

# The CUDA tests (pytest -k cuda) of the given test files, all by default.
cuda_tests() {
  # The whole report (short tracebacks, each failure's message whole: the sync-count test names its calls there) stays
  # in pytest_cuda_full.txt; printed: each failure's test and message (-rfE) and the counts. A fresh machine compiles
  # every Triton kernel first (minutes), hence the time-out.
  timeout ${CUDA_TESTS_TIMEOUT:-300} python3 -m pytest -q -rfE --tb=short -p no:cacheprovider "${@:-tests}" -k cuda \
    > $R/pytest_cuda_full.txt 2>&1 || echo "pytest exit status $?" >> $R/pytest_cuda_full.txt
  { grep -E "^(FAILED|ERROR) |exit status" $R/pytest_cuda_full.txt; tail -1 $R/pytest_cuda_full.txt; } \
    | cut -c1-400 | tee $R/pytest_cuda.txt
  pack
}

# The main job (`avex benchmark`: agents x K, 2000 episodes each) into $R/benchmark; extra arguments go to it.
main_job() {
  timeout ${MAIN_S:-130} python3 -m avex.cli benchmark --device $DEVICE --episodes 2000 --num-envs 1000 "$@" \
    --out $R/benchmark 2>&1 \
    | tr '\r' '\n' | grep -v "^benchmark: " | tail -40
  pack
}

# TORE at batch 256, K=0 and 12, CUDA graphs, into $R/$1.md (under the caller's AVEX_SDPA, if any).
tore_speed_b256() {
  timeout 50 "${TORE_SPEED[@]}" --mode graph --K 0 12 --batch 256 --out $R/$1.md 2>&1 | grep "graph | 256"
  pack
}

# Both envs' throughput, appended to $R/$1.md; Fashion-MNIST at the given numbers of envs (default 4096 8192 16384).
env_throughput() {
  local out=$R/$1.md envs=("${@:2}")
  [ ${#envs[@]} -gt 0 ] || envs=(4096 8192 16384)
  timeout 90 python3 benchmarks/env_throughput.py "${ENV_FMNIST[@]}" --num-envs "${envs[@]}" --out $out 2>&1 | tail -6
  pack
  timeout 90 python3 benchmarks/env_throughput.py "${ENV_IMAGENET[@]}" --out $out 2>&1 | tail -6
  pack
}

# Where an eager TORE step's time goes (benchmarks/profile_step.py, ViT-B/16, K=12, batch 256) into $R/profile_tore.md.
profile_tore() {
  timeout 40 python3 benchmarks/profile_step.py tore --device cuda --K 12 --batch 256 --out $R/profile_tore.md \
    > /dev/null 2> $R/profile_tore.err
  pack
}
