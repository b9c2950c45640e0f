# Sourced by the device-tool jobs (gpu_train.sh, gpu_speed.sh, gpu_sdpa.sh): the carried wheels onto the
# GPU image's Python, offline hub, the carried Fashion-MNIST, a results folder $R and `pack`, which puts
# everything in $R into $OUT/results.tar.gz (call it after each stage, so a time-out keeps what finished).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 AVEX_FASHION_MNIST=$PWD/data/fashion-mnist
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
R=/tmp/results; rm -rf $R; mkdir -p $R  # fresh per job: a warm machine keeps /tmp between calls
pack() { tar -czf $OUT/results.tar.gz -C $R . 2>/dev/null; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
