#!/usr/bin/env bash
# One device-tool call: the glimpse decoder's attention-entropy kernel (avex/entropy_attention.py). Its CUDA tests;
# the decoder alone (ViT-B/16 width, batch 256, bf16) with the kernel and with the PyTorch path it replaced
# (AVEX_ENTROPY_KERNEL=0: the materialised map, in chunks of query rows); then TORE episodes without the decoder,
# with it (kernel) and with it on the PyTorch path, CUDA graphs, on one machine.
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu/decoder.sh   -> $OUT/results.tar.gz
source "$(dirname "$0")/setup.sh"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee $R/versions.txt
cuda_tests tests/test_entropy_attention.py tests/test_attention.py tests/test_model.py

# The decoder alone: decode(recon=False) (what an env step runs) and decode() (entropy and reconstruction), per call,
# replayed as a CUDA graph; peak memory while capturing (the graph's pool), with the ViT-B model and its cache.
decoder_alone() {
  timeout 120 python3 - <<'EOF' 2>&1 | tee -a $R/decoder_alone.md
import os
import torch
import avex  # noqa: F401  (the timm import shim)
from avex.model import create_tore
from avex.platform_info import device_name

print(f"decoder alone, {device_name(torch.device('cuda'))}, AVEX_ENTROPY_KERNEL={os.environ.get('AVEX_ENTROPY_KERNEL', '1')}")
print("| grid | batch | outputs | ms per call | peak MiB |")
print("|---|---|---|---|---|")
for img in (224, 448):  # 14 x 14 and 28 x 28 patches
    tore = create_tore("vit_base_patch16_224", img_size=img).to("cuda", torch.bfloat16).eval()
    geo = tore.geometry(2)
    for batch in (1, 256):
        with torch.inference_mode():
            cache = tore.init_cache(batch, 12, 12, geo.tokens_per_glimpse)
            gen = torch.Generator().manual_seed(0)
            for t in range(12):
                a = torch.randint(0, geo.num_actions, (batch,), generator=gen).numpy()
                r, c = (torch.as_tensor(v) for v in geo.action_to_patch(a))
                pix = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=gen)
                out = tore.step(cache, pix.cuda(), geo.glimpse_coords(r, c).cuda())
            out.tokens  # the decoder's input, outside the timing
            for recon in (False, True):
                # Replayed as a CUDA graph, as tore_speed's graph mode runs a step: device time, no launch overhead.
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        tore.decode(out, recon=recon)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                with torch.cuda.graph(graph):
                    tore.decode(out, recon=recon)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                graph.replay()
                start.record()
                for _ in range(100):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / 2**20
                outputs = "entropy, recon" if recon else "entropy"
                ms = start.elapsed_time(end) / 100
                print(f"| {tore.grid[0]}x{tore.grid[1]} | {batch} | {outputs} | {ms:.3f} | {peak:.0f} |")
EOF
  pack
}
decoder_alone
AVEX_ENTROPY_KERNEL=0 decoder_alone

# TORE episodes (ViT-B/16, bf16, CUDA graphs): no decoder, the decoder on the kernel, the decoder on PyTorch.
timeout 100 "${TORE_SPEED[@]}" --mode graph --K 0 4 8 12 --batch 1 256 --out $R/tore_speed.md 2>&1 | grep "graph |"
pack
timeout 100 "${TORE_SPEED[@]}" --mode graph --K 0 4 8 12 --batch 1 256 --decoder --out $R/tore_speed_decoder.md \
    2>&1 | grep "graph |"
pack
AVEX_ENTROPY_KERNEL=0 timeout 100 "${TORE_SPEED[@]}" --mode graph --K 0 4 8 12 --batch 1 256 --decoder \
    --out $R/tore_speed_decoder_pytorch.md 2>&1 | grep "graph |"
pack
