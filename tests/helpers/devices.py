"""The torch devices the device-parametrized tests run on: the CPU always, CUDA when present.

``scripts/gpu_check.sh`` runs these tests on a GPU machine; on a CPU-only machine the CUDA
cases simply do not exist (no skip that always fires). The path a GPU takes is also checked
on every machine on torch's ``meta`` device (``tests/engine/test_meta_device.py``).
"""

from __future__ import annotations

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
