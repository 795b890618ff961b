"""Memory figures the engine and the planning tools share."""

from __future__ import annotations

import os

import torch


def available_memory_bytes(device: str = "cpu") -> int:
    """Memory free for new allocations on ``device`` right now.

    CPU: ``MemAvailable`` from /proc/meminfo (what the kernel can hand out without swapping),
    falling back to free physical pages. CUDA: ``torch.cuda.mem_get_info``.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
