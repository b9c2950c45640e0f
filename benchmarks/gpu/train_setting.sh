#!/usr/bin/env bash
# One device-tool call: the graphed training step (benchmarks/train_speed.py, STEPS=200 steps, profiled) with one
# module-level setting of avex set to each of VALUES in turn, at each batch of BATCHES ("512 1024"), after the CUDA
# tests of TESTS (none by default). Results: $R/train_b<batch>_<value>.md, and the graphed rows side by side.
# Usage (device tool, carry .whl and data):
#   SETTING=avex.train.rows.PROGRAMS_PER_SM VALUES="0 1 2" TESTS=tests/test_train_step.py bash benchmarks/gpu/train_setting.sh
source "$(dirname "$0")/setup.sh"
: "${SETTING:?SETTING=module.NAME of the setting to vary}" "${VALUES:?VALUES=the values to try, Python literals}"
[ -n "${TESTS:-}" ] && cuda_tests $TESTS
for b in ${BATCHES:-512 1024}; do
  for v in $VALUES; do
    timeout 150 python3 -c "import importlib, runpy, sys
module, name = '$SETTING'.rsplit('.', 1)
setattr(importlib.import_module(module), name, $v)
sys.argv = ['train_speed.py', '--device', '$DEVICE', '--batch', '$b', '--steps', '${STEPS:-200}', '--modes',
            'graphed', '--rows', '30', '--out', '$R/train_b${b}_$v.md']
runpy.run_path('benchmarks/train_speed.py', run_name='__main__')" 2>&1 | grep -v -i warn \
      | grep -E "^graphed:|Error|error" | cut -c1-200 | sed "s/^/b$b $SETTING=$v: /"
    pack
  done
done
grep -H -E "^\| graphed" $R/train_*.md
