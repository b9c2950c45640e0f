#!/usr/bin/env bash
# One device-tool call (issue 15: an env step at the GPU's pace): the inference layer norm over many short rows
# (avex/layer_norm.py) and the entropy kernel's launch settings (avex/entropy_attention.py), then what they buy.
#   1. the CUDA tests of tests/test_layer_norm.py, test_entropy_attention.py, test_decoder_index.py, test_env_lazy.py,
#      test_env_syncs.py and test_train_step.py -> $R/pytest_cuda.txt (the whole report, in which the sync-count test
#      names the calls that synchronise: $R/pytest_cuda_full.txt)
#   2. benchmarks/env_kernels.py: F.layer_norm against the kernel on the env's shapes (16,384 x {5, 17, 49, 197} x
#      192, the decoder's 16,384 x 197 x 128, ViT-B's 256 x 197 x 768), bf16; the entropy kernel's candidate
#      launches on the decoder's 14x14 grid at batch 16,384 and 256 (4 heads of 32); the LAUNCHES entry to adopt
#                                                                                   -> $R/env_kernels.md, .json
#   2b. entropy_ab (not in the default stages): the entropy kernel of the tree before a change (BEFORE) at its default
#      launch and this tree's over a sweep with 32-key blocks too (BATCHES: the batches, default 16384 256;
#      SWEEP: other candidates)
#                                                                                   -> $R/entropy_{before,after}.md
# TESTS: the test files of stage 1 (default: those above).
#   3. TORE episodes, ViT-B/16 bf16, CUDA graphs, K 0 4 8 12, batch 1 and 256, without and with --decoder
#                                                                        -> $R/tore_speed.md, tore_speed_decoder.md
#   3b. decoder: the decoder's entropy map alone from its row table against the whole-sequence path it replaced,
#      and the sequence gather alone, 14x14 grid, 48 observed tokens, batch 256, 1,024, 16,384  -> $R/env_decoder.md
#   4. env-steps/s of AVE-FashionMNIST-v0 (shipped model, bf16) at 4,096 and 16,384 envs -> $R/env_throughput.md
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu/env_kernels.sh   -> $OUT/results.tar.gz
# (about 4 minutes on one H200; the stages' time-outs add up to 8.5). STAGES ("tests kernels tore env") picks
# stages: STAGES="tests kernels" and STAGES="decoder tore env" split it into two calls.
# DEVICE=cpu checks the job itself with tiny sizes (setup.sh installs nothing, no GPU; the CUDA tests skip; the kernels run under
# Triton's interpreter; TORE in eager mode), e.g.
#   PATH=/work/main/.venv/bin:$PATH OUT=/tmp/o DEVICE=cpu bash benchmarks/gpu/env_kernels.sh
source "$(dirname "$0")/setup.sh"
if [ "$DEVICE" = cpu ]; then
  RUN_KERNELS=(env TRITON_INTERPRET=1 python3)  # the kernels under Triton's interpreter; TORE and the env as on CPU
  KERNELS=(--device cpu --dtype fp32 --calls 1 --reps 1 --envs 2 --tokens 5 --vitb-batch 1 --small-rows 64
           --norm-rows 16 --norm-warps 4 --grid 2 --batch 2 1 --block-m 16 --block-n 16 32 --warps 4 --stages 1)
  TORE=(python3 benchmarks/tore_speed.py --device cpu --model vit_tiny_patch16_224 --img-size 64 --glimpses 3
        --num-classes 10 --warmup 0 --mode eager --K 0 2 --batch 1 2)
  ENVS=(--device cpu --steps 3 --num-envs 2 4)
  DECODER=(--device cpu --dtype fp32 --calls 1 --reps 1 --grid 4 --batch 2 --observed 5 --decoder-embed 32)
else
  RUN_KERNELS=(python3)
  KERNELS=(--device cuda --dtype bf16)
  TORE=("${TORE_SPEED[@]}" --mode graph --K 0 4 8 12 --batch 1 256)
  ENVS=("${ENV_FMNIST[@]}" --num-envs 4096 16384)
  DECODER=(--device cuda --dtype bf16 --batch 256 1024 16384)
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee $R/versions.txt

for stage in ${STAGES:-tests kernels decoder tore env}; do
  case $stage in
    tests)
      cuda_tests ${TESTS:-tests/test_layer_norm.py tests/test_entropy_attention.py tests/test_decoder_index.py \
        tests/test_env_lazy.py tests/test_env_syncs.py tests/test_train_step.py} ;;
    decoder)
      timeout 90 "${RUN_KERNELS[@]}" benchmarks/env_kernels.py decoder "${DECODER[@]}" --out $R/env_decoder.md \
        --json $R/env_decoder.json 2>$R/env_decoder.err | grep -E "^\| [0-9]"
      pack ;;
    kernels)
      timeout 150 "${RUN_KERNELS[@]}" benchmarks/env_kernels.py layer-norm entropy "${KERNELS[@]}" --out $R/env_kernels.md \
        --json $R/env_kernels.json 2>$R/env_kernels.err | grep -E "^\| (env|decoder|ViT)|^Best|current choice|, best"
      pack ;;
    entropy_ab)
      # The entropy kernel of the tree before a change (BEFORE, default runs/before_tore: see tore_fixed.sh's header
      # for how to make it) at its default launch, then this tree's over a sweep that includes 32-key blocks.
      BEFORE=${BEFORE:-runs/before_tore}
      [ -d "$BEFORE/avex" ] || { echo "no tree before the change at $BEFORE: see tore_fixed.sh's header"; exit 2; }
      PYTHONPATH=$(cd "$BEFORE" && pwd):$PYTHONPATH timeout 60 "${RUN_KERNELS[@]}" benchmarks/env_kernels.py entropy \
        "${KERNELS[@]}" --batch ${BATCHES:-16384 256} --block-m 64 --block-n 64 --warps 4 --stages 3 --out $R/entropy_before.md \
        --json $R/entropy_before.json 2>$R/entropy_before.err | grep -E "^\| 64|current choice"
      pack
      # SWEEP: the candidates and batches (small batches: whether another BLOCK_M pays where the GPU is not filled).
      timeout 300 "${RUN_KERNELS[@]}" benchmarks/env_kernels.py entropy "${KERNELS[@]}" --batch ${BATCHES:-16384 256} ${SWEEP:---block-n 32 64 128} \
        --out $R/entropy_after.md --json $R/entropy_after.json 2>$R/entropy_after.err \
        | grep -E "^Best|current choice|, best"
      pack ;;
    tore)
      timeout 80 "${TORE[@]}" --out $R/tore_speed.md 2>&1 | grep -E "(graph|eager) \|"
      pack
      timeout 80 "${TORE[@]}" --decoder --out $R/tore_speed_decoder.md 2>&1 | grep -E "(graph|eager) \|"
      pack
      # The decoder as an env step runs it: the entropy map alone.
      timeout 80 "${TORE[@]}" --decoder entropy --out $R/tore_speed_entropy.md 2>&1 | grep -E "(graph|eager) \|"
      pack ;;
    env)
      timeout 70 python3 benchmarks/env_throughput.py "${ENVS[@]}" --out $R/env_throughput.md 2>&1 | tail -6
      pack ;;
    *) echo "unknown stage $stage (tests kernels entropy_ab decoder tore env)" ;;
  esac
done
pack
