"""Tests for the training options of issue 18 items 3 and 4: self-distillation (``--distill``) and continuous
glimpses (``--continuous-glimpses``). CPU, a tiny TORE ViT, fake Fashion-MNIST."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_kit import RUN_BATCH, TINY, cpu_config, tiny_tore

from avex.cli import main as cli_main
from avex.train.config import TrainConfig, resolve_config
from avex.train.loop import start_training
from avex.train.objective import TOREObjective, distill_kl, full_view_logits, masked_recon_mse, train_step
from avex.train.policy import (
    cut_continuous_glimpses,
    cut_glimpses,
    draw_continuous,
    draw_k_and_t,
    sample_continuous,
    sample_glimpses,
    step_rngs,
)
from avex.train.step import StepPlan, plan_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def _setup(T: int = 3, batch: int = 6, seed: int = 0) -> tuple[Any, Any, tuple[torch.Tensor, ...]]:
    """A tiny model (48 px, patch 8, 2x2 glimpses), its geometry and a batch of T grid glimpses."""
    torch.manual_seed(seed)
    model = tiny_tore()
    with torch.no_grad():  # confident predictions: the KL between two views well above float rounding
        model.vit.head.weight.mul_(30.0)
    geo = model.geometry(2)
    gen = torch.Generator().manual_seed(seed + 1)
    canvases = torch.randint(0, 256, (batch, 48, 48, 1), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    rows, cols = sample_glimpses(geo, batch, T, gen)
    return model, geo, (canvases, labels, rows, cols)


def _todays_loss(model: Any, geo: Any, batch: tuple[torch.Tensor, ...], K: int, recon: float = 0.1) -> torch.Tensor:
    """The objective before the options, written out: CE after the glimpses + recon x masked MSE."""
    canvases, labels, rows, cols = batch
    pixels, coords, seen = cut_glimpses(geo, canvases, rows, cols)
    out = model.forward_glimpses(pixels, coords, K)
    ce = F.cross_entropy(out.logits.float(), labels)
    recon_px, _ = model.decode(out, entropy=False)
    return ce + recon * masked_recon_mse(model, recon_px, canvases, seen)


def _grads(model: Any, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _kl_by_hand(teacher: torch.Tensor, student: torch.Tensor, temp: float) -> float:
    """KL(softmax(t/temp) || softmax(s/temp)) x temp^2, mean over rows, in float64 numpy."""
    t = teacher.detach().double().numpy() / temp
    s = student.detach().double().numpy() / temp
    log_p = t - t.max(-1, keepdims=True) - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True))
    log_q = s - s.max(-1, keepdims=True) - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True))
    return float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean() * temp * temp)


# ------------------------------------------------------------------------------------------------
# Off: bit for bit today's objective
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [0, 1, 2])
def test_options_off_give_exactly_todays_loss_and_gradients(K: int) -> None:
    model, geo, batch = _setup()
    expected = _todays_loss(model, geo, batch, K)
    want = _grads(model, expected)
    for objective in (
        TOREObjective(model, geo, 0.1),
        TOREObjective(model, geo, 0.1, 0.0, distill=0.0, distill_temp=3.0),
    ):
        loss = objective(*batch, K)[0]
        assert torch.equal(loss, expected)
        got = _grads(model, loss)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name


def test_continuous_fraction_zero_draws_nothing_and_leaves_the_step_unchanged() -> None:
    a, _ = step_rngs(3, 7, CPU)
    b, _ = step_rngs(3, 7, CPU)
    assert draw_continuous(b, 0.0) is False
    assert a.random() == b.random()  # nothing was drawn from b
    # With a fraction, K and T (drawn before) are those of a run without it.
    c, _ = step_rngs(3, 7, CPU)
    d, _ = step_rngs(3, 7, CPU)
    assert draw_k_and_t(c, 6, 12, 36) == draw_k_and_t(d, 6, 12, 36)
    draw_continuous(d, 0.5)


# ------------------------------------------------------------------------------------------------
# Self-distillation
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_teacher_is_the_plain_vit_on_the_whole_canvas_at_k0() -> None:
    model, geo, (canvases, *_) = _setup()
    reference = model.vit(model.normalize(canvases.permute(0, 3, 1, 2)))
    teacher = full_view_logits(model, geo, canvases)
    assert teacher.shape == (6, 10) and reference.abs().max() > 0.05
    torch.testing.assert_close(teacher, reference, atol=1e-5, rtol=1e-5)
    # A glimpse that does not tile the grid (3x3 on 6x6 does; 4x4 does not): single patches, same prediction.
    torch.testing.assert_close(full_view_logits(model, model.geometry(4), canvases), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("weight", "temp"), [(0.5, 1.0), (1.0, 2.0)])
def test_distillation_adds_exactly_w_times_the_kl_to_the_full_view(weight: float, temp: float) -> None:
    model, geo, batch = _setup()
    K = 2
    base = TOREObjective(model, geo, 0.1)(*batch, K)
    loss, ce, mse, logits = TOREObjective(model, geo, 0.1, distill=weight, distill_temp=temp)(*batch, K)
    assert torch.equal(ce, base[1]) and torch.equal(mse, base[2]) and torch.equal(logits, base[3])
    with torch.no_grad():  # the teacher, independently: timm's ViT on the whole normalised canvas
        teacher = model.vit(model.normalize(batch[0].permute(0, 3, 1, 2)))
    kl = _kl_by_hand(teacher, logits, temp)
    assert kl > 0.05  # a real difference between 3 glimpses at K=2 and the full view
    assert math.isclose((loss - base[0]).item(), weight * kl, rel_tol=1e-4, abs_tol=1e-7)
    assert math.isclose(distill_kl(teacher, logits, temp).item(), kl, rel_tol=1e-5)


def test_the_teacher_gets_no_gradient() -> None:
    model, geo, batch = _setup()
    K, weight = 1, 0.7
    teacher = full_view_logits(model, geo, batch[0])
    assert not teacher.requires_grad and teacher.grad_fn is None
    got = _grads(model, TOREObjective(model, geo, 0.1, distill=weight)(*batch, K)[0])
    # The same loss with the teacher a constant made before: only the student's path carries gradient.
    pixels, coords, _ = cut_glimpses(geo, *batch[:1], *batch[2:])

    def student() -> torch.Tensor:
        return model.forward_glimpses(pixels, coords, K).logits.float()

    expected = _todays_loss(model, geo, batch, K) + weight * distill_kl(teacher.clone(), student())
    want = _grads(model, expected)
    # Had the teacher kept its graph, its K=0 pass would add gradient to the blocks (all of them at K=0).
    leaky = _todays_loss(model, geo, batch, K) + weight * distill_kl_leaky(model, geo, batch[0], student())
    leak = _grads(model, leaky)
    assert max((leak[n] - want[n]).abs().max().item() for n in want) > 0.01
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-4, msg=name)


def distill_kl_leaky(model: Any, geo: Any, canvases: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL with a teacher that keeps its graph (what the objective must not do), for the test above."""
    pixels, coords = model.tile(canvases.permute(0, 3, 1, 2), geo.glimpse)
    teacher = model.forward_glimpses(pixels, coords, 0).logits.float()
    log_p, log_q = F.log_softmax(teacher, -1), F.log_softmax(student, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


# ------------------------------------------------------------------------------------------------
# Continuous glimpses
# ------------------------------------------------------------------------------------------------


def test_continuous_glimpses_feed_the_model_what_the_envs_continuous_step_feeds_it(fmnist_root: Path) -> None:
    env = gym.make(
        "AVE-FashionMNIST-v0",
        root=str(fmnist_root),
        checkpoint=None,
        pretrained=False,
        model="vit_tiny_patch16_224",
        model_kwargs=dict(depth=2, embed_dim=32, num_heads=2),
        action_mode="continuous",
    ).unwrapped
    engine = env.engine
    seen_by_model: list[tuple[torch.Tensor, torch.Tensor]] = []
    step = engine.model.step

    def spy(cache: Any, pixels: torch.Tensor, coords: torch.Tensor) -> Any:
        seen_by_model.append((pixels.clone(), coords.clone()))
        return step(cache, pixels, coords)

    engine.model.step = spy
    env.reset(seed=0)
    actions = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.3, 0.8, 0.45], [0.71, 0.12, 0.9]], dtype=np.float32)
    for a in actions:
        env.step(a)
    # The training geometry (TOREViT.geometry, stride 1) cuts continuous boxes as the env's does.
    geo = engine.model.geometry(engine.geometry.glimpse)
    yxz = torch.from_numpy(actions)[None]  # [1, T, 3]
    pixels, coords, seen = cut_continuous_glimpses(geo, engine.hidden, yxz)
    assert pixels.dtype == torch.float32 and 0 <= pixels.min() and pixels.max() <= 1 + 1e-6
    assert coords.dtype == torch.float32 and not torch.equal(coords, coords.round())  # off-grid tokens
    for t, (env_pixels, env_coords) in enumerate(seen_by_model):
        assert torch.equal(pixels[:, t], env_pixels), t
        assert torch.equal(coords[:, t], env_coords), t
    assert torch.equal(seen, engine.visited.reshape(1, -1))
    env.close()


def test_continuous_batches_train_and_their_seen_mask_is_the_boxes_centres() -> None:
    model, geo, (canvases, labels, rows, cols) = _setup()
    yxz = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]] * 6)  # two unscaled corner boxes: 2x2 patches each
    _, _, seen = cut_continuous_glimpses(geo, canvases, yxz)
    expected = torch.zeros(6, 6, 6, dtype=torch.bool)
    expected[:, :2, :2] = expected[:, 4:, 4:] = True
    assert torch.equal(seen, expected.reshape(6, 36))
    # An unscaled aligned box is the grid glimpse there: the same pixels (as floats) and coordinates.
    pix_c, coords_c, _ = cut_continuous_glimpses(geo, canvases, yxz)
    pix_g, coords_g, _ = cut_glimpses(geo, canvases, torch.tensor([[0, 4]] * 6), torch.tensor([[0, 4]] * 6))
    torch.testing.assert_close(pix_c, pix_g.float() / 255.0)
    assert torch.equal(coords_c, coords_g.float())
    # A training step on continuous glimpses moves the weights; rows and cols are not read.
    objective = TOREObjective(model, geo, 0.1, distill=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    yxz = sample_continuous(6, 3, torch.Generator().manual_seed(0))
    loss = train_step(objective, model, opt, (canvases, labels, rows, cols, yxz), K=1)[0]
    assert torch.isfinite(loss) and any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    other = objective(canvases, labels, rows * 0, cols * 0, 1, yxz)[0]
    assert torch.equal(other, objective(canvases, labels, rows, cols, 1, yxz)[0])


# ------------------------------------------------------------------------------------------------
# Drawing, the loop, the fused step, the command line
# ------------------------------------------------------------------------------------------------


def test_drawing_is_deterministic_per_seed_and_step_and_follows_the_fraction() -> None:
    def draws(seed: int, step: int, fraction: float) -> tuple[int, int, bool, torch.Tensor]:
        host, gen = step_rngs(seed, step, CPU)
        K, T = draw_k_and_t(host, 6, 12, 36)
        return K, T, draw_continuous(host, fraction), sample_continuous(4, T, gen)

    for step in range(5):
        a, b = draws(1, step, 0.5), draws(1, step, 0.5)
        assert a[:3] == b[:3] and torch.equal(a[3], b[3])
    flags = [draws(2, s, 0.25)[2] for s in range(400)]
    assert 0.17 < np.mean(flags) < 0.33
    assert not any(draws(2, s, 0.0)[2] for s in range(50)) and all(draws(2, s, 1.0)[2] for s in range(50))
    yxz = draws(1, 0, 1.0)[3]
    assert yxz.shape[-1] == 3 and 0 <= yxz.min() and yxz.max() < 1


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no optimiser step here
def test_the_loop_hands_the_step_the_same_continuous_batch_for_the_same_step(fmnist_root: Path, tmp_path: Path) -> None:
    training = start_training(cpu_config(fmnist_root, tmp_path / "ck", continuous_glimpses=0.5, seed=4))
    batches: list[tuple[torch.Tensor, ...]] = []
    training.step_fn = lambda batch, K: batches.append(batch) or torch.zeros(4)  # type: ignore[assignment, func-returns-value]
    kinds = []
    for step in (0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5):
        training.step(step)
        kinds.append(len(batches[-1]))
    for i in range(0, len(batches), 2):
        assert len(batches[i]) == len(batches[i + 1])
        assert all(torch.equal(x, y) for x, y in zip(batches[i], batches[i + 1]))
    assert set(kinds) == {4, 5}, kinds  # some batches continuous, some on the grid
    cont = next(b for b in batches if len(b) == 5)
    assert cont[4].shape == (RUN_BATCH, cont[2].shape[1], 3)
    training.run.data.close()


def test_fused_step_auto_falls_back_and_on_refuses_naming_the_option() -> None:
    model = tiny_tore()
    cfg = resolve_config(TrainConfig(img_size=48, **TINY))
    gpu = torch.device("cuda", 0)  # plan_step only reads the device's type
    assert plan_step(cfg, model, gpu) == StepPlan(True, True)
    for change, flag in ((dict(distill=0.5), "--distill 0.5"), (dict(continuous_glimpses=0.25), "--continuous")):
        plan = plan_step(replace(cfg, **change), model, gpu)
        assert (plan.fused, plan.graphs) == (False, False) and flag in plan.note
        assert plan_step(replace(cfg, **change), model, CPU) == StepPlan(False, False)  # eager anyway: no note
        with pytest.raises(ValueError, match=f"--fused-step on: {flag}.*eager step only"):
            plan_step(replace(cfg, fused_step="on", **change), model, gpu)
        with pytest.raises(ValueError, match=f"--cuda-graphs on: {flag}"):
            plan_step(replace(cfg, cuda_graphs="on", **change), model, gpu)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(distill=-0.1), r"--distill must be a number >= 0 \(the distillation weight; 0: off\), got -0.1"),
        (dict(distill=float("nan")), "--distill must be a number >= 0.*got nan"),
        (dict(distill_temp=0.0), r"--distill-temp must be a number > 0 \(the temperature.*got 0.0"),
        (dict(continuous_glimpses=1.5), r"--continuous-glimpses must be a number in \[0, 1\].*got 1.5"),
    ],
)
def test_out_of_range_options_are_refused(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_config(TrainConfig(**change))


def test_cli_trains_with_distillation_and_continuous_glimpses(fmnist_root: Path, tmp_path: Path) -> None:
    out, log = tmp_path / "ck", tmp_path / "log.jsonl"
    argv = ["train", "classifier", "--device", "cpu", "--data-root", str(fmnist_root), "--img-size", "48"]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    argv += ["--batch-size", "8", "--steps", "3", "--eval-size", "8", "--eval-batch-size", "8", "--no-progress"]
    argv += ["--distill", "0.5", "--continuous-glimpses", "0.5", "--out", str(out), "--log-json", str(log)]
    assert cli_main(argv) == 0
    train_args = json.loads((tmp_path / "ck.json").read_text())["meta"]["train_args"]
    assert train_args["distill"] == 0.5 and train_args["continuous_glimpses"] == 0.5
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
