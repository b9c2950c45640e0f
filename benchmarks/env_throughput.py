"""Throughput of the batched vector env: env-steps per second, everything included.

One env-step = glimpse cut on the model's device, iterator + cache + aggregator + decoder (entropy map),
reward, observation, info, and same-step autoreset with new canvases every ``budget`` steps. Actions are
valid random positions drawn once per env (a permutation, so no repeat) and are not timed.

    python benchmarks/env_throughput.py --env AVE-FashionMNIST-v0 --device cuda --num-envs 1024 4096 16384
    python benchmarks/env_throughput.py --env AVE-ImageNet-v0 --fake-imagenet 32 --device cuda \
        --env-kwargs '{"model": "vit_small_patch16_224", "pretrained": false, "cache_images": true}'
    python benchmarks/env_throughput.py --single --device cpu     # per-step latency of one env
    python benchmarks/env_throughput.py --device cuda --obs-keys probs cls entropy visited step  # PPO's keys only

``--fake-imagenet N`` writes N random JPEGs for each of 16 real WordNet ids to a temporary folder (no
ImageNet here; random weights and random images time the same work).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from avex.platform_info import device_name, synchronize


def fake_imagenet(per_class: int, size: int = 256) -> str:
    """A temporary ImageNet-layout folder (val/<wnid>/*.JPEG) of random images; returns its root."""
    from PIL import Image

    from avex.data.imagenet import imagenet_classes

    wnids = imagenet_classes()[0][:16]
    root = Path(tempfile.mkdtemp(prefix="fake-imagenet-"))
    rng = np.random.default_rng(0)
    for wnid in wnids:
        folder = root / "val" / wnid
        folder.mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                folder / f"{j}.JPEG", quality=90
            )
    return str(root)


def measure(env_id: str, num_envs: int, steps: int, device: str, env_kwargs: dict) -> dict:
    """env-steps/s of the native vector env with ``num_envs`` envs over ``steps`` timed steps."""
    venv = gym.make_vec(env_id, num_envs=num_envs, device=device, torch_obs=device.startswith("cuda"), **env_kwargs)
    env = venv.unwrapped
    rng = np.random.default_rng(0)
    budget = env.budget
    plan = np.argsort(rng.random((num_envs, env.geometry.num_actions)), axis=1)[:, :budget]  # no repeats
    venv.reset(seed=0)
    t = 0
    for _ in range(2 * budget):  # warm-up: two episodes, autoresets included
        venv.step(plan[:, t % budget])
        t += 1
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        venv.step(plan[:, t % budget])
        t += 1
    synchronize(device)
    seconds = time.perf_counter() - start
    venv.close()
    return dict(
        num_envs=num_envs,
        steps=steps,
        seconds=seconds,
        env_steps_per_s=num_envs * steps / seconds,
        ms_per_step=1e3 * seconds / steps,
    )


def single_latency(env_id: str, steps: int, device: str, env_kwargs: dict) -> dict:
    """Median wall time of one ``step`` of a single env (the agent's time excluded)."""
    env = gym.make(env_id, device=device, **env_kwargs)
    rng = np.random.default_rng(0)
    times = []
    env.reset(seed=0)
    for i in range(steps + env.unwrapped.budget):
        if i % env.unwrapped.budget == 0:
            env.reset()
        mask = env.unwrapped.action_masks()
        action = int(rng.choice(np.flatnonzero(mask)))
        t0 = time.perf_counter()
        env.step(action)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    times = np.array(times[env.unwrapped.budget :]) * 1e3  # first episode is warm-up
    return dict(median_ms=float(np.median(times)), p90_ms=float(np.percentile(times, 90)), steps=len(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="AVE-FashionMNIST-v0")
    p.add_argument("--num-envs", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--device", default="cpu")
    p.add_argument("--env-kwargs", default="{}")
    p.add_argument(
        "--fake-imagenet", type=int, default=0, help="images per class of a fake ImageNet folder (16 classes)"
    )
    p.add_argument("--single", action="store_true", help="per-step latency of one env instead")
    p.add_argument("--obs-keys", nargs="+", default=None, help="the env's obs_keys (default: the env's own, all)")
    p.add_argument("--out", default=None, help="append a Markdown section to this file")
    p.add_argument("--json", default=None, help="append each measurement as one JSON line to this file")
    args = p.parse_args()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    kwargs = json.loads(args.env_kwargs)
    if args.obs_keys:
        kwargs["obs_keys"] = args.obs_keys
    if args.fake_imagenet:
        kwargs["root"] = fake_imagenet(args.fake_imagenet)
    command = "python benchmarks/env_throughput.py " + " ".join(sys.argv[1:])
    header = [
        f"### {args.env} on {device_name(args.device)}",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}",
        "",
    ]
    if args.single:
        r = single_latency(args.env, args.steps, args.device, kwargs)
        lines = header + [
            f"single env, one step: median {r['median_ms']:.2f} ms, p90 {r['p90_ms']:.2f} ms over {r['steps']} steps",
            "",
        ]
    else:
        lines = header + ["| num_envs | ms per vector step | env-steps/s |", "|---:|---:|---:|"]
        for n in args.num_envs:
            r = measure(args.env, n, args.steps, args.device, kwargs)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(dict(r, env=args.env, device=args.device, env_kwargs=kwargs)) + "\n")
            lines.append(f"| {n} | {r['ms_per_step']:.2f} | {r['env_steps_per_s']:,.0f} |")
            print(lines[-1], flush=True)
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
