"""Can re-fitting the decoder make AME's entropy rule find the object? A controlled probe.

The shipped classifier is kept frozen (so the random agent's accuracy cannot move); only the glimpse
decoder is re-fitted, with TORE's training policy (K ~ U{0..depth}, random non-overlapping glimpses)
and the masked reconstruction loss, once per variant:

* ``refit``: the shipped decoder, trained further;
* ``fresh``: the decoder re-initialised, then trained;
* ``two_blocks``: a two-block decoder (not TORE's one block: shows whether depth matters), its last
  block starting from the shipped one.

Each variant is then played by the entropy agent (and the model by the random agent once) on the test
split, and the script prints accuracy after 12 glimpses and how often a glimpse touches ink.

    python benchmarks/decoder_probe.py --device cuda --steps 1500 --episodes 2000 --out runs/decoder_probe
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from entropy_probe import ink_patches, touches_ink  # the sibling script: its folder is on the path when run as a file

from agents import EntropyAgent, RandomAgent
from agents.evaluate import play_episodes
from avex.checkpoint import load_tore, save_tore, shipped_checkpoint
from avex.data import get_dataset
from avex.decoder import GlimpseDecoder
from avex.train import (
    cut_glimpses,
    draw_k_and_t,
    masked_recon_mse,
    n_tiles,
    sample_glimpses,
    step_rngs,
)

VARIANTS = {"refit": (1, False), "fresh": (1, True), "two_blocks": (2, False)}  # (decoder depth, re-initialised)


def refit_decoder(
    model, depth: int, fresh: bool, steps: int, batch: int, lr: float, device: torch.device, seed: int
) -> float:
    """Replace the decoder (depth, fresh or from the shipped one) and re-fit it alone.

    Returns the mean reconstruction MSE of the last 100 steps.
    """
    old = model.decoder
    dec = GlimpseDecoder(
        model.embed_dim, model.grid, model.patch, model.in_chans, old.dim, old.blocks[0].heads, depth
    ).to(device)
    if not fresh:
        state = {k: v for k, v in old.state_dict().items() if not k.startswith("blocks.")}
        dec.load_state_dict(state, strict=False)
        dec.blocks[-1].load_state_dict(old.blocks[-1].state_dict())  # the trained block is the last (entropy) block
    model.decoder = dec
    model.build_args = dict(model.build_args, decoder_depth=depth)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in dec.parameters():
        p.requires_grad_(True)
    model.eval()
    dec.train()
    geo = model.geometry(2, stride=1)
    source = get_dataset("fashion-mnist").make_source(split="train", image_size=model.img_size, device=device)
    opt = torch.optim.AdamW(dec.parameters(), lr=lr, weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    tail = []
    for step in range(steps):
        rng, gen = step_rngs(seed, step, device)
        K, T = draw_k_and_t(rng, model.depth, 12, n_tiles(geo))
        canvases, _ = source.random_batch(batch, gen)
        rows, cols = sample_glimpses(geo, batch, T, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pixels, coords, seen = cut_glimpses(geo, canvases, rows, cols)
            with torch.no_grad():
                out = model.forward_glimpses(pixels, coords, K)
                _ = out.tokens  # materialise the normed tokens without grad
            recon, _ = model.decode(out, entropy=False)
        loss = masked_recon_mse(model, recon, canvases, seen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= steps - 100:
            tail.append(loss.item())
    dec.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return float(np.mean(tail)) if tail else float("nan")


def ink_hits(venv, agent, seed: int) -> list[float]:
    """Per step, the share of envs whose chosen glimpse touches ink (object or clutter)."""
    env = venv.unwrapped
    obs, _ = venv.reset(seed=seed)
    ink = ink_patches(env)  # the canvases stay until the autoreset after the last step
    hits = []
    for _ in range(env.budget):
        a = agent.act(obs, env.action_masks())
        hits.append(touches_ink(ink, env.geometry, a))
        obs, *_ = venv.step(a)
    return hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--episodes", type=int, default=2000)
    ap.add_argument("--K", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/decoder_probe")
    args = ap.parse_args()
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results = {}
    n_envs = min(args.episodes, 1000)

    def play(ckpt: str, agent_name: str) -> dict:
        venv = gym.make_vec(
            "AVE-FashionMNIST-v0", num_envs=n_envs, split="test", K=args.K, device=args.device, checkpoint=ckpt
        )
        agent = RandomAgent(args.seed) if agent_name == "random" else EntropyAgent.for_env(venv)
        stats = play_episodes(venv, agent, args.episodes, args.seed)
        hits = ink_hits(venv, agent, args.seed + 1)
        venv.close()
        return dict(
            acc12=100 * float(stats.correct[:, -1].mean()),
            acc=[round(100 * float(v), 2) for v in stats.correct.mean(0)],
            ink=[round(100 * h, 1) for h in hits],
        )

    shipped = str(shipped_checkpoint("fashion-mnist"))
    results["random"] = play(shipped, "random")
    results["shipped"] = play(shipped, "entropy")
    print(json.dumps({k: (v["acc12"], v["ink"][:6]) for k, v in results.items()}), flush=True)
    for name in args.variants:
        depth, fresh = VARIANTS[name]
        t0 = time.perf_counter()
        model = load_tore(shipped, device=device)
        mse = refit_decoder(model, depth, fresh, args.steps, args.batch, args.lr, device, args.seed)
        path = save_tore(
            model, out / f"tore_{name}", meta=json.loads(Path(shipped).with_suffix(".json").read_text())["meta"]
        )
        r = play(str(path), "entropy")
        r.update(mse=mse, seconds=round(time.perf_counter() - t0, 1))
        results[name] = r
        print(name, json.dumps({k: r[k] for k in ("acc12", "mse", "seconds")}), "ink", r["ink"], flush=True)
    (out / "decoder_probe.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| decoder | entropy agent acc@12 | ink touched, steps 1-12 (%) | refit MSE |", "|---|---|---|---|"]
    for k, v in results.items():
        lines.append(
            f"| {k} | {v['acc12']:.1f} | {' '.join(f'{h:.0f}' for h in v['ink'])} | {v.get('mse', float('nan')):.4f} |"
        )
    (out / "decoder_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
