"""``carpool memory`` (the real process): parameters at any size, a warning past the model's
context, activations following the engine's chunked prefill."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from carpool.config import EngineConfig
from carpool.entrypoints.memory import format_count


def _memory(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "carpool.cli", "memory", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (4_021_760, "4.0M"),
        (134_515_008, "135M"),
        (1_235_814_400, "1.24B"),
        (70_553_706_496, "70.6B"),
        (512, "512"),
        (86_000, "86.0K"),
    ],
)
def test_parameter_counts_read_right_at_any_size(n, text):
    assert format_count(int(n)) == text


def test_small_model_parameters_context_warning_and_chunked_activations(tmp_path):
    proc = _memory("--model", "embedded")
    assert proc.returncode == 0, proc.stderr
    assert "4.0M parameters" in proc.stdout and "0.00B" not in proc.stdout
    assert "batch 16 x 1024 tokens" in proc.stdout  # default: the model's context
    assert "warning" not in proc.stderr

    long = _memory("--model", "embedded", "--seq-len", "4096")
    assert long.returncode == 0
    assert "--seq-len 4096 is above the model's context of 1024 tokens" in long.stderr

    # Activations follow the engine's chunking: the default is the engine's chunk, and a
    # bigger chunk (the whole 16 x 1024 batch in one pass) needs more memory.
    out_default, out_whole = tmp_path / "a.json", tmp_path / "b.json"
    assert _memory("--model", "embedded", "--output", str(out_default)).returncode == 0
    whole = ["--max-num-batched-tokens", str(16 * 1024), "--output", str(out_whole)]
    assert _memory("--model", "embedded", *whole).returncode == 0
    chunked = json.loads(out_default.read_text())["estimate"]["activations"]
    one_pass = json.loads(out_whole.read_text())["estimate"]["activations"]
    assert chunked < one_pass
    help_text = _memory("--help").stdout
    assert f"{EngineConfig.max_num_batched_tokens})" in help_text
