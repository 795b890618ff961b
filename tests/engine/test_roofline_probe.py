"""The roofline probe's matmul dtype: a bf16 model's peak is float32's where bf16 is emulated."""

from __future__ import annotations

import torch

from carpool.bench import probes
from carpool.model import fused_ops


def test_bf16_peak_is_float32s_where_bf16_is_emulated(monkeypatch):
    monkeypatch.setattr(fused_ops, "_BF16_EMULATED", True)
    assert probes.peak_dtype(torch.bfloat16) == torch.float32
    assert probes.peak_dtype(torch.float32) == torch.float32
    assert probes.peak_dtype(torch.bfloat16, "meta") == torch.bfloat16  # not a CPU
    monkeypatch.setattr(fused_ops, "_BF16_EMULATED", False)
    assert probes.peak_dtype(torch.bfloat16) == torch.bfloat16


def test_roofline_names_the_dtype_it_probed(monkeypatch):
    monkeypatch.setattr(probes, "PROBE_SIZES", (64,))
    monkeypatch.setattr(probes, "memory_bandwidth", lambda device: 1e9)
    monkeypatch.setattr(fused_ops, "_BF16_EMULATED", True)
    roof = probes.measure_roofline(torch.bfloat16)
    assert roof.dtype == "float32" and roof.peak_flops > 0
    monkeypatch.setattr(fused_ops, "_BF16_EMULATED", False)
    assert probes.measure_roofline(torch.bfloat16).dtype == "bfloat16"
