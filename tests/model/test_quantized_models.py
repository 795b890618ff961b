"""Quantized models end to end: GGUF Q8_0/Q4_0/Q4_1 kept quantized, ``--quantization`` on a
Hugging Face checkpoint, and the resident weight bytes ``carpool memory`` predicts."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import torch
from gguf import GGUFReader

from carpool import LLM, LLMEngine, SamplingParams
from carpool.capacity import resident_weight_bytes, weight_bytes_for
from carpool.config import EngineConfig
from carpool.errors import ModelLoadError
from carpool.model import fused_ops, quant
from carpool.model.gguf_loader import GGUFCheckpoint
from carpool.model.loader import load_model
from carpool.model.quant import (
    Int4Linear,
    Int8Linear,
    QuantizedEmbedding,
    QuantizedLinear,
    quantize_linear,
)
from carpool.model.quant_loader import combined_plan, resolve_plan
from carpool.model.quant_plan import matrix_shapes
from helpers.carpool_ref import assert_same_top1_where_clear, greedy, prompt_logits
from helpers.gguf_export import export_hf_to_gguf
from helpers.hf_models import first_difference, save_tiny_model_dir

PROMPT = [1, 17, 200, 33, 5, 250, 12, 99, 7, 64, 128, 31]
KERNEL = {"Q8_0": Int8Linear, "Q4_0": Int4Linear, "Q4_1": Int4Linear}
# Max abs prompt-logit difference, quantized vs the file's dequantized model (logits up to ~6
# on these deliberately high-variance random weights), measured then doubled:
# - Q8_0: 0.27 (fp32) / 0.37 (bf16): Q8_0's per-block scales re-rounded to one per row;
# - Q4_x in bf16: 0.12-0.23: scales and zeros rounded fp16 -> bf16, weights not widened to bf16;
# - Q4_x in float32: 0.08-0.11: the same scale rounding, and the quantized matmuls' inputs
#   rounded to bf16 (their kernels' float32 paths are 15-100x slower; see quant.py).
LOGIT_BOUND = {("Q8_0", "float32"): 0.6, ("Q8_0", "bfloat16"): 0.8}
LOGIT_BOUND.update({(t, d): 0.5 for t in ("Q4_0", "Q4_1") for d in ("float32", "bfloat16")})
LOGIT_BOUND.update({(t, "float32"): 0.25 for t in ("Q4_0", "Q4_1")})
# K- and i-quant files (hidden 256, intermediate 512: logits up to ~12-14) against the modules'
# own dequantized weights: the matmuls' inputs rounded to bf16, measured Q4_K 1.25 (llama) /
# 0.34 (qwen2), Q4_K_M 2.03 / 0.51, Q5_0 (all int8) 0.25 / 0.23, IQ4_NL 0.17 / 0.40, doubled (a
# Q4_1 file of the same model against its dequantized one: 0.26-0.40; these random models
# amplify a difference through their layers).
K_QUANT_INPUT_ROUNDING_BOUND = {"Q4_K": 2.5, "Q4_K_M": 4.0, "Q5_0": 0.5, "IQ4_NL": 0.8}
# --quantization int8/int4 against the same dequantized weights in float32: only the bf16
# rounding of the matmuls' inputs and outputs (measured 0.07-0.12).
INPUT_ROUNDING_BOUND = 0.25


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: tied head, q/k/v biases
def checkpoint(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"quant-{request.param}")
    save_tiny_model_dir(request.param, d / "hf")
    files = {
        ft: export_hf_to_gguf(d / "hf", d / f"model-{ft}.gguf", ft, tokenizer=d / "hf")
        for ft in KERNEL
    }
    return d / "hf", files


@pytest.mark.parametrize("ftype", list(KERNEL))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_gguf_against_its_dequantized_model(checkpoint, ftype, dtype):
    _, files = checkpoint
    quant, config = load_model(files[ftype], dtype=dtype)
    dense, _ = load_model(files[ftype], dtype=dtype, quantization="none")
    assert isinstance(quant.model.layers[0].mlp.down_proj, KERNEL[ftype])
    assert isinstance(quant.model.embed_tokens, QuantizedEmbedding)
    if config.tie_word_embeddings:
        assert quant.lm_head is quant.model.embed_tokens.source
    assert not any(isinstance(m, QuantizedLinear) for m in dense.modules())
    got, expected = prompt_logits(quant, PROMPT), prompt_logits(dense, PROMPT)
    diff = float((got - expected).abs().max())
    bound = LOGIT_BOUND[ftype, dtype]
    assert diff <= bound, f"{ftype} {dtype}: logit diff {diff:.4f}"
    assert_same_top1_where_clear(got, expected, bound / 2)


@pytest.mark.parametrize("ftype", list(KERNEL))
def test_resident_weights_within_1_3x_the_file_and_as_predicted(checkpoint, ftype):
    _, files = checkpoint
    # bfloat16 scales and dense tensors: within 1.3x of the file.
    model, config = load_model(files[ftype], dtype="bfloat16")
    measured = resident_weight_bytes(model)
    file_bytes = sum(int(t.n_bytes) for t in GGUFReader(files[ftype]).tensors)
    assert measured <= 1.3 * file_bytes, (measured, file_bytes)
    plan = combined_plan(*resolve_plan(config, GGUFCheckpoint(files[ftype]).types, None))
    assert measured == weight_bytes_for(config, 2, plan)
    dense, _ = load_model(files[ftype], quantization="none", dtype="bfloat16")
    assert resident_weight_bytes(dense) == weight_bytes_for(config, 2, None)
    # The default (auto) computes a quantized file in float32: dense tensors take 4 bytes, the
    # scales stay bf16 (int4 groups of 32: 16 B of codes + 4 B of scale/zero), as predicted.
    auto, auto_config = load_model(files[ftype])
    assert auto_config.torch_dtype == "float32"
    assert resident_weight_bytes(auto) == weight_bytes_for(config, 4, plan)


def _dense_holding(quant: torch.nn.Module, path, dtype: str) -> torch.nn.Module:
    """The dense model of ``path`` with every matrix replaced by ``quant``'s dequantized one."""
    dense, config = load_model(path, dtype=dtype, quantization="none")
    with torch.no_grad():
        for name in matrix_shapes(config):
            module = quant.get_submodule(name)
            if isinstance(module, QuantizedEmbedding):
                dense.model.embed_tokens.weight.copy_(module.source.dequantize())
            else:
                dense.get_submodule(name).weight.copy_(module.dequantize())
    return dense


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_hf_quantization_equals_its_dequantized_weights(checkpoint, method):
    hf_dir, _ = checkpoint
    quant, _ = load_model(hf_dir, dtype="float32", quantization=method)
    kernel = Int8Linear if method == "int8" else Int4Linear
    assert all(
        isinstance(quant.get_submodule(f"model.layers.{i}.{m}"), kernel)
        for i in range(len(quant.model.layers))
        for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    )
    dense = _dense_holding(quant, hf_dir, "float32")
    got, expected = prompt_logits(quant, PROMPT), prompt_logits(dense, PROMPT)
    diff = float((got - expected).abs().max())
    assert diff <= INPUT_ROUNDING_BOUND, f"{method}: logit diff {diff:.2e}"
    assert_same_top1_where_clear(got, expected, INPUT_ROUNDING_BOUND / 2)
    # Rounding the matmuls' inputs is all that differs: with it undone (the module fed values
    # already in bf16, as the dense reference then is too) the two agree to float32 rounding.
    layer = quant.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features).bfloat16().float()
    ref = torch.nn.functional.linear(x, dense.model.layers[0].mlp.down_proj.weight)
    torch.testing.assert_close(layer(x), ref, rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_hf_quantization_as_read_equals_quantizing_the_loaded_dense_model(
    checkpoint, method, dtype, monkeypatch
):
    # --quantization quantizes each dense tensor as it is read (its shards apart), never holding
    # the dense model: every buffer is the one quantize_linear gives the loaded dense model's
    # modules (the route it replaced), for a separate head (llama) and a tied one (qwen2).
    # A fused matrix's shards are written into it as they come, where they fit (int8: all;
    # int4: where every shard is whole blocks of the packed layout, else they are joined).
    from carpool.model import quant_loader
    from carpool.model.gguf_quant import QuantWeight

    calls = {"write": 0, "concat": 0}
    write, concat = quant_loader._write_rows, QuantWeight.concat

    def counted_write(*args):
        calls["write"] += 1
        return write(*args)

    def counted_concat(parts):
        calls["concat"] += 1
        return concat(parts)

    monkeypatch.setattr(quant_loader, "_write_rows", counted_write)
    monkeypatch.setattr(QuantWeight, "concat", staticmethod(counted_concat))
    hf_dir, _ = checkpoint
    quant, _ = load_model(hf_dir, dtype=dtype, quantization=method)
    layers = len(quant.model.layers)
    assert calls["write"] >= 2 * layers, calls  # gate and up at least, in every layer
    if method == "int8":
        assert calls["concat"] == 0, calls
    dense, config = load_model(hf_dir, dtype=dtype, quantization="none")
    plan = combined_plan(*resolve_plan(config, None, method))
    assert set(plan.values()) == {method}
    for name in plan:
        got = quant.get_submodule(name)
        if name == "model.embed_tokens":
            got = got.source
            ref = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            ref.weight = dense.model.embed_tokens.weight
        else:
            ref = dense.get_submodule(name)
        expected = quantize_linear(ref, method, getattr(torch, dtype)).state_dict()
        assert list(got.state_dict()) == list(expected), name
        for key, value in expected.items():
            assert torch.equal(got.state_dict()[key], value), f"{name}.{key}"
    if config.tie_word_embeddings:
        assert quant.lm_head is quant.model.embed_tokens.source


@pytest.mark.parametrize("method", ["none", "int8", "int4"])
def test_large_tensors_read_in_row_slices_load_the_same_model(checkpoint, monkeypatch, method):
    # Past the loader's budget a tensor comes as a StoredTensor, copied or quantized a slice of
    # rows at a time (at a budget of 1 byte: every matrix here, in slices of 3-7 rows): every
    # buffer is the one a whole read gives.
    from carpool.model import loader, quant, stored_tensor

    hf_dir, _ = checkpoint
    whole, _ = load_model(hf_dir, dtype="bfloat16", quantization=method)
    monkeypatch.setattr(loader, "_MAPPED_BYTES", 1)
    monkeypatch.setattr(stored_tensor, "SLICE_BYTES", 3 * 64 * 4)
    monkeypatch.setattr(quant, "_QUANTIZE_SLICE_VALUES", 7 * 64)
    sliced, _ = load_model(hf_dir, dtype="bfloat16", quantization=method)
    expected, got = whole.state_dict(), sliced.state_dict()
    assert list(expected) == list(got)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_hf_quantization_rejects_a_wrong_shape(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    hf_dir, _ = checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.k_proj.weight"][1:]
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"k_proj.weight.*has shape"):
        load_model(bad, quantization="int4")


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantization_flag_through_llm(checkpoint, method):
    hf_dir, _ = checkpoint
    # One prompt per call: a quantized matmul computes in bf16, and a batch whose rows cross a
    # kernel's widening threshold (the engine's 17-token prefill of both prompts, int8's 16)
    # rounds differently from the one-prompt reference; these random weights have near-ties.
    llm = LLM(str(hf_dir), dtype="float32", quantization=method)
    model = llm.engine.model
    assert isinstance(model.lm_head, Int8Linear if method == "int8" else Int4Linear)
    # A float32 model with quantized matrices stores K/V in bfloat16 by default (as llama.cpp
    # stores f16): the reference decodes on the same cache dtype.
    assert llm.engine.config.kv_cache_dtype == "bfloat16"
    kv_dtype = llm.engine.runner.kv_caches[0].dtype
    assert kv_dtype == torch.bfloat16
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    out = [llm.generate([p], params, use_tqdm=False)[0] for p in (PROMPT, PROMPT[:5])]
    for o, prompt in zip(out, [PROMPT, PROMPT[:5]], strict=True):
        # The prompt rows' path as the engine's (on AMX they take the widened weight).
        runner = llm.engine.runner
        expected = greedy(
            model,
            prompt,
            16,
            kv_dtype=kv_dtype,
            wide_from=runner.wide_from,
            kernel_below=runner.kernel_below,
        )
        assert o.outputs[0].token_ids == expected, first_difference(
            o.outputs[0].token_ids, expected
        )
    dense_bytes = weight_bytes_for(llm.engine.model_config, 4)
    assert resident_weight_bytes(model) < (0.6 if method == "int8" else 0.4) * dense_bytes


def test_quantization_value_is_checked():
    from carpool.config import EngineConfig

    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int3")


@pytest.mark.parametrize("ftype", ["HF", "Q8_0", "Q4_1"])  # an HF directory and GGUF files
@pytest.mark.parametrize("quantization", [None, "int8", "none"])
def test_carpool_memory_reports_the_engines_resident_weights(
    checkpoint, ftype, quantization, tmp_path
):
    import json

    from carpool.cli import main

    hf_dir, files = checkpoint
    path = hf_dir if ftype == "HF" else files[ftype]
    out = tmp_path / "mem.json"
    argv = ["memory", "--model", str(path), "--batch-size", "2", "--seq-len", "64"]
    argv += ["--output", str(out)] + (["--quantization", quantization] if quantization else [])
    assert main(argv) == 0
    reported = json.loads(out.read_text())["estimate"]["weights"]
    model, _ = load_model(path, quantization=quantization)  # the engine's loader
    assert reported == resident_weight_bytes(model)


def test_engine_flag_reaches_the_config():
    import argparse

    from carpool.entrypoints.engine_args import add_engine_arguments, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_config_from_args(parser.parse_args([])).quantization is None
    args = parser.parse_args(["--quantization", "int4"])
    assert engine_config_from_args(args).quantization == "int4"
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "fp4"])


def test_gguf_plan_dequantizes_types_without_a_kernel_and_says_so(caplog):
    import logging

    from carpool.bench.random_model import PRESETS
    from carpool.config import ModelConfig
    from carpool.model.quant_loader import gguf_plan

    p = PRESETS["tiny"]
    config = ModelConfig(
        architecture="llama",
        vocab_size=p["vocab_size"],
        hidden_size=p["hidden_size"],
        intermediate_size=p["intermediate_size"],
        num_hidden_layers=1,
        num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_key_value_heads"],
        head_dim=p["hidden_size"] // p["num_attention_heads"],
        tie_word_embeddings=True,
    )
    a, m = "model.layers.0.self_attn.", "model.layers.0.mlp."
    types = {
        "model.embed_tokens.weight": "Q8_0",
        a + "q_proj.weight": "Q4_K",  # q/k/v in both kernels' types: one int8 matrix
        a + "k_proj.weight": "Q4_K",
        a + "v_proj.weight": "Q6_K",
        a + "o_proj.weight": "Q4_1",
        m + "gate_proj.weight": "Q4_K",  # Q4_K: int4 groups of 32
        m + "up_proj.weight": "F16",  # a dense shard: the whole matrix dense
        m + "down_proj.weight": "Q5_K",  # other K-quants and Q5_x: re-rounded to int8
        "model.layers.0.input_layernorm.weight": "F32",
    }
    with caplog.at_level(logging.INFO, logger="carpool.model.quant_loader"):
        plan = gguf_plan(config, types)
    assert plan == {
        "model.embed_tokens": "int8",
        a + "qkv_proj": "int8",
        a + "o_proj": "int4",
        m + "gate_up_proj": None,
        m + "down_proj": "int8",
    }
    logged = caplog.text
    assert "gate_up_proj" in logged and "F16" in logged and "Q4_K" in logged
    rerounded = next(line for line in logged.splitlines() if "re-rounded to int8" in line)
    assert "['Q4_K', 'Q5_K', 'Q6_K']" in rerounded  # Q4_K: q/k beside an int8 v
    assert "qkv_proj" not in logged


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_prompt_longer_than_a_steps_tokens_on_a_quantized_head(checkpoint, method):
    # A prompt in several chunks: the steps before its last sample no row, and the head (an
    # int8 one's float32 rescoring took zero rows to its kernel, which refused them) is
    # skipped; the request completes with the tokens of its prompt computed in one step.
    hf_dir, _ = checkpoint
    prompt = [(7 * i) % 250 + 3 for i in range(40)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    chunked = LLM(str(hf_dir), dtype="float32", quantization=method, max_num_batched_tokens=16)
    out = chunked.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 8
    whole = LLM(str(hf_dir), dtype="float32", quantization=method)
    expected = whole.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert out.token_ids == expected, first_difference(out.token_ids, expected)


@pytest.fixture(params=["every row count", "this CPU's", "prompts widened", "from 24"])
def row_limits(request, monkeypatch) -> Iterator[str]:
    """The test once with the quantized kernels at every row count (the default where bf16 is
    emulated) and no prompt row widened; once with this CPU's own limits and choice of
    ``quant.wide_prompt_from`` (AMX: every prompt row of an int8 layer through the widened
    weight, an int4 layer's through the kernels), where the
    limits keep one sum order (``fused_ops.rows_invariant``; elsewhere a prefill's rows take
    the widened GEMM); and twice with prompt rows through the widened weight on any CPU
    (``row_paths``; int4 layers too), from the default position and from 24 (a boundary inside
    a prompt's first chunk), the path then asserted taken."""
    if request.param == "every row count":
        request.getfixturevalue("kernels_at_every_row_count")
        monkeypatch.setattr(quant, "WIDE_PROMPT_HERE", False)
    elif request.param == "this CPU's" and not fused_ops.rows_invariant():
        pytest.skip("AVX-512 without BF16: a prefill's rows take the widened GEMM here")
    widened = []
    forced = request.param in ("prompts widened", "from 24")
    if forced:
        if not fused_ops.rows_invariant():
            request.getfixturevalue("kernels_at_every_row_count")
        monkeypatch.setattr(quant, "WIDE_PROMPT_HERE", True)
        monkeypatch.setattr(quant, "WIDE_INT4_PROMPTS", True)  # Q4_1's layers widen too
        if request.param == "from 24":
            monkeypatch.setattr(quant, "WIDE_PROMPT_FROM", 24)
        for cls in (quant.Int8Linear, quant.Int4Linear):
            product = cls._wide_product

            def counted(self, x2, out=None, product=product):  # noqa: ANN001, ANN202
                widened.append(x2.shape[0])
                return product(self, x2, out)

            monkeypatch.setattr(cls, "_wide_product", counted)
    yield request.param
    assert not forced or widened, "no row took the widened weight"


@pytest.mark.usefixtures("row_limits")
@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_1"])
def test_a_decoding_requests_logprobs_do_not_depend_on_the_prompts_beside_it(checkpoint, ftype):
    # A request decodes alone, then again while two other requests' 200-token prompts arrive
    # (steps of 200-400 rows beside its one). The quantized kernels take every row count (the
    # default where bf16 is emulated, see fused_ops.ANY_ROWS): its logprobs are the same bits.
    # With the widened GEMM taking steps of more than 128 rows they moved (up to 0.06 on the
    # default SmolLM2 Q4_1 model) and greedy tokens could differ between batching strategies.
    # With this CPU's own limits too where they keep one sum order (fused_ops.rows_invariant:
    # on AVX-512 BF16 a Q8_0 decode row took int8_gemv's FMAs alone and int8_dot's pairs in a
    # long step, other bits, until its int8_gemv ran int8_dot's loop).
    _, files = checkpoint
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=1)

    def decode(arrivals: dict[int, list[int]]) -> tuple[list[int], list[float]]:
        engine = LLMEngine(EngineConfig(model=str(files[ftype])))
        engine.add_request(PROMPT, params, request_id="x")
        step, done = 0, None
        while engine.has_unfinished():
            if step in arrivals:
                engine.add_request(arrivals[step], params, request_id=f"arrival-{step}")
            for out in engine.step():
                if out.request_id == "x" and out.finished:
                    done = out.outputs[0]
            step += 1
        assert done is not None
        return done.token_ids, [lp.logprob for lp in done.logprobs]

    alone = decode({})
    busy = decode({3: [(5 * i) % 300 + 10 for i in range(200)], 9: list(range(20, 220))})
    assert busy == alone


QUANT_TYPES = ("Q4_1", "Q8_0")


@pytest.fixture(scope="module")
def smollm2_shaped(tmp_path_factory):
    """Q4_1 and Q8_0 GGUF files of SmolLM2's attention shape (9 heads over 3 KV heads of 64, hidden
    576), 4 layers: the default model's setup (float32 activations, a bf16 cache, int4 layers;
    or int8 ones), where torch's SDPA rounding differences between call shapes show."""
    d = tmp_path_factory.mktemp("smollm2-shaped")
    hf = d / "hf"
    save_tiny_model_dir(
        "llama",
        hf,
        hidden_size=576,
        num_hidden_layers=4,
        num_attention_heads=9,
        num_key_value_heads=3,
    )
    return {f: export_hf_to_gguf(hf, d / f"model-{f}.gguf", f, tokenizer=hf) for f in QUANT_TYPES}


@pytest.mark.usefixtures("row_limits")
@pytest.mark.parametrize("ftype", QUANT_TYPES)
def test_every_strategy_computes_the_same_logprobs_on_a_quantized_model(smollm2_shaped, ftype):
    # Prompts cut into chunks at other places by each strategy (a 160-token budget shared by the
    # requests of a step, or taken by one request at a time; steps of more than 128 rows) give
    # the same logprobs, bit for bit: the quantized kernels at every row count, prompt attention
    # in tiles at fixed positions (batch.PREFILL_TILE_ROWS). Before, the default SmolLM2 model's
    # greedy tokens differed between sequential and continuous batching. With this CPU's own
    # limits too where they keep one sum order (fused_ops.rows_invariant; a Q8_0 model's decode
    # rows took other sums in steps of 1-8 rows than in longer ones on AVX-512 BF16 until
    # int8_gemv ran int8_dot's loop, and a small head's logits took int8_logits only up to 8
    # sampled rows: this test failed on both).
    lengths = [5, 41, 70, 150, 230, 300, 420, 510] + [37 + 53 * k for k in range(16)]
    prompts = [[(11 * i + n) % 300 + 10 for i in range(n)] for n in lengths]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=1)

    def run(**kw):  # noqa: ANN003
        llm = LLM(str(smollm2_shaped[ftype]), max_num_batched_tokens=160, max_num_seqs=12, **kw)
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [[(lp.token_id, lp.logprob) for lp in o.outputs[0].logprobs] for o in outs]

    sequential = run(batching="sequential")
    for kw in (
        dict(batching="continuous"),
        dict(batching="static", batch_size=3),
        # The padded layout: pads through the model, real rows the ragged batch's bits.
        dict(batching="static", batch_size=3, layout="padded"),
    ):
        assert run(**kw) == sequential, kw


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: tied head, q/k/v biases
def q4_k_checkpoint(request, tmp_path_factory):
    """Q4_K, (simplified) Q4_K_M, Q5_0 and IQ4_NL GGUF files of one model whose rows are
    multiples of 256 (a K-quant super-block): ``{ftype: path}``."""
    d = tmp_path_factory.mktemp(f"q4k-{request.param}")
    save_tiny_model_dir(request.param, d / "hf", hidden_size=256, intermediate_size=512)
    return {
        ft: export_hf_to_gguf(d / "hf", d / f"model-{ft}.gguf", ft, tokenizer=d / "hf")
        for ft in ("Q4_K", "Q4_K_M", "Q5_0", "IQ4_NL")
    }


# The kernel each matrix of the Q4_K_M file takes: q/k in Q4_K beside v in Q6_K, one int8
# matrix; ffn_down and output Q6_K, int8; the rest Q4_K, int4.
Q4_K_M_KERNELS = {
    "self_attn.qkv_proj": Int8Linear,
    "self_attn.o_proj": Int4Linear,
    "mlp.gate_up_proj": Int4Linear,
    "mlp.down_proj": Int8Linear,
}


@pytest.mark.parametrize("ftype", ["Q4_K", "Q4_K_M", "Q5_0", "IQ4_NL"])
def test_k_quant_gguf_kept_quantized(q4_k_checkpoint, ftype):
    # Q4_K's sub-blocks of 32 are int4 groups (scale d sc, minimum -dmin m), Q6_K's, Q5_0's and
    # IQ4_NL's weights are re-rounded to int8 with one scale per row: every matrix kept
    # quantized, the embedding too.
    path = q4_k_checkpoint[ftype]
    types = set(GGUFCheckpoint(path).types.values())
    own = {"Q4_K": ["Q4_K"], "Q4_K_M": ["Q4_K", "Q6_K"]}.get(ftype, [ftype])
    assert types == {"F32", *own}
    quant, config = load_model(path, dtype="float32")
    for name in matrix_shapes(config):
        module = quant.get_submodule(name)
        inner = module.source if isinstance(module, QuantizedEmbedding) else module
        want = Int8Linear if ftype in ("Q5_0", "IQ4_NL") else Int4Linear
        if ftype == "Q4_K_M":
            want = (
                Int8Linear
                if name == "lm_head"
                else Q4_K_M_KERNELS.get(name.split(".", 3)[-1], Int4Linear)
            )
        assert isinstance(inner, want), (name, type(inner))
    # Each matrix is its codes' weights (scales and zeros in bf16) to the kernels' rounding of
    # their outputs to bf16.
    for name in ("self_attn.qkv_proj", "mlp.down_proj"):
        layer = quant.model.layers[0].get_submodule(name)
        x = torch.randn(3, layer.in_features).bfloat16().float()
        ref = torch.nn.functional.linear(x, layer.dequantize().float())
        torch.testing.assert_close(layer(x), ref, rtol=2**-7, atol=1e-5)
    # The model against a dense one holding the modules' own weights: the matmuls' inputs
    # rounded to bf16, through two layers of these random models (logits up to ~12).
    got = prompt_logits(quant, PROMPT)
    holding = prompt_logits(_dense_holding(quant, path, "float32"), PROMPT)
    diff = float((got - holding).abs().max())
    assert diff <= K_QUANT_INPUT_ROUNDING_BOUND[ftype], f"{ftype}: logit diff {diff:.4f}"


@pytest.mark.parametrize("ftype", ["Q4_K", "Q4_K_M", "Q5_0", "IQ4_NL"])
def test_k_quant_resident_weights_as_predicted(q4_k_checkpoint, ftype):
    # Within 1.3x the file's tensor bytes (measured 1.10 / 1.24: Q6_K's 6.6 bits a weight and
    # Q4_K_M's q/k become int8 bytes; Q4_K's 4.5 bits, int4 with a bf16 scale and zero a group);
    # Q5_0's 5.5 bits become a byte: 1.46x; IQ4_NL's 4.5: 1.78x.
    path = q4_k_checkpoint[ftype]
    model, config = load_model(path, dtype="bfloat16")
    measured = resident_weight_bytes(model)
    file_bytes = sum(int(t.n_bytes) for t in GGUFReader(path).tensors)
    bound = {"Q5_0": 1.5, "IQ4_NL": 1.9}.get(ftype, 1.3)
    assert measured <= bound * file_bytes, (measured, file_bytes)
    plan = combined_plan(*resolve_plan(config, GGUFCheckpoint(path).types, None))
    assert None not in plan.values()
    assert measured == weight_bytes_for(config, 2, plan)
