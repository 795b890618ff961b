"""The sign-folded rotary table and the roll-based rotation equal the reference formula."""

from __future__ import annotations

import pytest
import torch

from carpool.config import ModelConfig
from carpool.model.layers import RotaryEmbedding, apply_rotary, rope_inv_freq
from helpers.hf_models import save_tiny_hf_model


def _reference(x: torch.Tensor, positions: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """HF Llama: ``x * cos + rotate_half(x) * sin`` with ``rotate_half = cat(-x2, x1)``."""
    inv = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    freqs = torch.outer(positions.float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [T, 1, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * emb.cos() + rotated * emb.sin()


@pytest.mark.parametrize("arch", ["llama", "llama3"])
def test_rotary_matches_reference(tmp_path, arch):
    save_tiny_hf_model(arch, tmp_path)
    config = ModelConfig.from_json_file(tmp_path / "config.json")
    rotary = RotaryEmbedding(config)
    positions = torch.tensor([0, 1, 5, 17, 300, config.max_position_embeddings - 1])
    x = torch.randn(len(positions), 3, config.head_dim)
    cos, sin = rotary.cos_sin(positions, torch.float32)
    expected = _reference(x, positions, config)
    torch.testing.assert_close(apply_rotary(x, cos, sin), expected, rtol=1e-5, atol=1e-5)
    # In place into a strided view (how attention writes q and k back next to v).
    buf = torch.zeros(len(positions), 5, config.head_dim)
    view = buf[:, 1:4]
    view.copy_(x)
    apply_rotary(view, cos, sin, out=view)
    torch.testing.assert_close(buf[:, 1:4], expected, rtol=1e-5, atol=1e-5)
    assert buf[:, 0].abs().sum() == 0 and buf[:, 4].abs().sum() == 0


def test_table_cast_follows_device_and_dtype(tmp_path):
    save_tiny_hf_model("llama", tmp_path)
    config = ModelConfig.from_json_file(tmp_path / "config.json")
    rotary = RotaryEmbedding(config)
    pos = torch.tensor([3, 9])
    c32, s32 = rotary.cos_sin(pos, torch.float32)
    c16, s16 = rotary.cos_sin(pos, torch.bfloat16)
    assert c16.dtype == s16.dtype == torch.bfloat16
    torch.testing.assert_close(c16.float(), c32, rtol=1e-2, atol=1e-2)
    rotary.to(torch.float64)  # replaces the buffer: a stale cast must not be reused
    assert rotary.cos_sin_cached.dtype == torch.float64
    assert rotary.cos_sin(pos, torch.float64)[0].dtype == torch.float64
    torch.testing.assert_close(rotary.cos_sin(pos, torch.float32)[0], c32)
    # A cast made before a move is never handed out after it (cast_table checks no device:
    # the move itself drops the casts).
    assert rotary.cast_table(torch.bfloat16).device.type == "cpu"
    rotary.to("meta")
    assert rotary.cast_table(torch.bfloat16).device.type == "meta"
