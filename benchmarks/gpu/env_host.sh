#!/usr/bin/env bash
# One device-tool call (issue 15, the host's share of a vector step): the CUDA tests of the env's synchronisation
# counts, where a vector step's time goes at 16,384 envs, and AVE-FashionMNIST-v0 env-steps/s up to 131,072 envs.
#   tests       python -m pytest -q tests/test_env_lazy.py tests/test_env_syncs.py -k cuda
#   profile     benchmarks/profile_step.py env: shipped model, bf16, $PROFILE_ENVS envs, torch_obs (host time of step(),
#               waits, kernels, copies; host functions by cProfile own time) -> $R/profile_fmnist.md
#   throughput  benchmarks/env_throughput.py: bf16, $STEPS steps at $ENVS envs -> $R/throughput_fmnist.md
#   host        benchmarks/host_step.py on the machine's CPU at 4,096 and 16,384 envs (the host's share, no GPU) ->
#               $R/host_step.md
# Everything under $OUT/results.tar.gz. Usage (device tool, carry .whl and data):  bash benchmarks/gpu/env_host.sh
# (about 3 minutes on an H200). STAGES ("tests profile throughput host"), ENVS ("4096 16384 65536 131072"),
# PROFILE_ENVS (16384), STEPS (36), DEVICE (cuda).
# DEVICE=cpu checks the job itself with tiny sizes (setup.sh installs nothing, no GPU; the CUDA tests skip), e.g.
#   PATH=/work/main/.venv/bin:$PATH OUT=/tmp/o DEVICE=cpu ENVS="4 8" PROFILE_ENVS=8 STEPS=3 HOST_ENVS="8 16" \
#     bash benchmarks/gpu/env_host.sh
source "$(dirname "$0")/setup.sh"
STAGES=${STAGES:-tests profile throughput host}
ENVS=${ENVS:-4096 16384 65536 131072}
STEPS=${STEPS:-36}
DEVICE=${DEVICE:-cuda}
FMNIST=(--device $DEVICE --env-kwargs '{"dtype": "bfloat16"}')

for stage in $STAGES; do
  case $stage in
    tests) cuda_tests tests/test_env_lazy.py tests/test_env_syncs.py ;;
    profile)
      timeout 100 python3 benchmarks/profile_step.py env "${FMNIST[@]}" --num-envs ${PROFILE_ENVS:-16384} --rows 20 \
        --out $R/profile_fmnist.md --json $R/profile.jsonl 2>$R/profile_fmnist.err | sed -n 1,16p
      pack ;;
    throughput)
      timeout 120 python3 benchmarks/env_throughput.py "${FMNIST[@]}" --steps $STEPS --num-envs $ENVS \
        --out $R/throughput_fmnist.md --json $R/throughput.jsonl 2>&1 | tail -8
      pack ;;
    host)
      timeout 60 python3 benchmarks/host_step.py --num-envs ${HOST_ENVS:-4096 16384} --episodes 1 \
        --out $R/host_step.md --json $R/host_step.jsonl 2>$R/host_step.err | sed -n 1,12p
      pack ;;
    *) echo "unknown stage $stage (tests profile throughput host)" ;;
  esac
done
pack
