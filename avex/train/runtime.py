"""Where a run executes: its processes (one, or one per GPU under ``torchrun``), its device, its precision."""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist

__all__ = ["autocast", "setup_distributed", "teardown_distributed"]


def autocast(device: torch.device, amp: bool) -> torch.autocast:
    """bf16 autocast on CUDA when ``amp``; a no-op elsewhere (CPU always runs fp32)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp)
    return torch.autocast(device_type="cpu", enabled=False)


def setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's RANK / WORLD_SIZE / LOCAL_RANK; joins the process group.

    One node or several: RANK and WORLD_SIZE count the processes of every node (they pick the rows of each global
    batch and rank 0, which evaluates and saves), LOCAL_RANK only this node's (it picks the GPU). The rendezvous,
    c10d (``--rdzv_endpoint``) or static (``--master_addr/--master_port``), hands MASTER_ADDR / MASTER_PORT to
    ``init_process_group``'s default ``env://``.

    ``device_arg`` None picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; a bare ``cuda``
    also becomes ``cuda:LOCAL_RANK``, so one command line serves every rank of every node.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local)
    else:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        # Caught here rather than as CUDA's "invalid device ordinal": more processes than GPUs on this node.
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device} (LOCAL_RANK {local}) but this node has {torch.cuda.device_count()} GPU(s): "
                "start at most one process per GPU (torchrun --nproc_per_node), or pass --device cpu"
            )
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def teardown_distributed(world: int) -> None:
    """Wait for every rank (rank 0 evaluates and saves alone), then leave the process group.

    Call it once the run's DDP and its tensors are released: freed after the group is destroyed, a DDP once left a
    process stuck on its way out (a gloo worker of the tests, CI 2026-12-03); ``gc.collect`` takes their cycles.
    """
    if world > 1:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
