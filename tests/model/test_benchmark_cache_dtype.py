"""``benchmarks/profile_step.py`` allocates the KV cache dtype the engine would: a float32 model
with quantized matrices (a GGUF Q8_0/Q4 file, or ``--quantization``) gets a bfloat16 cache under
``auto`` (``kv_quant.effective_kv_cache_dtype``), as ``LLMEngine`` gives it. Before issue 11's
twenty-fourth pass the step benchmarks gave such models a float32 cache (twice the bytes)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from carpool.model.loader import load_model
from helpers.hf_models import save_tiny_hf_model

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _profile_step():
    if str(BENCHMARKS) not in sys.path:  # its `import checkout` (the benchmarks' own module)
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("profile_step", BENCHMARKS / "profile_step.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_step_benchmarks_allocate_the_engines_cache_dtype(tmp_path):
    ps = _profile_step()
    save_tiny_hf_model("llama", tmp_path)
    dense, _ = load_model(tmp_path, dtype="float32")
    quantized, _ = load_model(tmp_path, dtype="float32", quantization="int8")
    bf16, _ = load_model(tmp_path, dtype="bfloat16")
    assert ps.engine_cache_dtype(dense) == torch.float32
    assert ps.engine_cache_dtype(quantized) == torch.bfloat16  # not float32
    assert ps.engine_cache_dtype(quantized, "int8") == torch.int8
    assert ps.engine_cache_dtype(bf16) == torch.bfloat16
