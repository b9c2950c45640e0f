"""DDP across nodes: two ``torchrun`` launchers, one process each, meet through the c10d rendezvous as two nodes
(gloo on the CPU) and train the same weights as one process on the same global batch."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from train_kit import assert_same_weights_as_one, run_launchers, spawn_within, torchrun_command

from avex.train.runtime import setup_distributed

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not built in"
)

NODES = 2
TIMEOUT_S = 120  # for both nodes together; about 15 s on two shared cores


def _free_port() -> int:
    """A TCP port nobody listens on now: the one the OS gives a socket bound to port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@needs_gloo
def test_two_nodes_through_the_c10d_rendezvous_train_the_same_weights_as_one(
    single_run: dict, fmnist_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "nodes"
    endpoint = f"127.0.0.1:{_free_port()}"
    cmds = []
    for node in range(NODES):
        # The c10d rendezvous gives the global ranks in the order the nodes join (--node_rank is only a hint):
        # either node's process may be rank 0, which saves the checkpoint; both share tmp_path here.
        launcher = [f"--nnodes={NODES}", "--nproc_per_node=1", f"--node_rank={node}", "--rdzv_backend=c10d"]
        launcher += [f"--rdzv_endpoint={endpoint}", "--rdzv_id=avex-test-nodes", "--max_restarts=0"]
        cmds.append(torchrun_command(launcher, fmnist_root, out))
    done = run_launchers(cmds, tmp_path, TIMEOUT_S)
    logs = "\n".join(f"--- node {i}\n{log[-3000:]}" for i, (_, log) in enumerate(done))
    assert [code for code, _ in done] == [0] * NODES, logs
    assert_same_weights_as_one(single_run["checkpoint"], out, world=NODES)


def test_a_local_rank_beyond_the_nodes_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))  # one process more than this node's GPUs
    with pytest.raises(ValueError, match=r"at most one process per GPU \(torchrun --nproc_per_node\)"):
        setup_distributed("cuda")


def test_a_launcher_past_its_time_is_ended_with_the_workers_in_sessions_of_their_own(tmp_path: Path) -> None:
    """run_launchers' time-out: torchrun's workers run in sessions of their own, and none may outlive the test."""
    worker = "import time; time.sleep(300)"
    launcher = (
        "import subprocess, sys, time; "
        f"w = subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True); "
        "print('worker', w.pid, flush=True); time.sleep(300)"
    )
    with pytest.raises(pytest.fail.Exception, match="did not finish within 3 s") as failed:
        run_launchers([[sys.executable, "-c", launcher]], tmp_path, timeout_s=3)
    pid = int(str(failed.value).split("worker ")[1].split()[0])
    assert _gone(pid), f"the worker {pid} outlived its launcher's time-out"


def _gone(pid: int) -> bool:
    """No such process, or only its exit status left (a zombie whose new parent has not reaped it yet)."""
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in "ZX":
            return True
        time.sleep(0.1)
    return False


def _sleeper(rank: int, seconds: float) -> None:
    time.sleep(seconds)


def test_spawned_workers_past_their_time_are_ended() -> None:
    """spawn_within's time-out fails the test in time and leaves no worker behind."""
    import multiprocessing

    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="did not finish within 2 s"):
        spawn_within(_sleeper, (300.0,), 2, timeout_s=2)
    assert time.monotonic() - start < 60
    assert multiprocessing.active_children() == []
