"""The one description of the machine that benchmark and training reports name."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["device_name", "synchronize"]


def device_name(device: str | torch.device = "cpu") -> str:
    """'NVIDIA H100 80GB HBM3' for a CUDA device; the CPU model, cores and torch threads otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads)"


def synchronize(device: str | torch.device = "cpu") -> None:
    """Wait for the device's queued work (a no-op off CUDA): timers read after it measure finished work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
