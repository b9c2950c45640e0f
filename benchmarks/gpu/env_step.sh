#!/usr/bin/env bash
# One device-tool call: where a vector step's time goes, and env-steps/s, for the tree before a change and this one on
# the same machine (issue 15, items 2 and 5). This tree's scripts measure both trees: each run puts its tree first on
# PYTHONPATH (the scripts use only the Gymnasium API, so they run on either).
#   tests     the CUDA tests of tests/test_env_lazy.py (synchronisations per vector step, counted)
#   profile   benchmarks/profile_step.py env: AVE-FashionMNIST-v0 (shipped model, bf16) at $PROFILE_FMNIST envs and
#             AVE-ImageNet-v0 with ViT-B/16, K=8 (random weights, bf16, a fake 16-class folder of cached images) at
#             $PROFILE_IMAGENET envs: a table of one vector step (host time, waits, kernels, copies), both trees
#   fmnist    env-steps/s of AVE-FashionMNIST-v0 at $FMNIST_ENVS envs, both trees; then this tree with PPO's
#             observation keys only (no canvas) at the largest three
#   imagenet  env-steps/s of AVE-ImageNet-v0, ViT-B/16 K=8, at $IMAGENET_ENVS envs, both trees
#   single    the single default env's step on the GPU (batch 1), both trees alternating (benchmarks/ab_step.py)
# Then summary.md / summary.json: before and after side by side. Everything under $OUT/results.tar.gz.
#
# Make the tree before the change first (runs/ is ignored by git, so it travels with carry): this tree's avex and agents
# with envs/ as it was before issue 15's items 2 and 5 (the parent of b5ada68), so that only the env differs:
#   rm -rf runs/before && mkdir -p runs/before && git archive HEAD avex agents | tar -x -C runs/before \
#     && git archive b5ada68^ envs | tar -x -C runs/before
# Usage (device tool, carry .whl, data and runs/before):  bash benchmarks/gpu/env_step.sh   (about 7 minutes on an H200;
# two calls keep well inside one call's 10: STAGES="tests profile single", then STAGES="fmnist imagenet")
#   BEFORE (runs/before); STAGES ("tests profile fmnist imagenet single"); FMNIST_ENVS ("1 4096 16384 65536 131072");
#   IMAGENET_ENVS ("1024 4096"); PROFILE_FMNIST (16384); PROFILE_IMAGENET (1024); STEPS (36); DEVICE (cuda).
# DEVICE=cpu checks the job itself with tiny sizes (setup.sh installs nothing, no GPU; the CUDA tests skip), e.g.
#   PATH=.venv/bin:$PATH OUT=/tmp/o DEVICE=cpu BEFORE=/tmp/before FMNIST_ENVS="1 8" IMAGENET_ENVS=2 \
#     PROFILE_FMNIST=8 PROFILE_IMAGENET=2 STEPS=3 bash benchmarks/gpu/env_step.sh
source "$(dirname "$0")/setup.sh"
BEFORE=${BEFORE:-runs/before}
[ -d "$BEFORE/envs" ] && [ -d "$BEFORE/avex" ] || { echo "no tree before the change at $BEFORE: see this file's header"; exit 2; }
declare -A TREE=([before]=$(cd "$BEFORE" && pwd) [after]=$PWD)
STAGES=${STAGES:-tests profile fmnist imagenet single}
FMNIST_ENVS=${FMNIST_ENVS:-1 4096 16384 65536 131072}
IMAGENET_ENVS=${IMAGENET_ENVS:-1024 4096}
STEPS=${STEPS:-36}
DEVICE=${DEVICE:-cuda}
FMNIST=(--device $DEVICE --env-kwargs '{"dtype": "bfloat16"}')
VITB='{"model": "vit_base_patch16_224", "pretrained": false, "K": 8, "cache_images": true, "dtype": "bfloat16"}'
IMAGENET=(--env AVE-ImageNet-v0 --fake-imagenet 24 --device $DEVICE --env-kwargs "$VITB")
BELIEF_KEYS=(--obs-keys probs cls entropy visited step)  # agents/belief.py's BELIEF_KEYS: what the PPO policy reads

# on TREE CMD...: run CMD with TREE's avex, envs and agents first on the path (this tree's scripts, wheels next).
on() { local tree=${TREE[$1]}; shift; PYTHONPATH=$tree:/tmp/site:$PWD "$@"; }

for stage in $STAGES; do
  case $stage in
    tests) cuda_tests tests/test_env_lazy.py ;;
    profile)
      for tree in before after; do
        on $tree timeout 150 python3 benchmarks/profile_step.py env "${FMNIST[@]}" --num-envs ${PROFILE_FMNIST:-16384} \
          --rows 15 --out $R/profile_fmnist_$tree.md --json $R/profile.jsonl 2>$R/profile_fmnist_$tree.err | sed -n 1,16p
        pack
        on $tree timeout 200 python3 benchmarks/profile_step.py env "${IMAGENET[@]}" --num-envs ${PROFILE_IMAGENET:-1024} \
          --rows 15 --out $R/profile_imagenet_$tree.md --json $R/profile.jsonl 2>$R/profile_imagenet_$tree.err | sed -n 1,16p
        pack
      done ;;
    fmnist)
      for tree in before after; do
        on $tree timeout 200 python3 benchmarks/env_throughput.py "${FMNIST[@]}" --steps $STEPS --num-envs $FMNIST_ENVS \
          --out $R/throughput_fmnist_$tree.md --json $R/throughput_$tree.jsonl 2>&1 | tail -8
        pack
      done
      big=$(echo $FMNIST_ENVS | tr ' ' '\n' | tail -3 | tr '\n' ' ')
      on after timeout 150 python3 benchmarks/env_throughput.py "${FMNIST[@]}" "${BELIEF_KEYS[@]}" --steps $STEPS \
        --num-envs $big --out $R/throughput_fmnist_after_belief_keys.md --json $R/throughput_after_belief_keys.jsonl \
        2>&1 | tail -6
      pack ;;
    imagenet)
      for tree in before after; do
        on $tree timeout 200 python3 benchmarks/env_throughput.py "${IMAGENET[@]}" --steps $STEPS \
          --num-envs $IMAGENET_ENVS --out $R/throughput_imagenet_$tree.md --json $R/throughput_$tree.jsonl 2>&1 | tail -5
        pack
      done ;;
    single)
      timeout 150 python3 benchmarks/ab_step.py --before ${TREE[before]} --device $DEVICE --restarts 2 --rounds 6 --steps 48 \
        --out $R/single_cuda.md 2>&1 | tail -8
      pack ;;
    *) echo "unknown stage $stage (tests profile fmnist imagenet single)" ;;
  esac
done

# Before and after side by side, from the JSON lines above.
python3 - $R <<'EOF'
import json, sys
from pathlib import Path

R = Path(sys.argv[1])
def lines(name):
    path = R / name
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
rows, out = [], {"throughput": [], "profile": []}
speed = {t: {(r["env"], r["num_envs"]): r for r in lines(f"throughput_{t}.jsonl")} for t in ("before", "after")}
belief = {(r["env"], r["num_envs"]): r for r in lines("throughput_after_belief_keys.jsonl")}
rows += ["| env | num_envs | before env-steps/s | after | after / before | after, PPO's keys only |", "|---|---:|---:|---:|---:|---:|"]
for key in sorted(set(speed["before"]) | set(speed["after"])):
    b, a, k = speed["before"].get(key), speed["after"].get(key), belief.get(key)
    fmt = lambda r: f"{r['env_steps_per_s']:,.0f}" if r else "-"
    ratio = f"{a['env_steps_per_s'] / b['env_steps_per_s']:.2f}" if a and b else "-"
    rows.append(f"| {key[0]} | {key[1]:,} | {fmt(b)} | {fmt(a)} | {ratio} | {fmt(k)} |")
    out["throughput"].append(dict(env=key[0], num_envs=key[1], before=b, after=a, after_belief_keys=k))
rows += ["", "| profile | tree | ms per step | syncs per episode | plain step: host ms, waits, kernels, H2D (pageable), D2H |",
         "|---|---|---:|---:|---|"]
for r in lines("profile.jsonl"):
    tree = "after" if Path(r["tree"]).resolve() == Path.cwd().resolve() else "before"
    p = r["plain_step"]
    rows.append(
        f"| {r['env']} {r['num_envs']:,} | {tree} | {r['ms_per_step']:.2f} | {r['syncs_per_episode']} | "
        f"{p.get('host_ms', 0):.2f}, {p.get('syncs', 0):.0f}, {p.get('kernels', 0):.0f}, "
        f"{p.get('h2d', 0):.0f} ({p.get('pageable', 0):.0f}), {p.get('d2h', 0):.0f} |"
    )
    out["profile"].append(dict(r, which=tree))
(R / "summary.md").write_text("\n".join(rows) + "\n")
(R / "summary.json").write_text(json.dumps(out, indent=1, default=str))
print("\n".join(rows))
EOF
pack
