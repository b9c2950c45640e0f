"""The fused step's own data parallelism (avex.train.allreduce): one all-reduce of its flat gradient buffer.

Two gloo processes on the CPU: the flat-buffer average gives exactly DDP's gradients and weights (DDP wrapped
around a twin fused objective), and those of one process on the whole global batch up to fp32 rounding;
``broadcast_state`` starts every rank from rank 0's weights. Then the trainer itself: ``torchrun`` with two
processes and ``--fused-step on`` (the path a CUDA run graphs) trains the same weights as one process.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from fused_kit import random_batch
from script_kit import load_benchmark
from train_kit import (
    RUN_STEPS,
    assert_same_weights_as_one,
    in_process_group,
    run_launchers,
    single_config,
    spawn_within,
    tiny_tore,
    torchrun_command,
)

from avex.train import FusedObjective, TrainConfig, make_optimizer, resolve_config, train_classifier
from avex.train.allreduce import average_gradients, broadcast_state

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
]
WORLD, BATCH = 2, 8
STEPS = ((2, 3), (0, 9), (1, 4))  # (K, T): a decoder term, every patch seen, another K


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(objective: nn.Module, model: nn.Module, opt: torch.optim.Optimizer, batch: tuple, K: int) -> torch.Tensor:
    """One fused step as the trainer runs it (avex.train.objective.train_step's order); returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss = objective(*batch, K)[0]
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


def _worker(rank: int, rendezvous: str) -> None:
    torch.set_num_threads(1)
    in_process_group("gloo", rendezvous, rank, WORLD, lambda: _compare(rank))


def _compare(rank: int) -> None:
    """Per rank: the flat-buffer average (a), DDP around a twin (b) and one process on the global batch (c)."""
    torch.manual_seed(rank)  # different weights per rank: broadcast_state must give every rank rank 0's
    model = tiny_tore(init_values=0.5)  # layer scale, as DeiT-III's blocks
    geo = model.geometry(2)
    flat = FusedObjective(model, geo, 0.1, 0.1, grad_reduce=average_gradients)
    broadcast_state(flat)
    torch.manual_seed(0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), tiny_tore(init_values=0.5).parameters()))
    twin, whole = copy.deepcopy(model), copy.deepcopy(model)
    ddp = nn.parallel.DistributedDataParallel(FusedObjective(twin, geo, 0.1, 0.1))
    single = FusedObjective(whole, geo, 0.1, 0.1)
    cfg = resolve_config(TrainConfig(lr=3e-3))
    opts = [make_optimizer(m, cfg, 10, torch.device("cpu"))[0] for m in (model, twin, whole)]
    part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    for i, (K, T) in enumerate(STEPS):
        batch = random_batch(model, BATCH, T, seed=i)
        mine = tuple(t[part] for t in batch)
        loss = _step(flat, model, opts[0], mine, K)
        _step(ddp, twin, opts[1], mine, K)
        want = _step(single, whole, opts[2], batch, K)
        for (name, g), d, w in zip(_grads(model).items(), _grads(twin).values(), _grads(whole).values()):
            assert torch.equal(g, d), f"step {i} {name}: the flat average differs from DDP's"
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=f"step {i} {name}: not the global batch's")
        dist.all_reduce(loss)
        torch.testing.assert_close(loss / WORLD, want, rtol=1e-5, atol=1e-6)
    for p, d, w in zip(model.parameters(), twin.parameters(), whole.parameters()):
        assert torch.equal(p, d)
        torch.testing.assert_close(p, w, rtol=1e-4, atol=1e-5)


def test_flat_average_equals_ddp_and_one_process_on_the_global_batch(tmp_path: Path) -> None:
    spawn_within(_worker, (f"file://{tmp_path / 'rendezvous'}",), WORLD, timeout_s=120)


def _cuda_worker(rank: int, rendezvous: str) -> None:
    torch.cuda.set_device(rank)
    in_process_group("nccl", rendezvous, rank, WORLD, lambda: _compare_graphed(rank))


def _compare_graphed(rank: int) -> None:
    """Per GPU: the graphed fused step with the all-reduce in its graphs against the same step without graphs."""
    from avex.train import StepPlan
    from avex.train.step import make_step

    torch.manual_seed(rank)
    models = [tiny_tore(112, depth=6, embed_dim=192, num_heads=3).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    cfg = resolve_config(TrainConfig(lr=1e-3))
    stats = []
    for model, graphs in zip(models, (False, True)):
        objective = FusedObjective(model, model.geometry(2), 0.1, 0.1, torch.bfloat16, average_gradients)
        broadcast_state(objective)  # rank 0's weights on both ranks, for both twins
        opt, sched = make_optimizer(model, cfg, 100, torch.device("cuda"), capturable=graphs)
        step = make_step(StepPlan(True, graphs), objective, model, opt, True, 1.0)
        out = []
        for i, (K, T) in enumerate(((2, 5), (4, 20), (2, 5), (0, 49))):  # (2, 5) again: a replay
            batch = random_batch(model, 128, T, seed=i, device="cuda")
            part = slice(rank * 64, (rank + 1) * 64)
            out.append(step(tuple(t[part] for t in batch), K))
            sched.step()
        stats.append(torch.stack(out))
    torch.testing.assert_close(stats[1], stats[0], rtol=2e-3, atol=2e-3)
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4)
    mine = [p.detach().clone() for p in models[1].parameters()]
    broadcast_state(models[1])  # rank 0's result: the ranks' weights are the same
    assert all(torch.equal(a, b) for a, b in zip(mine, models[1].parameters()))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_graphed_step_with_the_all_reduce_equals_the_fused_step_on_two_cuda_gpus(tmp_path: Path) -> None:
    spawn_within(_cuda_worker, (f"file://{tmp_path / 'rendezvous'}",), WORLD, timeout_s=300)


def test_average_gradients_divides_then_sums_as_ddp(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process's view: the gradient divided by the world size, then one SUM all-reduce on the buffer itself."""
    calls: list[tuple[torch.Tensor, object]] = []
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=dist.ReduceOp.SUM: calls.append((t, op)))
    flat = torch.arange(8.0)
    average_gradients(flat)
    assert len(calls) == 1 and calls[0][0] is flat and calls[0][1] == dist.ReduceOp.SUM
    assert torch.equal(flat, torch.arange(8.0) / 4)


def test_two_gloo_processes_with_the_fused_step_train_the_same_weights_as_one(
    fmnist_root: Path, tmp_path: Path
) -> None:
    one = single_config(fmnist_root, tmp_path / "one" / "ck")
    summary = train_classifier(replace(one, fused_step="on"))
    assert summary["step"] == "fused"
    out = tmp_path / "two" / "ck"
    log = tmp_path / "two" / "log.jsonl"
    cmd = torchrun_command(["--standalone", f"--nproc_per_node={WORLD}"], fmnist_root, out)
    cmd += ["--fused-step", "on", "--log-json", str(log), "--log-every", "2"]
    [(code, out_log)] = run_launchers([cmd], tmp_path, timeout_s=120)
    assert code == 0, out_log[-6000:]
    assert "fused step" in out_log
    assert_same_weights_as_one(summary["checkpoint"], out, world=WORLD)
    logs = (tmp_path / "one" / "log.jsonl", log)  # the trainer's logs: rank 0 writes the ranks' mean
    losses = [[json.loads(line)["loss"] for line in p.read_text().splitlines()] for p in logs]
    assert len(losses[0]) == RUN_STEPS
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-6)


def test_ddp_report_gives_the_scaling_efficiency_and_the_loss_difference(tmp_path: Path) -> None:
    """benchmarks/ddp_report.py on two train_speed.py JSON files (1 and 2 GPUs) as ddp.sh names them."""
    report = load_benchmark("ddp_report")
    for world, img_s, losses in ((1, 1000.0, [2.0, 1.5, 1.0]), (2, 1800.0, [2.0, 1.6, 0.9])):
        run = dict(mode="graphed", step="graphed", arch="tiny", world=world, batch=64, ms=64e3 / img_s)
        run.update(img_s=img_s, img_s_per_gpu=img_s / world, all_losses=losses)
        data = dict(command=f"torchrun {world}", device="H200", date="today", results=[run])
        (tmp_path / f"speed_tiny_b64_np{world}.json").write_text(json.dumps(data))
    text = report.speed_report(tmp_path, tmp_path / "out")
    two = [line for line in text.splitlines() if line.startswith("| tiny_b64 |") and "| 2 |" in line]
    assert len(two) == 1 and "**0.90**" in two[0] and "0.0667 (0.1000) over 3 steps" in two[0]
    assert (tmp_path / "out" / "ddp_speed.md").read_text() in text
    assert report.trainer_report(tmp_path, tmp_path / "out", "") is None
