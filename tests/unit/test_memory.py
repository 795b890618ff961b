"""Memory estimates against hand-computed figures and against what the engine allocates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carpool.capacity import (
    activation_bytes,
    estimate_memory,
    kv_cache_bytes_for,
    largest_batch_by_estimate,
    read_model_config,
)
from carpool.cli import main
from carpool.config import ModelConfig
from carpool.model.source import embedded_model_path as default_model_path

LLAMA_13B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 5120,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
    "intermediate_size": 13824,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "torch_dtype": "float16",
}
LLAMA_3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
}
GB40 = 40 * 10**9


def test_llama_13b_kv_cache_counts_k_and_v():
    c = ModelConfig.from_hf_dict(LLAMA_13B)
    est = estimate_memory(c, batch_size=16, seq_len=2048, dtype_nbytes=2)
    # 16 sequences x 2048 tokens x 40 layers x 5120 hidden x 2 (K and V) x 2 bytes.
    assert est.kv_cache == 16 * 2048 * 40 * 5120 * 2 * 2 == 26_843_545_600
    # Per layer: 4 attention projections 5120^2, 3 MLP matrices 5120 x 13824, 2 norms;
    # embedding and head 32000 x 5120 each; the final norm.
    params = 40 * (4 * 5120**2 + 3 * 5120 * 13824 + 2 * 5120) + 2 * 32000 * 5120 + 5120
    assert params == 13_015_864_320
    assert est.weights == 2 * params
    assert est.total == est.weights + est.kv_cache + est.activations
    assert not est.fits(GB40)
    assert est.weights + est.kv_cache > GB40  # does not fit even with no activations at all


def test_llama_3_8b_grouped_query_attention():
    c = ModelConfig.from_hf_dict(LLAMA_3_8B)
    est = estimate_memory(c, batch_size=16, seq_len=2048, dtype_nbytes=2)
    # 2 (K and V) x 32 layers x 8 kv heads x 128 head_dim x 2 bytes = 128 KiB per token,
    # a quarter of the classic 2 x layers x hidden x bytes.
    assert c.kv_bytes_per_token_for(2) == 2 * 32 * 8 * 128 * 2 == 131_072
    assert est.kv_cache == 16 * 2048 * 131_072 == 4_294_967_296
    assert est.kv_cache * 4 == 16 * 2048 * 2 * 32 * 4096 * 2
    attn = 2 * 4096 * 4096 + 2 * 4096 * 1024
    params = 32 * (attn + 3 * 4096 * 14336 + 2 * 4096) + 2 * 128256 * 4096 + 4096
    assert params == 8_030_261_248
    assert est.weights == 2 * params


def test_activation_formula_by_hand():
    c = ModelConfig.from_hf_dict(LLAMA_3_8B)
    b, seq, n = 2, 64, 2
    t = b * seq  # the whole batch in one prefill
    h, q, kv, heads, inter, vocab = 4096, 4096, 1024, 32, 14336, 128256
    attention = t * (q + 2 * kv) + 2 * b * seq * kv + b * heads * seq * seq
    mlp = 3 * t * inter
    expected = n * (2 * t * h + max(attention, mlp)) + seq * seq * (1 + n) + b * vocab * (n + 8)
    assert activation_bytes(c, b, seq, n) == expected
    # Chunked prefill: 32 tokens of one sequence per pass, each attending to up to 64 keys.
    t, qlen, seqs = 32, 32, 1
    attention = t * (q + 2 * kv) + 2 * seqs * seq * kv + seqs * heads * qlen * seq
    expected = n * (2 * t * h + max(attention, 3 * t * inter)) + qlen * seq * (1 + n)
    expected += b * vocab * (n + 8)
    assert activation_bytes(c, b, seq, n, max_num_batched_tokens=32) == expected


def test_sequences_take_whole_blocks():
    c = ModelConfig.from_hf_dict(LLAMA_3_8B)
    assert kv_cache_bytes_for(c, 3, 17, 2, block_size=16) == 3 * 2 * 16 * 131_072
    assert kv_cache_bytes_for(c, 3, 16, 2, block_size=16) == 3 * 16 * 131_072


def test_largest_batch_by_estimate_is_the_boundary():
    c = ModelConfig.from_hf_dict(LLAMA_13B)
    b = largest_batch_by_estimate(c, 2048, GB40, 2)
    assert estimate_memory(c, b, 2048, 2).total <= GB40 < estimate_memory(c, b + 1, 2048, 2).total


def test_read_model_config_from_dir_file_and_gguf(tmp_path):
    from helpers.gguf_export import export_hf_to_gguf
    from helpers.hf_models import save_tiny_model_dir

    save_tiny_model_dir("llama", tmp_path)
    by_dir = read_model_config(tmp_path)
    assert read_model_config(tmp_path / "config.json") == by_dir
    gguf = export_hf_to_gguf(tmp_path, tmp_path / "tiny.gguf", "F32", tokenizer=tmp_path)
    by_gguf = read_model_config(gguf)
    assert by_gguf.kv_bytes_per_token_for(2) == by_dir.kv_bytes_per_token_for(2)
    assert by_gguf.num_parameters == by_dir.num_parameters


def _engine_kv_bytes(model: Path, batch: int, seq_len: int) -> tuple[int, ModelConfig, int]:
    """KV bytes the engine allocates for ``batch`` seats of ``seq_len`` tokens."""
    from carpool.config import EngineConfig
    from carpool.engine.llm_engine import LLMEngine

    engine = LLMEngine(
        EngineConfig(
            model=str(model),
            max_num_seqs=batch,
            max_model_len=seq_len,
            kv_cache_memory_fraction=1.0,
        )
    )
    nbytes = next(engine.model.parameters()).element_size()
    return engine.runner.kv_cache_bytes, engine.model_config, nbytes


@pytest.mark.parametrize("batch,seq_len", [(4, 100), (3, 64)])
def test_estimate_matches_engine_allocation(tmp_path, batch, seq_len):
    from helpers.hf_models import save_tiny_model_dir

    save_tiny_model_dir("llama", tmp_path)
    allocated, config, nbytes = _engine_kv_bytes(tmp_path, batch, seq_len)
    est = estimate_memory(read_model_config(tmp_path), batch, seq_len, nbytes)
    assert read_model_config(tmp_path) == config
    assert abs(est.kv_cache - allocated) <= 0.01 * allocated, (est.kv_cache, allocated)


def test_embedded_model_estimate_matches_engine():
    path = default_model_path()
    config = read_model_config(path)
    allocated, engine_config, nbytes = _engine_kv_bytes(path, 8, 256)
    assert engine_config.kv_bytes_per_token_for(nbytes) == config.kv_bytes_per_token_for(nbytes)
    est = estimate_memory(config, 8, 256, nbytes)
    by_hand = (
        8
        * -(-256 // 16)
        * 16
        * 2
        * config.num_hidden_layers
        * config.num_key_value_heads
        * config.head_dim
        * nbytes
    )
    assert est.kv_cache == by_hand
    if (config.num_hidden_layers, config.num_key_value_heads, config.head_dim) == (4, 4, 32):
        # The shipped model: 2 x 4 layers x 4 kv heads x 32 x 2 bytes (bf16) = 2 KiB per token,
        # 8 sequences x 16 blocks x 16 tokens of it.
        assert nbytes == 2 and config.kv_bytes_per_token_for(2) == 2048
        assert est.kv_cache == 8 * 256 * 2048 == 4_194_304
    assert abs(est.kv_cache - allocated) <= 0.01 * allocated, (est.kv_cache, allocated)
    assert est.weights == config.num_parameters * nbytes


def test_memory_cli_says_13b_does_not_fit(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA_13B))
    out_json, png = tmp_path / "mem.json", tmp_path / "mem.png"
    argv = ["memory", "--model", str(cfg), "--batch-size", "16", "--seq-len", "2048"]
    argv += ["--dtype", "float16", "--device-memory", "40GB", "--plot", str(png)]
    assert main([*argv, "--output", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "26.84 GB" in out and "does NOT fit" in out
    data = json.loads(out_json.read_text())
    assert data["estimate"]["kv_cache"] == 26_843_545_600
    assert data["fits"] is False
    assert data["largest_batch"] >= 1
    assert png.stat().st_size > 1000


# ---- int8 KV cache (kv_cache_dtype="int8"): head_dim int8 values + a float32 scale per row ----


def test_int8_kv_bytes_per_token_counts_the_scales():
    c = ModelConfig.from_hf_dict(LLAMA_13B)
    # 2 (K, V) x 40 layers x 40 kv heads x (128 values + 4 bytes of scale).
    assert c.kv_bytes_per_token_for("int8") == 2 * 40 * 40 * (128 + 4) == 422_400
    assert c.kv_bytes_per_token_for("bfloat16") == c.kv_bytes_per_token_for(2) == 819_200
    assert kv_cache_bytes_for(c, 3, 100, "int8") == 3 * 7 * 16 * 422_400


def test_int8_kv_cache_holds_about_twice_the_blocks_of_bf16():
    from carpool.capacity import plan_num_blocks
    from carpool.config import EngineConfig

    c = ModelConfig.from_hf_dict(LLAMA_13B)
    budget = 40 * 10**9
    bf16 = plan_num_blocks(EngineConfig(kv_cache_memory=budget), c, 4096, 2)
    int8 = plan_num_blocks(EngineConfig(kv_cache_memory=budget, kv_cache_dtype="int8"), c, 4096, 2)
    assert bf16 == budget // (16 * 819_200) and int8 == budget // (16 * 422_400)
    assert 1.9 < int8 / bf16 < 1.95  # 256 / 132 bytes per row


def test_kv_cache_dtype_is_checked_with_the_allowed_values(capsys):
    from carpool.config import EngineConfig

    allowed = r"\('auto', 'bfloat16', 'int8'\)"
    with pytest.raises(ValueError, match=f"kv_cache_dtype must be one of {allowed}"):
        EngineConfig(kv_cache_dtype="fp8")
    with pytest.raises(SystemExit):
        main(["generate", "--kv-cache-dtype", "fp8", "hello"])
    err = capsys.readouterr().err
    assert "--kv-cache-dtype" in err and "'auto', 'bfloat16', 'int8'" in err


def test_memory_cli_with_int8_kv_cache(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA_13B))
    argv = ["memory", "--model", str(cfg), "--batch-size", "16", "--seq-len", "2048"]
    argv += ["--dtype", "float16", "--device-memory", "40GB"]
    out_bf16, out_int8 = tmp_path / "bf16.json", tmp_path / "int8.json"
    assert main([*argv, "--output", str(out_bf16)]) == 0
    capsys.readouterr()
    assert main([*argv, "--kv-cache-dtype", "int8", "--output", str(out_int8)]) == 0
    out = capsys.readouterr().out
    assert "KV int8" in out
    assert "2 x 40 layers x 40 kv heads x (128 x 1 B + 4 B scale) = 422,400 B" in out
    assert "13.84 GB" in out  # 16 x 2048 tokens x 422,400 B
    bf16, int8 = json.loads(out_bf16.read_text()), json.loads(out_int8.read_text())
    assert bf16["kv_bytes_per_token"] == 819_200 and int8["kv_bytes_per_token"] == 422_400
    assert int8["estimate"]["kv_cache"] == 13_841_203_200
    assert int8["largest_batch"] > bf16["largest_batch"]


def test_memory_cli_with_bf16_kv_cache_of_a_float32_model(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA_13B))
    argv = ["memory", "--model", str(cfg), "--batch-size", "4", "--seq-len", "2048"]
    argv += ["--dtype", "float32", "--device-memory", "200GB"]
    out_f32, out_bf16 = tmp_path / "f32.json", tmp_path / "bf16.json"
    assert main([*argv, "--output", str(out_f32)]) == 0
    assert main([*argv, "--kv-cache-dtype", "bfloat16", "--output", str(out_bf16)]) == 0
    out = capsys.readouterr().out
    assert "weights float32, KV bfloat16" in out
    f32, bf16 = json.loads(out_f32.read_text()), json.loads(out_bf16.read_text())
    assert f32["kv_bytes_per_token"] == 1_638_400 and bf16["kv_bytes_per_token"] == 819_200
    assert bf16["estimate"]["weights"] == f32["estimate"]["weights"]  # the weights stay float32
    assert bf16["largest_batch"] > f32["largest_batch"]


def test_engine_int8_cache_is_what_the_estimate_says(tmp_path):
    # The runner's kv_cache_bytes measures the real tensors: int8 rows of head_dim + 4 bytes.
    import torch

    from carpool.config import EngineConfig
    from carpool.engine.llm_engine import LLMEngine
    from helpers.hf_models import save_tiny_model_dir

    save_tiny_model_dir("llama", tmp_path)
    budget = 1 << 20
    engines = {
        kv: LLMEngine(
            EngineConfig(
                model=str(tmp_path), dtype="float32", kv_cache_memory=budget, kv_cache_dtype=kv
            )
        )
        for kv in ("auto", "bfloat16", "int8")
    }
    config = read_model_config(tmp_path)
    for kv, element in (("auto", 4), ("bfloat16", 2), ("int8", "int8")):
        e = engines[kv]
        per_block = 16 * config.kv_bytes_per_token_for(element)
        assert e.num_blocks == budget // per_block
        assert e.runner.kv_cache_bytes == e.num_blocks * per_block
    assert engines["int8"].runner.kv_caches[0].dtype == torch.int8
    assert engines["bfloat16"].runner.kv_caches[0].dtype == torch.bfloat16
    assert engines["bfloat16"].num_blocks == 2 * engines["auto"].num_blocks
    # head_dim 16: 16 + 4 bytes per row against 16 x 4 (float32).
    assert engines["int8"].num_blocks / engines["auto"].num_blocks == pytest.approx(64 / 20, 0.01)


def test_auto_kv_cache_of_a_quantized_float32_model_is_bfloat16(tmp_path, capsys):
    # "auto" is the model's dtype, except a float32 model with quantized matrices (a GGUF Q8_0
    # or Q4 file computes in float32 around int8/int4 kernels), whose cache stores bfloat16 as
    # llama.cpp stores f16: the engine and `carpool memory` resolve it alike.
    import torch

    from carpool.config import EngineConfig
    from carpool.engine.llm_engine import LLMEngine
    from carpool.model.kv_quant import effective_kv_cache_dtype
    from helpers.gguf_export import export_hf_to_gguf
    from helpers.hf_models import save_tiny_model_dir

    assert effective_kv_cache_dtype("auto", torch.float32, True) == "bfloat16"
    assert effective_kv_cache_dtype("auto", torch.float32, False) == "auto"
    assert effective_kv_cache_dtype("auto", torch.bfloat16, True) == "auto"
    assert effective_kv_cache_dtype("int8", torch.float32, True) == "int8"
    save_tiny_model_dir("llama", tmp_path / "hf")
    q8 = export_hf_to_gguf(tmp_path / "hf", tmp_path / "q8.gguf", "Q8_0", tokenizer=tmp_path / "hf")
    budget = 1 << 20
    engine = LLMEngine(EngineConfig(model=str(q8), kv_cache_memory=budget))
    assert next(engine.model.parameters()).dtype == torch.float32
    assert engine.config.kv_cache_dtype == "bfloat16"
    assert engine.runner.kv_caches[0].dtype == torch.bfloat16
    per_block = 16 * read_model_config(q8).kv_bytes_per_token_for(2)
    assert engine.num_blocks == budget // per_block
    out = tmp_path / "mem.json"
    argv = ["memory", "--model", str(q8), "--batch-size", "2", "--seq-len", "64"]
    assert main([*argv, "--output", str(out)]) == 0
    assert "weights float32, KV bfloat16" in capsys.readouterr().out
    assert json.loads(out.read_text())["kv_bytes_per_token"] == per_block // 16
    # The same file with its matrices widened (quantization none) keeps a float32 cache.
    dense = LLMEngine(EngineConfig(model=str(q8), kv_cache_memory=budget, quantization="none"))
    assert dense.config.kv_cache_dtype == "auto"
    assert dense.runner.kv_caches[0].dtype == torch.float32
