#!/usr/bin/env python
"""TORE against full recomputation: per-episode time of T sequential glimpse steps, measured in one run.

Every configuration runs the model's own code, ``TOREViT.step`` on a preallocated ``TokenCache``; one
step is: embed the glimpse, iterator ``blocks[:K]``, write the cache, aggregator ``blocks[K:]`` ->
norm -> head (and, with ``--decoder``, the glimpse decoder). K=0 of the same code is full
recomputation over everything revealed so far, so ratios K=0 / K compare like with like.

Modes:
  eager    plain Python calls of ``model.step``.
  graph    CUDA only: one CUDA graph per step index t (shapes differ per t) per (K, batch), captured
           around ``model.step`` with static input buffers for the glimpse pixels and coordinates;
           an episode is the T graphs replayed in order.
  compile  regional ``torch.compile`` of every ViT block (``dynamic=True``: one compiled block serves
           all sequence lengths), then on CUDA the same per-step CUDA graphs as ``graph``.

Timed region: the T steps of one episode only (CUDA events on CUDA, ``time.perf_counter`` on CPU;
the device is synchronised before each episode). The cache reset is outside it: eager/CPU calls
``model.reset_cache``; replayed graphs need no device-side reset at all, because step 0 overwrites
the prefix mean (weight 0 on the old value) and every token slot is written before it is read, so
only the host-side counts are zeroed. Input glimpses are random uint8 canvases cut by
``GlimpseGeometry`` at random positions, different per step and rotated between episodes.

Before timing, each (mode, K, batch) is checked: the logits after every step t (graph replays or
eager steps) must equal ``model.forward_glimpses`` (eager, single shot) on the same first t glimpses,
to 1e-4 relative (fp32) or 3e-2 (bf16), as ||a - b|| / ||b||; the run aborts otherwise.

FLOPs come from :mod:`avex.flops` (2 x multiply-accumulates; the empty pass is not part of the
episode). Run ``--help`` for options; ``run_benchmark`` is the library entry point.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avex.flops import ViTDims, episode_flops
from avex.model import create_tore
from avex.platform_info import device_name, synchronize

__all__ = ["run_benchmark", "format_markdown", "main"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}
MODES = ("eager", "graph", "compile")
TARGET_WALL_OVER_FLOP = 1 / 1.5  # wall-time ratio >= FLOP ratio / 1.5 (batch >= 256)
TARGET_STEP_MS_B1 = 1.0  # <= 1 ms per step at batch 1 (GPU)


# --------------------------------------------------------------------------------------------- inputs
def make_inputs(model, geo, batch: int, glimpses: int, sets: int, seed: int, device: torch.device):
    """Random glimpse episodes: ``sets`` x (pixels uint8 [T, B, C, s, s], coords int64 [T, B, G, 2]).

    Random uint8 canvases (never zeros), cut at random top-left patches (overlaps allowed, as in AME)
    by the geometry layer; every step and every set differs.
    """
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    h, w = model.img_size
    out = []
    for _ in range(sets):
        canv = torch.randint(0, 256, (batch, h, w, model.in_chans), generator=gen, dtype=torch.uint8)
        pix, coords = [], []
        for _t in range(glimpses):
            rows, cols = (torch.as_tensor(v) for v in geo.action_to_patch(rng.integers(0, geo.num_actions, size=batch)))
            pix.append(geo.cut(canv, rows, cols))
            coords.append(geo.glimpse_coords(rows, cols))
        out.append((torch.stack(pix).contiguous().to(device), torch.stack(coords).contiguous().to(device)))
    return out


# How the report names --decoder's choice.
_DECODER_WORDS = {
    None: "not run",
    "both": "included (entropy map and reconstruction)",
    "entropy": "the entropy map only (what an env step runs)",
}


# ------------------------------------------------------------------------------------------ episodes
class EagerEpisode:
    """T plain ``model.step`` calls on one preallocated cache."""

    def __init__(self, model, cache, glimpses: int, decoder: str | None, inputs) -> None:
        self.model, self.cache, self.T, self.decoder = model, cache, glimpses, decoder
        self.pix, self.coords = inputs[0]

    def load(self, inputs) -> None:
        self.pix, self.coords = inputs

    def reset(self) -> None:
        self.model.reset_cache(self.cache)

    def run(self, mark: Callable[[], None] | None = None) -> list[torch.Tensor]:
        logits = []
        for t in range(self.T):
            out = self.model.step(self.cache, self.pix[t], self.coords[t])
            if self.decoder:
                self.model.decode(out, recon=self.decoder != "entropy")
            logits.append(out.logits)
            if mark is not None:
                mark()
        return logits


class GraphEpisode:
    """One CUDA graph per step index t, replayed in order; static input and output buffers.

    All T graphs share one memory pool (safe: they are always replayed in capture order, never
    concurrently). ``emulate=True`` (CPU self-test only) records the step instead and re-runs it on
    replay, copying into the static outputs: it checks this class's buffer logic, not speed.

    ``cache`` may be a list of n caches that split the batch in n equal parts (``--streams n``): each
    captured step then forks into n CUDA streams, one part each, and joins before the logits are
    concatenated; with ``emulate`` the parts run one after another.
    """

    def __init__(self, model, cache, glimpses: int, decoder: str | None, inputs, emulate: bool = False) -> None:
        self.model, self.T, self.decoder, self.emulate = model, glimpses, decoder, emulate
        self.caches = cache if isinstance(cache, list) else [cache]
        n, rows = len(self.caches), sum(c.batch_size for c in self.caches)
        self.parts = [slice(i * rows // n, (i + 1) * rows // n) for i in range(n)]
        self.streams = [torch.cuda.Stream() for _ in range(n)] if n > 1 and not emulate else []
        pix, coords = inputs[0]
        self.pix = pix.clone()  # static inputs: [T, B, ...], graph t reads slice t
        self.coords = coords.clone()
        self.graphs: list[Any] = []
        self.outputs: list[torch.Tensor] = []
        self._capture()

    def _part(self, i: int, t: int) -> torch.Tensor:
        part = self.parts[i]
        out = self.model.step(self.caches[i], self.pix[t, part], self.coords[t, part])
        if self.decoder:
            self.model.decode(out, recon=self.decoder != "entropy")  # its outputs stay in the graph's pool
        return out.logits

    def _step(self, t: int) -> torch.Tensor:
        if len(self.caches) == 1:
            return self._part(0, t)
        if not self.streams:
            return torch.cat([self._part(i, t) for i in range(len(self.caches))])
        here, logits = torch.cuda.current_stream(), []
        for i, stream in enumerate(self.streams):
            stream.wait_stream(here)
            with torch.cuda.stream(stream):
                logits.append(self._part(i, t))
        for stream in self.streams:
            here.wait_stream(stream)
        return torch.cat(logits)

    def _set_counts(self, t: int) -> None:
        for c in self.caches:
            c.counts[:] = t  # host-side: decides the static slices a graph writes and reads

    def _capture(self) -> None:
        if self.emulate:
            for t in range(self.T):
                self._set_counts(t)
                self.outputs.append(self._step(t).clone())
                self.graphs.append(t)
            self._set_counts(0)
            return
        # Warm-up on a side stream (cuBLAS/cuDNN handles and algorithm choice, allocator, Triton).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                for c in self.caches:
                    self.model.reset_cache(c)
                for t in range(self.T):
                    self._step(t)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        pool = None
        for t in range(self.T):
            self._set_counts(t)
            g = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(g, pool=pool):
                    logits = self._step(t)
            except Exception as err:
                raise RuntimeError(
                    f"CUDA graph capture of step t={t} (K={self.caches[0].K}, "
                    f"batch={self.parts[-1].stop}) failed: {err}"
                ) from err
            pool = g.pool()
            self.graphs.append(g)
            self.outputs.append(logits)
        self._set_counts(0)

    def load(self, inputs) -> None:
        self.pix.copy_(inputs[0])
        self.coords.copy_(inputs[1])

    def reset(self) -> None:
        self._set_counts(0)  # host only; see the module docstring

    def run(self, mark: Callable[[], None] | None = None) -> list[torch.Tensor]:
        for t, g in enumerate(self.graphs):
            if self.emulate:
                self._set_counts(t)
                self.outputs[t].copy_(self._step(t))
            else:
                g.replay()
            if mark is not None:
                mark()
        self._set_counts(self.T)
        return self.outputs


# ------------------------------------------------------------------------------------------- helpers
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; NaN anywhere gives inf."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def device_description(device: torch.device) -> str:
    """avex.platform_info.device_name, plus SMs, memory and CUDA version on a GPU."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        memory = f"{p.total_memory / 2**30:.0f} GiB"
        return f"{device_name(device)} ({p.multi_processor_count} SMs, {memory}), CUDA {torch.version.cuda}"
    return device_name(device)


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        return None


def _versions() -> str:
    try:
        import timm

        tv = timm.__version__
    except Exception:  # pragma: no cover
        tv = "?"
    return f"torch {torch.__version__}, timm {tv}, Python {platform.python_version()}"


def _compile_blocks(model) -> None:
    """Regional compilation: each ViT block compiled (one compiled graph shared by all blocks)."""
    import torch._dynamo as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
    if hasattr(dynamo.config, "accumulated_recompile_limit"):
        dynamo.config.accumulated_recompile_limit = max(dynamo.config.accumulated_recompile_limit, 1024)
    for blk in model.vit.blocks:
        blk.compile(dynamic=True)


class _Clock:
    """Marks on the device timeline (CUDA events, created ahead) or the host clock (CPU)."""

    def __init__(self, device: torch.device, marks: int) -> None:
        self.cuda = device.type == "cuda"
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(marks)] if self.cuda else []
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            ev = self.events[len(self.marks)]
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


# ------------------------------------------------------------------------------------------ benchmark
def run_benchmark(
    model: str = "vit_base_patch16_224",
    *,
    img_size: int = 224,
    patch: int = 16,
    glimpse: int = 2,
    glimpses: int = 12,
    Ks: tuple[int, ...] | list[int] = (0, 4, 8, 12),
    batches: tuple[int, ...] | list[int] = (1, 256),
    device: str | None = None,
    dtype: str | None = None,
    modes: tuple[str, ...] | list[str] | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    decoder: bool | str | None = False,
    num_classes: int = 1000,
    seed: int = 0,
    sets: int = 3,
    sync_each_step: bool = False,
    streams: int = 1,
    tol: float | None = None,
    log: Callable[[str], None] = print,
    _emulate_graphs: bool = False,
) -> list[dict]:
    """Time T-step episodes of TORE at every (mode, K, batch); returns one dict per configuration.

    Each dict holds the configuration, ``episode_ms`` (median), ``step_ms`` (episode / T),
    ``step_ms_worst`` (the slowest step index, by its median), ``step_ms_by_t``, the raw
    ``episode_ms_all``, ``gflop_per_image`` and ``flop_ratio`` / ``wall_ratio`` (K=0 over this K, same
    mode and batch), ``wall_over_flop``, ``tflops`` achieved, ``check_rel_err`` (and, for bf16,
    ``check_rel_err_vs_fp32``) or ``error`` when the configuration could not run.
    K=0 is always measured (added if missing): it is the reference of every ratio. ``streams`` > 1 (graph
    modes): each step's batch split over that many concurrent CUDA streams inside its graph.
    """
    decoder = {False: None, True: "both"}.get(decoder, decoder)  # type: ignore[arg-type]
    if decoder not in (None, "both", "entropy"):
        raise ValueError(f"decoder must be False, True, 'both' or 'entropy', got {decoder!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    dtype = dtype or ("bf16" if dev.type == "cuda" else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    modes = list(modes or (["graph"] if dev.type == "cuda" else ["eager"]))
    for m in modes:
        if m not in MODES:
            raise ValueError(f"mode must be among {MODES}, got {m!r}")
        if m == "graph" and dev.type != "cuda" and not _emulate_graphs:
            raise ValueError("--mode graph needs --device cuda (CUDA graphs); use eager or compile on CPU")
    modes = [m for m in MODES if m in modes]  # compile last: it compiles the blocks in place
    if streams < 1 or any(b % streams for b in batches):
        raise ValueError(f"--streams {streams} must be at least 1 and divide every --batch {list(batches)}")
    if streams > 1 and ("eager" in modes or (dev.type != "cuda" and not _emulate_graphs)):
        raise ValueError(
            f"--streams {streams} splits a captured step: use --mode graph or compile on --device cuda, not {modes}"
        )
    repeats = repeats or (30 if dev.type == "cuda" else 10)
    warmup = 3 if warmup is None and dev.type == "cuda" else (1 if warmup is None else warmup)
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # Built outside inference mode (plain parameters, as torch.compile expects); run inside it.
    tore = create_tore(
        model, img_size=img_size, patch_size=patch, num_classes=num_classes, decoder_dim=128 if decoder else 0
    ).eval()
    tore.requires_grad_(False)
    for blk in tore.vit.blocks:
        blk.attn.fused_attn = True  # SDPA (flash / memory-efficient kernels on CUDA)
    ref32 = copy.deepcopy(tore).to(dev) if dtype != "fp32" else None
    # bf16: the whole model in bf16 (no autocast: no per-op cast kernels; pixel normalisation still
    # runs in fp32 and is cast once before the patch projection).
    tore = tore.to(device=dev, dtype=DTYPES[dtype])
    Ks = sorted({0, *(tore.check_k(k) for k in Ks)})
    dims = ViTDims.of(tore)
    geo = tore.geometry(glimpse)
    G, T = geo.tokens_per_glimpse, glimpses
    log(
        f"# {model} {img_size}px patch {patch}, {T} glimpses of {glimpse}x{glimpse} patches, {dtype}, "
        f"on {device_description(dev)}"
    )
    log(
        f"# modes {modes}, K {Ks}, batches {list(batches)}, repeats {repeats}, warm-up {warmup}, "
        f"decoder {decoder}; {_versions()}"
    )

    results: list[dict] = []
    for mode in modes:
        if mode == "compile":
            _compile_blocks(tore)
        for batch in batches:
            inputs = make_inputs(tore, geo, batch, T, sets, seed + batch, dev)
            rows, episodes = {}, {}
            for K in Ks:  # set up (capture) and check every K first ...
                rows[K] = dict(
                    model=model,
                    mode=mode,
                    device=dev.type,
                    dtype=dtype,
                    batch=batch,
                    K=K,
                    glimpses=T,
                    tokens_per_glimpse=G,
                    decoder=decoder,
                    streams=streams,
                    repeats=repeats,
                    warmup=warmup,
                )
                t0 = time.perf_counter()
                try:
                    episodes[K], info = _setup_and_check(
                        tore,
                        ref32,
                        inputs,
                        mode,
                        dev,
                        dtype,
                        batch,
                        K,
                        T,
                        G,
                        decoder,
                        streams,
                        _emulate_graphs,
                        tol or TOLERANCE[dtype],
                    )
                    rows[K].update(info)
                    log(
                        f"  {mode:7s} b={batch:<4d} K={K:<2d} ready in {time.perf_counter() - t0:.1f} s, "
                        f"check rel err {info['check_rel_err']:.1e}"
                        + (f" (vs fp32 {info['check_rel_err_vs_fp32']:.1e})" if "check_rel_err_vs_fp32" in info else "")
                    )
                except _CheckFailed:
                    raise
                except Exception as err:  # keep going: one broken configuration should not lose the others
                    rows[K]["error"] = f"{type(err).__name__}: {err}"
                    log(f"!! {mode} K={K} batch={batch}: {rows[K]['error']}")
                    log(traceback.format_exc())
            # ... then time them interleaved (K0, K1, ..., K0, K1, ...): drifts in clocks or background
            # load touch every K alike, so the ratios compare like with like.
            timings = _time_interleaved(episodes, inputs, dev, T, repeats, warmup, sync_each_step)
            for K in Ks:
                row = rows[K]
                if K in timings:
                    row.update(_summarise(timings[K], dims, batch, K, T, G, decoder))
                    log(
                        f"  {mode:7s} b={batch:<4d} K={K:<2d} {row['episode_ms']:9.3f} ms/episode "
                        f"{row['step_ms']:8.3f} ms/step "
                        f"(worst t {row['step_ms_worst']:.3f})"
                    )
                results.append(row)
            del episodes, timings
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    _add_ratios(results)
    return results


class _CheckFailed(RuntimeError):
    pass


def _setup_and_check(tore, ref32, inputs, mode, dev, dtype, batch, K, T, G, decoder, streams, emulate, tol):
    """Build the episode runner for one (mode, K, batch) and check its logits at every step."""
    with torch.inference_mode():
        caches = [tore.init_cache(batch // streams, T, K, G) for _ in range(streams)]  # one unless --streams
        use_graph = mode in ("graph", "compile") and (dev.type == "cuda" or emulate)
        ep = (
            GraphEpisode(tore, caches, T, decoder, inputs, emulate=emulate)
            if use_graph
            else EagerEpisode(tore, caches[0], T, decoder, inputs)
        )
        # Every step's logits against the single-shot path on the same first t glimpses.
        ep.load(inputs[0])
        ep.reset()
        got = [x.clone() for x in ep.run()]
        pix, coords = inputs[0]
        pix_b, coords_b = pix.transpose(0, 1), coords.transpose(0, 1)  # [B, T, ...]
        errs = [
            rel_err(got[t], tore.forward_glimpses(pix_b[:, : t + 1], coords_b[:, : t + 1], K).logits) for t in range(T)
        ]
        info = dict(check_rel_err=max(errs), check_rel_err_by_t=errs)
        if ref32 is not None:
            info["check_rel_err_vs_fp32"] = rel_err(got[-1], ref32.forward_glimpses(pix_b, coords_b, K).logits)
    if not max(errs) <= tol:
        raise _CheckFailed(
            f"{mode} K={K} batch={batch}: logits differ from forward_glimpses by {max(errs):.2e} "
            f"(> {tol:.0e}; per step {[f'{e:.1e}' for e in errs]})"
        )
    return ep, info


def _time_interleaved(episodes: dict, inputs, dev, T, repeats, warmup, sync_each_step) -> dict[int, list[list[float]]]:
    """Per K: the T per-step intervals (ms) of each timed episode."""
    out: dict[int, list[list[float]]] = {K: [] for K in episodes}
    timing_sets = inputs[1:] or inputs
    with torch.inference_mode():
        for r in range(warmup + repeats):
            for K, ep in episodes.items():
                ep.load(timing_sets[r % len(timing_sets)])
                ep.reset()  # outside the timed region
                synchronize(dev)
                clock = _Clock(dev, T + 1)
                clock.mark()
                if sync_each_step:

                    def mark(clock=clock) -> None:
                        synchronize(dev)
                        clock.mark()

                    ep.run(mark)
                else:
                    ep.run(clock.mark)
                iv = clock.intervals_ms()
                if r >= warmup:
                    out[K].append(iv)
    return out


def _summarise(by_t: list[list[float]], dims, batch, K, T, G, decoder) -> dict:
    episodes = [sum(iv) for iv in by_t]
    episode_ms = statistics.median(episodes)
    step_by_t = [statistics.median(col) for col in zip(*by_t)]
    flops_img = episode_flops(dims, T, G, K, decoder=bool(decoder), empty_pass=False, recon=decoder != "entropy")[-1]
    return dict(
        episode_ms=episode_ms,
        step_ms=episode_ms / T,
        step_ms_worst=max(step_by_t),
        step_ms_by_t=step_by_t,
        episode_ms_all=episodes,
        episode_ms_spread=(min(episodes), max(episodes)),
        gflop_per_image=flops_img / 1e9,
        tflops=batch * flops_img / (episode_ms * 1e-3) / 1e12,
    )


def _add_ratios(results: list[dict]) -> None:
    base = {(r["mode"], r["batch"]): r for r in results if r["K"] == 0 and "episode_ms" in r}
    for r in results:
        b = base.get((r["mode"], r["batch"]))
        if b is None or "episode_ms" not in r:
            continue
        r["flop_ratio"] = b["gflop_per_image"] / r["gflop_per_image"]
        r["wall_ratio"] = b["episode_ms"] / r["episode_ms"]
        r["wall_over_flop"] = r["wall_ratio"] / r["flop_ratio"]


# ------------------------------------------------------------------------------------------- report
def format_markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# TORE speed: {meta['model']} ({meta['dtype']}, {meta['device_kind']})", ""]
    lines += [
        f"- command: `{meta['command']}`",
        f"- device: {meta['device']}",
        f"- software: {meta['versions']}",
        f"- date: {meta['date']}; host load average (1 min) at start / end: "
        f"{meta['host_load'][0]} / {meta['host_load'][1]}",
        f"- episode: {meta['glimpses']} sequential steps, glimpses of {meta['glimpse']}x{meta['glimpse']} patches "
        f"({meta['img_size']} px image, patch {meta['patch']}), random weights, random uint8 glimpses; decoder "
        f"{_DECODER_WORDS[meta['decoder']]}",
        f"- timing: median of {meta['repeats']} episodes after {meta['warmup']} warm-up, "
        f"{'CUDA events' if meta['device_kind'] == 'cuda' else 'time.perf_counter'}, the K values interleaved; "
        "the cache reset is outside the timed region"
        f"{'; synchronised after every step' if meta['sync_each_step'] else ''}"
        f"{f'; each step split over {s} concurrent CUDA streams' if (s := meta.get('streams', 1)) > 1 else ''}",
        "- FLOPs: analytic (avex.flops; 1 multiply-add = 2 FLOPs, matmuls and attention), per image per episode, "
        "empty pass excluded",
        "- check: logits after every step vs eager single-shot `forward_glimpses` on the same glimpses, "
        "max over steps of ||a-b||/||b||",
        "- ratios: K=0 (full recomputation, same code, same mode and batch) over this K; "
        "wall/FLOP = wall ratio / FLOP ratio (1 = time saved in proportion to FLOPs; target >= 0.67 at batch 256)",
        "",
        "| mode | batch | K | ms / episode | ms / step (mean) | ms / step (worst t) | GFLOP / image | FLOP ratio "
        "| wall ratio | wall/FLOP | TFLOP/s | check rel err |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "episode_ms" not in r:
            lines.append(f"| {r['mode']} | {r['batch']} | {r['K']} | failed: {r.get('error', '?')[:120]} |||||||||")
            continue
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['K']} | {r['episode_ms']:.3f} | {r['step_ms']:.3f} "
            f"| {r['step_ms_worst']:.3f} | {r['gflop_per_image']:.2f} | {r.get('flop_ratio', float('nan')):.2f} "
            f"| {r.get('wall_ratio', float('nan')):.2f} | "
            f"{r.get('wall_over_flop', float('nan')):.2f} | {r['tflops']:.3f} | {r['check_rel_err']:.1e} |"
        )
    targets = _targets(results, meta)
    if targets:
        lines += ["", "Targets (issue):", ""] + [f"- {t}" for t in targets]
    return "\n".join(lines) + "\n"


def _targets(results: list[dict], meta: dict) -> list[str]:
    out = []
    for r in results:
        if "episode_ms" not in r:
            continue
        if r["batch"] >= 256 and r["K"] > 0:
            ok = r["wall_over_flop"] >= TARGET_WALL_OVER_FLOP
            out.append(
                f"{'PASS' if ok else 'FAIL'} {r['mode']} batch {r['batch']} K={r['K']}: "
                f"wall ratio {r['wall_ratio']:.2f} "
                f"vs FLOP ratio {r['flop_ratio']:.2f} (need >= {r['flop_ratio'] * TARGET_WALL_OVER_FLOP:.2f})"
            )
        if r["batch"] == 1 and meta["device_kind"] == "cuda":
            ok = r["step_ms_worst"] <= TARGET_STEP_MS_B1
            out.append(
                f"{'PASS' if ok else 'FAIL'} {r['mode']} batch 1 K={r['K']}: "
                f"worst step {r['step_ms_worst']:.3f} ms (need <= 1 ms)"
            )
    return out


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="vit_base_patch16_224", help="timm ViT name (random weights)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--glimpse", type=int, default=2, help="glimpse side in patches")
    p.add_argument("--glimpses", type=int, default=12, help="steps per episode (T)")
    p.add_argument("--K", type=int, nargs="+", default=[0, 4, 8, 12], help="split points (0 is always added)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype",
        default=None,
        choices=list(DTYPES),
        help="weights and cache dtype (bf16: the whole model in bf16); default bf16 on cuda, fp32 on cpu",
    )
    p.add_argument(
        "--mode", nargs="+", choices=MODES, default=None, help="default: graph on cuda, eager on cpu; several allowed"
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="timed episodes per configuration (default 30 cuda, 10 cpu)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed episodes first (default 3 cuda, 1 cpu)")
    p.add_argument(
        "--decoder",
        nargs="?",
        const="both",
        choices=["both", "entropy"],
        default=None,
        help="also run the glimpse decoder every step: both outputs (the default) or the entropy map alone (as an env)",
    )
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sync-each-step",
        action="store_true",
        help="synchronise after every step, as an agent reading each step's output would",
    )
    p.add_argument(
        "--streams",
        type=int,
        default=1,
        help="graph modes: split each step's batch over this many concurrent CUDA streams inside its graph",
    )
    p.add_argument(
        "--tol", type=float, default=None, help="check tolerance, ||a-b||/||b|| (default 1e-4 fp32, 3e-2 bf16)"
    )
    p.add_argument("--out", type=Path, default=None, help="Markdown report, e.g. benchmarks/results/<name>.md")
    p.add_argument("--json", type=Path, default=None, help="raw numbers as JSON")
    p.add_argument("--emulate-graphs", action="store_true", help=argparse.SUPPRESS)  # CPU self-test of GraphEpisode
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    load0 = _loadavg()
    results = run_benchmark(
        args.model,
        img_size=args.img_size,
        patch=args.patch,
        glimpse=args.glimpse,
        glimpses=args.glimpses,
        Ks=args.K,
        batches=args.batch,
        device=args.device,
        dtype=args.dtype,
        modes=args.mode,
        repeats=args.repeats,
        warmup=args.warmup,
        decoder=args.decoder,
        num_classes=args.num_classes,
        seed=args.seed,
        sync_each_step=args.sync_each_step,
        streams=args.streams,
        tol=args.tol,
        _emulate_graphs=args.emulate_graphs,
    )
    dev = torch.device(args.device)
    argv_str = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    meta = dict(
        command=f"PYTHONPATH=. python benchmarks/tore_speed.py {argv_str}".strip(),
        model=args.model,
        dtype=results[0]["dtype"] if results else args.dtype,
        device_kind=dev.type,
        device=device_description(dev),
        versions=_versions(),
        date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        glimpses=args.glimpses,
        glimpse=args.glimpse,
        img_size=args.img_size,
        patch=args.patch,
        decoder=args.decoder,
        repeats=results[0]["repeats"] if results else args.repeats,
        warmup=results[0]["warmup"] if results else args.warmup,
        sync_each_step=args.sync_each_step,
        streams=args.streams,
        wall_s=round(time.perf_counter() - t0, 1),
        host_load=(load0, _loadavg()),
    )
    md = format_markdown(results, meta)
    print()
    print(md)
    print(f"(total {meta['wall_s']} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, results=results), indent=1, default=str))
    failed = [r for r in results if "error" in r]
    if failed:
        print(f"{len(failed)} configuration(s) failed: see the '!!' lines above", file=sys.stderr)
        sys.exit(2)
    return results


if __name__ == "__main__":
    try:
        main()
    except _CheckFailed as err:
        print(f"CORRECTNESS CHECK FAILED: {err}", file=sys.stderr)
        sys.exit(1)
