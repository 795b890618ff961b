"""A long step's MLP in row chunks (``layers.MLP_CHUNK_ROWS``): the same results as the whole
step at once, a short tail joined to the chunk before it, quantized weights widened once per
step, and the engine's tokens unchanged."""

from __future__ import annotations

import pytest
import torch

from carpool.model import layers, quant
from carpool.model.loader import load_model
from carpool.worker.model_runner import prepare_model
from helpers.hf_models import first_difference, save_tiny_hf_model, save_tiny_model_dir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    save_tiny_hf_model("llama", d)
    return d


def _mlp(checkpoint, dtype: str, quantization: str | None):
    model, _ = load_model(checkpoint, dtype=dtype, quantization=quantization)
    prepare_model(model, "cpu")
    return model.model.layers[0].mlp


@pytest.mark.parametrize(
    "dtype,quantization",
    [("float32", None), ("float32", "int8"), ("float32", "int4"), ("bfloat16", None)],
)
def test_chunked_equals_the_whole_step(checkpoint, dtype, quantization, monkeypatch):
    mlp = _mlp(checkpoint, dtype, quantization)
    x = torch.randn(1030, mlp.gate_up_proj.in_features).to(getattr(torch, dtype))
    with torch.inference_mode():
        chunked = mlp(x)
        monkeypatch.setattr(layers, "MLP_CHUNK_ROWS", 1 << 30)
        whole = mlp(x)
    assert chunked.shape == whole.shape and chunked.dtype == whole.dtype
    # The same kernels on the same rows; only a GEMM's blocking may change with the row count.
    tol = 1e-2 if dtype == "bfloat16" else 1e-4
    torch.testing.assert_close(chunked, whole, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "rows,chunks",
    [
        (256, [256]),
        (257, [257]),
        (600, [256, 344]),
        (700, [256, 256, 188]),
        (1030, [256] * 3 + [262]),
    ],
)
def test_chunk_sizes_and_the_short_tail(checkpoint, rows, chunks, monkeypatch):
    mlp = _mlp(checkpoint, "float32", None)
    seen: list[int] = []
    swiglu = type(mlp)._swiglu
    monkeypatch.setattr(
        type(mlp), "_swiglu", lambda self, x: seen.append(len(x)) or swiglu(self, x)
    )
    with torch.inference_mode():
        mlp(torch.randn(rows, mlp.gate_up_proj.in_features))
    assert seen == chunks
    assert all(n > layers.MLP_MIN_CHUNK_ROWS for n in seen if rows > layers.MLP_CHUNK_ROWS)


@pytest.mark.usefixtures("finite_row_limits")  # the widened path (not this CPU's if AVX2)
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_weights_are_widened_once_per_step(checkpoint, quantization, monkeypatch):
    mlp = _mlp(checkpoint, "float32", quantization)
    made: list[torch.dtype] = []
    real = layers.widened

    def counting(owner, dtype, make, layout="plain"):
        return real(owner, dtype, lambda: made.append(dtype) or make(), layout)

    monkeypatch.setattr(quant, "widened", counting)
    with torch.inference_mode():
        mlp(torch.randn(1030, mlp.gate_up_proj.in_features))  # 4 chunks
        assert len(made) == 2, made  # gate_up and down, once each
        made.clear()
        mlp(torch.randn(200, mlp.gate_up_proj.in_features))  # one piece, no cache
        assert len(made) == 2, made
    assert layers._Widened.cache is None  # nothing kept after the step


def test_engine_tokens_unchanged_by_chunking(tmp_path, monkeypatch):
    from carpool import LLM, SamplingParams

    save_tiny_model_dir("llama", tmp_path)

    prompts = [[3 + (7 * i) % 300 for i in range(n)] for n in (300, 40, 290)]  # 630 tokens
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    kw = dict(dtype="float32", quantization="int4", max_num_batched_tokens=1024, max_num_seqs=4)
    got = [
        o.outputs[0].token_ids
        for o in LLM(tmp_path, **kw).generate(prompts, params, use_tqdm=False)
    ]
    monkeypatch.setattr(layers, "MLP_CHUNK_ROWS", 1 << 30)
    want = [
        o.outputs[0].token_ids
        for o in LLM(tmp_path, **kw).generate(prompts, params, use_tqdm=False)
    ]
    for g, w in zip(got, want, strict=True):
        assert g == w, first_difference(g, w)
