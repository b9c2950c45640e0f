"""DDP across nodes: two ``torchrun`` launchers, one process each, meet through the c10d rendezvous as two nodes
(gloo on the CPU) and train the same weights as one process on the same global batch."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from train_kit import assert_same_weights_as_one, torchrun_command, torchrun_env

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


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> list[int]:
    """Every launcher's exit status; on time-out end each launcher's process group (its worker included)."""
    try:
        return [p.wait(timeout=timeout_s) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the group start_new_session made for this launcher
        for p in procs:
            p.wait()
        raise


@needs_gloo
def test_two_nodes_through_the_c10d_rendezvous_train_the_same_weights_as_one(
    single_run: dict, fmnist_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "nodes"
    endpoint = f"127.0.0.1:{_free_port()}"
    procs, logs = [], []
    for node in range(NODES):
        # The c10d rendezvous gives the global ranks in the order the nodes join (--node_rank is only a hint):
        # either node's process may be rank 0, which saves the checkpoint; both share tmp_path here.
        launcher = [f"--nnodes={NODES}", "--nproc_per_node=1", f"--node_rank={node}", "--rdzv_backend=c10d"]
        launcher += [f"--rdzv_endpoint={endpoint}", "--rdzv_id=avex-test-nodes", "--max_restarts=0"]
        log = tmp_path / f"node{node}.log"
        with log.open("wb") as f:  # a file, not a pipe: a full pipe would stall the process
            cmd = torchrun_command(launcher, fmnist_root, out)
            procs.append(
                subprocess.Popen(
                    cmd, env=torchrun_env(), cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        logs.append(log)
    codes = _wait_all(procs, TIMEOUT_S)
    assert codes == [0] * NODES, "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
    assert_same_weights_as_one(single_run["checkpoint"], out, world=NODES)


def test_a_local_rank_beyond_the_nodes_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))  # one process more than this node's GPUs
    with pytest.raises(ValueError, match=r"at most one process per GPU \(torchrun --nproc_per_node\)"):
        setup_distributed("cuda")
