"""The engine on torch's ``meta`` device: the path a GPU takes, checked on a CPU-only machine.

Every CPU fast path in carpool (C++ kernels, the one-call decode stack, huge pages, the block
allocator) is taken only when ``device.type == "cpu"``; on ``meta`` the engine runs what CUDA
would run, and torch refuses any op mixing a ``meta`` tensor with a CPU tensor, as CUDA does.
So these tests fail on a CPU-only operation or a host-built tensor on the hot path, for every
weight format, KV-cache dtype, layout and batching strategy (see ``helpers.meta_device``).
Values are not checked here (``meta`` has none): the parity tests do that, on the CPU always
and on CUDA whenever a GPU is present (``DEVICES`` in ``tests/model``).
"""

from __future__ import annotations

import pytest
import torch

from carpool import LLM, LLMEngine, SamplingParams
from carpool.config import BATCHING_STRATEGIES, EngineConfig
from carpool.model import layers
from helpers.gguf_export import export_hf_to_gguf
from helpers.hf_models import save_tiny_model_dir
from helpers.meta_device import HostReads

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
# Everything the sampler does besides a seed (a generator needs a real accelerator; CUDA's
# is tested by the sampler's seeded tests wherever a GPU is present).
SAMPLED = SamplingParams(
    max_tokens=5,
    temperature=0.8,
    top_p=0.9,
    top_k=7,
    min_p=0.05,
    repetition_penalty=1.2,
    presence_penalty=0.5,
    frequency_penalty=0.3,
    logprobs=3,
    logit_bias={5: 2.0, 9: -1.5},
    ignore_eos=True,
)
# A prompt longer than one step's token budget (chunked prefill), block-sized and short ones.
PROMPTS = [[3 + i % 300 for i in range(150)], [5] * 16, [7, 8, 9], [11] * 40]
PARAMS = [GREEDY, SAMPLED, GREEDY, SAMPLED]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("meta-models")
    paths = {}
    for arch in ("llama", "llama3", "qwen2", "qwen3"):
        save_tiny_model_dir(arch, root / arch)
        paths[arch] = str(root / arch)
    for ft in ("Q8_0", "Q4_0", "Q4_1"):
        f = export_hf_to_gguf(
            root / "llama", root / f"llama-{ft}.gguf", ft, tokenizer=root / "llama"
        )
        paths[ft] = str(f)
    return paths


def _check(llm: LLM, prompts=PROMPTS, params=PARAMS) -> None:
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, p in zip(outs, params, strict=True):
        got = out.outputs[0]
        assert got.finish_reason == "length", f"request {out.request_id}: {got.finish_reason}"
        assert len(got.token_ids) == p.max_tokens, (out.request_id, got.token_ids)
        if p.logprobs:
            assert len(got.logprobs) == p.max_tokens
    assert all(t.is_meta for t in llm.engine.runner.kv_caches), "the KV cache left the device"
    assert all(p.is_meta for p in llm.engine.runner.model.parameters())
    llm.engine.block_manager.check_integrity()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks


@pytest.mark.parametrize(
    "model, dtype, quantization, kv_cache_dtype, layout",
    [
        ("llama", "float32", None, "auto", "ragged"),
        ("llama", "bfloat16", None, "int8", "padded"),
        ("llama3", "bfloat16", "int4", "int8", "ragged"),
        ("qwen2", "bfloat16", "int8", "auto", "ragged"),
        ("qwen3", "float32", "int4", "bfloat16", "padded"),
        ("qwen3", "float32", "int8", "int8", "ragged"),
        ("Q8_0", "auto", None, "auto", "ragged"),
        ("Q4_0", "auto", None, "int8", "ragged"),
        ("Q4_1", "bfloat16", None, "auto", "padded"),
    ],
)
def test_every_weight_format_and_cache_runs_off_the_cpu(
    models, model, dtype, quantization, kv_cache_dtype, layout
):
    with HostReads():
        llm = LLM(
            models[model],
            device="meta",
            dtype=dtype,
            quantization=quantization,
            kv_cache_dtype=kv_cache_dtype,
            layout=layout,
            max_num_batched_tokens=64,
            max_num_seqs=4,
        )
        _check(llm)


@pytest.mark.parametrize("batching", BATCHING_STRATEGIES)
def test_every_batching_strategy_runs_off_the_cpu(models, batching):
    with HostReads():
        llm = LLM(
            models["llama"],
            device="meta",
            dtype="bfloat16",
            batching=batching,
            batch_size=3,
            max_wait_ms=1,
            num_buckets=2,
            max_num_batched_tokens=64,
        )
        _check(llm)


def _per_step(models, params: SamplingParams, batch: int, counter: str) -> list[int]:
    """``HostReads.<counter>`` of each step of ``batch`` 20-token requests on ``meta``."""
    with HostReads() as reads:
        engine = LLMEngine(EngineConfig(model=models["llama"], device="meta", dtype="bfloat16"))
        for i in range(batch):
            engine.add_request([3 + i] * 20, params, request_id=f"r{i}")
        per_step = []
        while engine.has_unfinished():
            before = getattr(reads, counter)
            engine.step()
            per_step.append(getattr(reads, counter) - before)
    return per_step


@pytest.mark.parametrize("batch", [1, 8])
def test_host_reads_per_step_do_not_grow_with_the_batch(models, batch):
    """On a GPU each read back is a synchronisation: one per greedy step (the tokens), four
    with logprobs (tokens, chosen logprobs, top values, top ids), whatever the batch size."""
    for params, most in ((GREEDY, 1), (SAMPLED, 4)):
        per_step = _per_step(models, params, batch, "count")
        assert len(per_step) == params.max_tokens, per_step
        assert max(per_step) == most, (params, per_step)


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_host_to_device_copies_per_step(models, layout):
    """The step's inputs go to the device in few transfers: one for a decode step (its index
    tensors packed, no mask), two for a step with a prefill chunk or a padded step (the index
    tensors packed, the mask); greedy sampling copies nothing."""
    with HostReads() as reads:
        engine = LLMEngine(
            EngineConfig(
                model=models["llama"],
                device="meta",
                dtype="bfloat16",
                layout=layout,
                max_num_batched_tokens=32,
            )
        )
        for i, n in enumerate((50, 20, 3)):  # 50 tokens: a prefill in two chunks
            engine.add_request([3 + i] * n, GREEDY, request_id=f"r{i}")
        per_step = []
        while engine.has_unfinished():
            before = reads.copies
            out = engine.run_step()
            assert out.record is not None
            prefill = out.record.num_prefill_tokens > 0
            per_step.append((prefill, reads.copies - before))
    assert any(p for p, _ in per_step) and any(not p for p, _ in per_step), per_step
    for prefill, copies in per_step:
        assert copies <= (2 if prefill or layout == "padded" else 1), per_step


def test_sampling_options_copy_their_parameters_once(models):
    """Every sampling option at once: the step's indices (1), the rows' parameters in one
    copy (``sampler.RowParams``), the two token histories of the penalties, and the logit
    bias's indices and values: 6 copies a decode step (13 when each parameter went alone)."""
    per_step = _per_step(models, SAMPLED, 4, "copies")
    assert max(per_step[1:]) <= 6, per_step  # decode steps (the first one prefills)


def test_packed_copies_are_the_tensors_themselves():
    from carpool.worker.batch import to_device

    parts = {
        "a": torch.arange(6).view(2, 3),
        "none": None,
        "b": torch.tensor([7, 8]),
        "c": torch.zeros(0, 4, dtype=torch.long),
    }
    packed = to_device(parts, "cpu", pack=True)
    assert packed["none"] is None
    for k in ("a", "b", "c"):
        assert packed[k].shape == parts[k].shape and torch.equal(packed[k], parts[k]), k
    meta = to_device(parts, "meta")  # off the CPU: packed by default
    assert meta["a"].is_meta and meta["a"].shape == (2, 3) and meta["c"].shape == (0, 4)


def test_a_host_tensor_on_the_hot_path_fails_there(models, monkeypatch):
    """The check above can fail: a rotary table built on the host (no ``device=``) is
    refused on ``meta`` as it would be on CUDA, and the request ends in an error."""

    def host_table(self, positions, dtype):
        return torch.zeros(positions.shape[0], 2, self.config.head_dim, dtype=dtype)

    monkeypatch.setattr(layers.RotaryEmbedding, "table", host_table)
    with HostReads():
        llm = LLM(models["llama"], device="meta", dtype="float32")
        (out,) = llm.generate([[3, 4, 5]], GREEDY, use_tqdm=False)
    assert out.outputs[0].finish_reason == "error"
    assert out.outputs[0].token_ids == []
