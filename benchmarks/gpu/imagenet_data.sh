#!/usr/bin/env bash
# One device-tool call (about 4 minutes on one H200 with 16 cores): AVE-ImageNet-v0 at ImageNet sizes, default settings.
#   0. the CUDA tests of tests/test_store.py;
#   1. a synthetic ImageNet-layout folder of $FILES real JPEGs of about 500x375 (benchmarks/make_jpeg_folder.py) in /tmp;
#   2. env-steps/s WITHOUT a store (every reset decodes on the host): ViT-B/16 K=8, 1,024 envs, a short run;
#   3. `avex data prepare` of the folder, timed;
#   4. env-steps/s with the store: ViT-B/16 K=8 and ViT-S/16 (the env's deit3_small, K its default) at 1,024 and
#      4,096 envs (benchmarks/env_throughput.py's measure: random weights, pretrained=False, no cache_images);
#   5. the data path alone: ms to draw the canvases of one vector step's resets (num_envs / budget rows) and of one
#      training batch (1,024) with the store on the device, the store on the host, and decoding.
# Results: $R/imagenet_data.md and .json (also copied to $OUT) -> $OUT/results.tar.gz
# Usage (device tool, carry .whl and data):  bash benchmarks/gpu/imagenet_data.sh
# Settings: FILES (20000), WORKERS (all cores), DTYPE (bfloat16; the env's default is float32), STEPS (36), ENVS
# ("1024 4096"), DEVICE (cuda; cpu with tiny FILES and ENVS checks the job itself).
source "$(dirname "$0")/setup.sh"
FILES=${FILES:-20000} WORKERS=${WORKERS:-$(nproc)} DTYPE=${DTYPE:-bfloat16} STEPS=${STEPS:-36} DEVICE=${DEVICE:-cuda}
read -r -a ENVS <<< "${ENVS:-1024 4096}"
ROOT=/tmp/jpeg-imagenet
B=(python3 /tmp/imagenet_data_bench.py $ROOT $R/rows.jsonl)

cat > /tmp/imagenet_data_bench.py <<'EOF'
"""bench ROOT ROWS env LABEL MODEL K NUM_ENVS STEPS | data MODE | report: one measurement, one JSON line in ROWS."""
import json, os, sys, time
import numpy as np, torch
sys.path.insert(0, "benchmarks")
root, rows_file, what, *args = sys.argv[1:]
device = os.environ["DEVICE"]
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

def emit(row):
    print(json.dumps(row), flush=True)
    with open(rows_file, "a") as f:
        f.write(json.dumps(row) + "\n")

if what == "env":
    from env_throughput import measure
    label, model, k, num_envs, steps = args
    kwargs = dict(root=root, model=model, pretrained=False, dtype=os.environ["DTYPE"])
    if k != "-":
        kwargs["K"] = int(k)
    r = measure("AVE-ImageNet-v0", int(num_envs), int(steps), device, kwargs)
    emit(dict(kind="env", label=label, model=model, K=k, dtype=kwargs["dtype"], **r))
elif what == "data":  # MODE: device (the store on the GPU), host (AVEX_STORE_ON_DEVICE=0), decode (no store)
    from avex.data import imagenet_canvas
    mode = args[0]
    src = imagenet_canvas(root, "val", 224, device=device, store=mode != "decode")
    for rows, reps in ((85, 3), (1024, 0)) if mode == "decode" else ((85, 20), (341, 10), (1024, 5)):
        if reps == 0:
            break
        times = []
        for rep in range(reps + 1):  # the first draw is a warm-up (and copies the store to the GPU)
            rngs = [np.random.default_rng([rep, i]) for i in range(rows)]
            sync()
            t = time.perf_counter()
            src.sample_counting_skips(rngs)
            sync()
            times.append(time.perf_counter() - t)
        ms = 1e3 * float(np.median(times[1:]))
        emit(dict(kind="data", mode=mode, rows=rows, ms=ms, images_per_s=rows / ms * 1e3))
elif what == "report":
    rows = [json.loads(line) for line in open(rows_file)]
    extra = json.loads(args[0])
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    md = [f"## AVE-ImageNet-v0 data path, {name}, {os.environ['DTYPE']}, default env settings otherwise", "",
          f"- folder: {extra['folder']}", f"- avex data prepare: {extra['prepare']}", "",
          "| run | model | K | num_envs | ms per vector step | env-steps/s |", "|---|---|---:|---:|---:|---:|"]
    md += [f"| {r['label']} | {r['model']} | {r['K']} | {r['num_envs']} | {r['ms_per_step']:.2f} | "
           f"{r['env_steps_per_s']:,.0f} |" for r in rows if r["kind"] == "env"]
    md += ["", "Data path alone: canvases of R rows on the device, median ms per call (85 / 341: one vector step's resets "
           "at 1,024 / 4,096 envs; 1,024: a training batch):", "",
           "| source | rows | ms | images/s |", "|---|---:|---:|---:|"]
    md += [f"| {r['mode']} | {r['rows']} | {r['ms']:.2f} | {r['images_per_s']:,.0f} |" for r in rows if r["kind"] == "data"]
    open(rows_file.replace("rows.jsonl", "imagenet_data.md"), "w").write("\n".join(md) + "\n")
    json.dump(dict(**extra, rows=rows), open(rows_file.replace("rows.jsonl", "imagenet_data.json"), "w"), indent=1)
    print("\n".join(md))
EOF

export DTYPE DEVICE
[ "$DEVICE" = cpu ] || cuda_tests tests/test_store.py  # the store on the GPU and through pinned memory
rm -rf $ROOT
timeout 100 python3 benchmarks/make_jpeg_folder.py --out $ROOT --files $FILES --workers $WORKERS | tee $R/folder.txt
pack
# Without a store: every reset decodes on the host (a short run: about 0.3 s per step).
timeout 60 "${B[@]}" env "no store" vit_base_patch16_224 8 ${ENVS[0]} 8 2>&1 | grep -v -i warn
timeout 40 "${B[@]}" data decode 2>&1 | grep -v -i warn
pack
start=$(date +%s%N)
timeout 90 python3 -m avex.cli data prepare $ROOT --split val --workers $WORKERS --quiet | tee $R/prepare.txt
prep_ms=$(( ($(date +%s%N) - start) / 1000000 ))
pack
for n in "${ENVS[@]}"; do
  timeout 60 "${B[@]}" env store vit_base_patch16_224 8 $n $STEPS 2>&1 | grep -v -i warn
  timeout 60 "${B[@]}" env store deit3_small_patch16_224 - $n $STEPS 2>&1 | grep -v -i warn
  pack
done
timeout 40 "${B[@]}" data device 2>&1 | grep -v -i warn
AVEX_STORE_ON_DEVICE=0 timeout 40 "${B[@]}" data host 2>&1 | grep -v -i warn
extra=$(python3 -c "import json,sys; print(json.dumps(dict(folder=open('$R/folder.txt').read().strip(), \
prepare=open('$R/prepare.txt').read().strip() + ' (the command: %.1f s with start-up)' % (int(sys.argv[1]) / 1e3))))" \
"$prep_ms")
"${B[@]}" report "$extra"
cp $R/imagenet_data.md $R/imagenet_data.json "$OUT"/ 2>/dev/null
pack
