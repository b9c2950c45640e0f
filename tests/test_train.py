"""Tests for avex.train: the TORE training policy, DDP equivalence, checkpoints, image folders.

CPU only, tiny models, fake Fashion-MNIST IDX files and images written into tmp folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_kit import (
    RUN_STEPS,
    TINY,
    assert_same_weights_as_one,
    cpu_config,
    run_launchers,
    tiny_tore,
    torchrun_command,
)

from avex.checkpoint import load_tore
from avex.data import FashionMNISTCanvas
from avex.geometry import GlimpseGeometry
from avex.train import (
    TOREObjective,
    TrainConfig,
    build_classifier,
    cut_glimpses,
    draw_k_and_t,
    resolve_config,
    sample_glimpses,
    start_from_checkpoint,
    step_rngs,
    train_classifier,
    train_step,
)

_tiny_model = tiny_tore


# ------------------------------------------------------------------------------------------------
# Training policy
# ------------------------------------------------------------------------------------------------


def test_steps_lower_the_loss_on_a_fixed_batch(fmnist_root: Path) -> None:
    torch.manual_seed(0)
    model = _tiny_model()
    geo = model.geometry(2)
    source = FashionMNISTCanvas("train", root=fmnist_root, canvas_size=48, scale=1)
    gen = torch.Generator().manual_seed(0)
    canvases, labels = source.random_batch(16, gen)
    rows, cols = sample_glimpses(geo, 16, 3, gen)  # 3 of 9 tiles: the reconstruction term is active
    objective = TOREObjective(model, geo, recon_weight=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for _ in range(15):  # the trainer's own step (CPU: fp32, gradient clipping on)
        loss, ce, mse, _ = train_step(objective, model, opt, (canvases, labels, rows, cols), K=1)
        history.append((loss.item(), ce.item(), mse.item()))
    assert history[0][2] > 0, "the masked reconstruction term should be active with 3 of 9 tiles seen"
    assert history[-1][0] < 0.8 * history[0][0], history
    assert history[-1][1] < history[0][1] and history[-1][2] < history[0][2], history


@pytest.mark.parametrize("img_size", [48, 56])  # grid 6x6 (g divides it) and 7x7 (it does not)
def test_glimpse_sampler_non_overlapping_in_grid_and_shifted(img_size: int) -> None:
    geo = GlimpseGeometry((img_size, img_size), patch=8, glimpse=2)
    g, (gh, gw) = geo.glimpse, geo.grid
    tiles = (gh // g) * (gw // g)
    gen = torch.Generator().manual_seed(1)
    for T in (1, 2, 4, tiles - 1, tiles):
        rows, cols = sample_glimpses(geo, 300, T, gen)
        assert rows.shape == cols.shape == (300, T) and rows.dtype == torch.int64
        assert rows.min() >= 0 and cols.min() >= 0 and (rows + g).max() <= gh and (cols + g).max() <= gw
        # one shifted stride-g lattice per image
        assert ((rows - rows[:, :1]) % g == 0).all() and ((cols - cols[:, :1]) % g == 0).all()
        # no patch revealed twice
        cover = torch.zeros(300, gh, gw)
        for t in range(T):
            for dy in range(g):
                for dx in range(g):
                    cover[torch.arange(300), rows[:, t] + dy, cols[:, t] + dx] += 1
        assert cover.max() == 1 and (cover.sum(dim=(1, 2)) == T * g * g).all()
        shifts = set(zip((rows[:, 0] % g).tolist(), (cols[:, 0] % g).tolist()))
        if T <= 4:
            assert shifts == {(a, b) for a in range(g) for b in range(g)}, f"T={T}: shifts used {shifts}"
        if T == tiles and gh % g == 0:  # only shift 0 holds them all: every patch revealed
            assert shifts == {(0, 0)} and (cover == 1).all()


def _glimpses_by_arithmetic(geo: GlimpseGeometry, batch: int, T: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """sample_glimpses as it was before its tables: every lattice computed per draw (some thirty small ops)."""
    g, (gh, gw) = geo.glimpse, geo.grid
    ph, pw = gh // g, gw // g
    shift = torch.arange(g)
    fits = (((gh - shift) // g)[:, None] * ((gw - shift) // g)[None, :]).flatten() >= T
    s = torch.rand(batch, g * g, generator=gen).masked_fill(~fits, -1.0).argmax(dim=1)
    dy, dx = s // g, s % g
    lat_r, lat_c = dy[:, None] + torch.arange(ph)[None] * g, dx[:, None] + torch.arange(pw)[None] * g
    ok = (lat_r + g <= gh)[:, :, None] & (lat_c + g <= gw)[:, None, :]
    idx = torch.rand(batch, ph * pw, generator=gen).masked_fill(~ok.flatten(1), float("-inf")).topk(T, dim=1).indices
    return dy[:, None] + (idx // pw) * g, dx[:, None] + (idx % pw) * g


@pytest.mark.parametrize("img_size, glimpse", [(112, 2), (56, 2), (64, 3), (40, 1)])
def test_glimpse_sampler_tables_draw_what_the_arithmetic_drew(img_size: int, glimpse: int) -> None:
    """The lattice tables change no draw: from the same generator state, the same glimpses in the same order as the
    per-draw arithmetic they replaced, at every T (a g that does not divide the grid, where some shifts hold fewer
    positions, included)."""
    geo = GlimpseGeometry((img_size, img_size), patch=8, glimpse=glimpse)
    tiles = (geo.grid[0] // glimpse) * (geo.grid[1] // glimpse)
    for T in sorted({1, 2, tiles // 2, tiles - 1, tiles} - {0}):
        got = sample_glimpses(geo, 200, T, torch.Generator().manual_seed(T))
        want = _glimpses_by_arithmetic(geo, 200, T, torch.Generator().manual_seed(T))
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (img_size, glimpse, T)


def test_cut_glimpses_pixels_coords_and_seen() -> None:
    geo = GlimpseGeometry((48, 48), patch=8, glimpse=2)
    canvases = torch.randint(0, 256, (3, 48, 48, 1), dtype=torch.uint8)
    rows, cols = sample_glimpses(geo, 3, 5, torch.Generator().manual_seed(2))
    pixels, coords, seen = cut_glimpses(geo, canvases, rows, cols)
    assert pixels.shape == (3, 5, 1, 16, 16) and coords.shape == (3, 5, 4, 2) and seen.shape == (3, 36)
    for b in range(3):
        for t in range(5):
            r, c = int(rows[b, t]), int(cols[b, t])
            assert torch.equal(pixels[b, t, 0], canvases[b, 8 * r : 8 * r + 16, 8 * c : 8 * c + 16, 0])
            assert coords[b, t].tolist() == [[r, c], [r, c + 1], [r + 1, c], [r + 1, c + 1]]
        assert int(seen[b].sum()) == 5 * 4


def test_k_and_t_draws_cover_their_ranges_and_repeat_by_seed() -> None:
    draws = [draw_k_and_t(step_rngs(0, s, torch.device("cpu"))[0], depth=6, budget=12, n_tiles=49) for s in range(2000)]
    ks, ts = zip(*draws)
    assert set(ks) == set(range(7)) and set(ts) == set(range(1, 50))
    small = np.mean([t < 12 for t in ts])
    assert 0.4 < small < 0.52  # P(T < 12) = 0.5 * 11/12
    assert draws == [draw_k_and_t(step_rngs(0, s, torch.device("cpu"))[0], 6, 12, 49) for s in range(2000)]
    # A restricted K set (--train-k) draws only from it; the same steps' T draws are unchanged.
    only = [draw_k_and_t(step_rngs(0, s, torch.device("cpu"))[0], 6, 12, 49, ks=(6,)) for s in range(200)]
    assert {k for k, _ in only} == {6}
    pair = [draw_k_and_t(step_rngs(0, s, torch.device("cpu"))[0], 6, 12, 49, ks=(0, 6))[0] for s in range(200)]
    assert set(pair) == {0, 6} and 0.35 < np.mean(pair) / 6 < 0.65
    # A restricted T set (--train-t) draws only from it, uniformly, and leaves the K draws as they were.
    t_only = [draw_k_and_t(step_rngs(0, s, torch.device("cpu"))[0], 6, 12, 49, ts=(3, 12)) for s in range(400)]
    assert [k for k, _ in t_only] == list(ks[:400])
    assert {t for _, t in t_only} == {3, 12} and 0.4 < np.mean([t == 12 for _, t in t_only]) < 0.6
    a = torch.rand(4, generator=step_rngs(3, 7, torch.device("cpu"))[1])
    b = torch.rand(4, generator=step_rngs(3, 7, torch.device("cpu"))[1])
    c = torch.rand(4, generator=step_rngs(3, 8, torch.device("cpu"))[1])
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# Whole runs: one process, two DDP processes, checkpoints
# ------------------------------------------------------------------------------------------------


def test_two_gloo_processes_train_the_same_weights_as_one(single_run: dict, fmnist_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = torchrun_command(["--standalone", "--nproc_per_node=2"], fmnist_root, out)
    [(code, log)] = run_launchers([cmd], tmp_path, timeout_s=120)
    assert code == 0, log[-6000:]
    assert_same_weights_as_one(single_run["checkpoint"], out, world=2)


def test_log_json_has_one_record_per_step(single_run: dict, tmp_path: Path) -> None:
    log = Path(single_run["checkpoint"]).parent / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(RUN_STEPS))
    assert all(np.isfinite(r["loss"]) and 0 <= r["K"] <= 2 and 1 <= r["T"] <= 9 for r in records)


def test_checkpoint_round_trips_and_refuses_another_architecture(single_run: dict) -> None:
    path = single_run["checkpoint"]
    model = single_run["model"].eval()
    loaded = load_tore(path).eval()
    geo = model.geometry(2)
    canvases = torch.randint(0, 256, (4, 48, 48, 1), dtype=torch.uint8)
    pixels, coords, _ = cut_glimpses(geo, canvases, *sample_glimpses(geo, 4, 3, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        for K in (0, 1, 2):
            torch.testing.assert_close(loaded(pixels, coords, K), model(pixels, coords, K), atol=1e-6, rtol=1e-6)
    meta = loaded.meta
    assert meta["class_names"][0] == "T-shirt/top" and meta["glimpse"] == 2 and meta["budget"] == 4
    assert meta["eval"]["columns"] == ["1", "2", "4", "all"] and meta["eval"]["ks"] == [0, 1, 2]
    assert Path(path).with_suffix("").with_suffix(".eval.md").read_text().startswith("Top-1")
    with pytest.raises(ValueError, match="embed_dim"):
        load_tore(path, expect={"embed_dim": 192})


# ------------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------------


def test_image_folder_path_trains_a_step(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png"
                )
    cfg = TrainConfig(
        device="cpu",
        dataset="folder",
        data_root=str(tmp_path),
        model="vit_tiny_patch16_224",
        img_size=32,
        steps=2,
        batch_size=4,
        workers=1,
        eval_size=4,
        eval_batch_size=4,
        out=str(tmp_path / "ck"),
        progress=False,
        **TINY,
    )
    result = train_classifier(cfg)
    assert np.isfinite(result["final"]["loss"])
    assert result["eval"]["n"] == 4
    loaded = load_tore(result["checkpoint"], expect={"in_chans": 3, "num_classes": 2})
    assert loaded.meta["class_names"] == ["cat", "dog"] and loaded.meta["dataset"] == "folder"


def test_init_starts_from_a_checkpoint_and_refuses_another_architecture(
    single_run: dict, fmnist_root: Path, tmp_path: Path
) -> None:
    path = single_run["checkpoint"]
    same = build_classifier(resolve_config(TrainConfig(img_size=48, **TINY)), 10)
    meta = start_from_checkpoint(same, path)
    assert meta["train_args"]["seed"] == 5 and meta["steps"] == RUN_STEPS
    saved = load_file(path)
    for k, v in same.state_dict().items():
        assert torch.equal(v, saved[k].to(v.dtype)), k
    other = build_classifier(resolve_config(TrainConfig(img_size=64, **TINY)), 10)
    with pytest.raises(ValueError, match="img_size"):
        start_from_checkpoint(other, path)
    # A continued run records where it started.
    out = tmp_path / "continued"
    result = train_classifier(cpu_config(fmnist_root, out, steps=1, init=path))
    chain = load_tore(result["checkpoint"]).meta["init_from"]
    assert chain["steps"] == RUN_STEPS and chain["train_args"]["seed"] == 5 and "eval" in chain


def test_train_k_and_t_restrict_the_draws_and_refuse_bad_ones(fmnist_root: Path, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    cfg = cpu_config(fmnist_root, tmp_path / "k2", log_every=1, log_json=str(log), train_k=(2,), train_t=(3, 3, 1))
    result = train_classifier(cfg)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["K"] for r in records] == [2, 2, 2] and {r["T"] for r in records} <= {1, 3}
    args = load_tore(result["checkpoint"]).meta["train_args"]
    assert args["train_k"] == [2] and args["train_t"] == [1, 3]
    with pytest.raises(ValueError, match=r"--train-k \[3\].*0\.\.2"):
        train_classifier(cpu_config(fmnist_root, tmp_path / "bad", log_every=1, train_k=(3,)))
    for bad in ((0,), (1000,)):
        with pytest.raises(ValueError, match=r"--train-t \[" + str(bad[0]) + r"\].*1\.\."):
            train_classifier(cpu_config(fmnist_root, tmp_path / "bad_t", log_every=1, train_t=bad))
    assert not (tmp_path / "bad_t.safetensors").exists()


def test_a_run_shorter_than_an_epoch_evaluates_the_subset(fmnist_root: Path, tmp_path: Path) -> None:
    """A trial run (1 step, under an epoch) evaluates --eval-subset images, not the whole split."""
    common = dict(device="cpu", data_root=str(fmnist_root), img_size=48, batch_size=8, eval_batch_size=4)
    cfg = TrainConfig(steps=1, eval_subset=3, out=str(tmp_path / "short"), progress=False, **common, **TINY)
    assert train_classifier(cfg)["eval"]["n"] == 3
    cfg = TrainConfig(epochs=1.0, eval_subset=3, out=str(tmp_path / "epoch"), progress=False, **common, **TINY)
    assert train_classifier(cfg)["eval"]["n"] == 20  # a whole epoch (10 steps): the whole fake test split


def test_init_from_a_checkpoint_saved_before_mae_order_keeps_its_decoder_order() -> None:
    """The shipped checkpoint predates the recorded decoder order: --init builds the run with its order."""
    from avex.checkpoint import shipped_checkpoint
    from avex.train.build import prepare_classifier

    cfg = resolve_config(TrainConfig(dataset="fashion-mnist", init=str(shipped_checkpoint("fashion-mnist"))))
    model, meta = prepare_classifier(cfg, 10, torch.device("cpu"))
    assert model.build_args is not None and model.build_args["decoder_pos"] == "row_col" and meta is not None


def test_weights_are_read_from_safetensors_only(tmp_path: Path) -> None:
    """--weights: a timm safetensors file of exactly the ViT is loaded; a pickle-based file is refused unopened."""
    from safetensors.torch import save_file

    cfg = resolve_config(TrainConfig(img_size=48, **TINY))
    vit = build_classifier(cfg, 10).vit
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    loaded = build_classifier(
        resolve_config(TrainConfig(img_size=48, weights=str(tmp_path / "vit.safetensors"), **TINY)), 10
    )
    assert all(torch.equal(a, b) for a, b in zip(vit.state_dict().values(), loaded.vit.state_dict().values()))
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(ValueError):
        build_classifier(resolve_config(TrainConfig(img_size=48, weights=str(tmp_path / "vit.pth"), **TINY)), 10)
