"""What the machine has: free and total memory of a device, and a model's shape without weights."""

from __future__ import annotations

import os
from pathlib import Path

from carpool.errors import ModelLoadError
from carpool.model_config import ModelConfig


def available_memory_bytes(device: str = "cpu") -> int:
    """Memory free for new allocations on ``device`` right now.

    CPU: ``MemAvailable`` from /proc/meminfo (what the kernel can hand out without swapping),
    falling back to free physical pages. CUDA: ``torch.cuda.mem_get_info``.
    """
    if device.startswith("cuda"):
        import torch  # only here: the planning commands must not load torch for a CPU figure

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_memory_bytes(device: str = "cpu") -> int:
    """Total memory of ``device``: the GPU's, or the machine's physical memory for a CPU."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def read_model_config(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of a model directory, a ``.gguf`` file or a bare ``config.json``.

    No weights are read, so a 70B model can be planned on a laptop.

    Raises:
        ModelLoadError: the path does not exist or does not describe a supported model.
    """
    path = Path(path)
    if path.is_dir():
        return ModelConfig.from_json_file(path / "config.json")
    if path.is_file() and path.suffix == ".gguf":
        from carpool.model.gguf_loader import read_gguf_config

        return read_gguf_config(path)
    if path.is_file():
        return ModelConfig.from_json_file(path)
    raise ModelLoadError(f"{path}: no such model directory, .gguf file or config.json")
