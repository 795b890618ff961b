"""A long prompt's rows through the quantized linears' widened weight (``row_paths``): which rows
the builders mark, that each row's result is the one its path gives it alone (so a request's
numbers do not depend on its batch), the MLP's row chunks, the decode stack declining such steps
and the engine's choice of ``wide_from``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carpool.model import layers, quant, row_paths, vnni_linear
from carpool.model.decode_stack import _takes
from carpool.model.loader import load_model
from carpool.model.quant import Int4Linear, Int8Linear
from carpool.model.row_paths import WideRows
from carpool.scheduling.output import ScheduledChunk
from carpool.worker.batch import build_ragged_batch
from carpool.worker.model_runner import prepare_model
from carpool.worker.padded import build_padded_batch
from helpers.hf_models import save_tiny_hf_model


@pytest.fixture(scope="module", autouse=True)
def operators():
    from carpool.model import fused_ops

    assert fused_ops.load() and vnni_linear.load(), "the CPU operators must build here"


def test_wide_rows_runs_their_complement_and_a_chunks_share():
    wide = WideRows(10, ((2, 4), (6, 9)))
    assert wide.others == ((0, 2), (4, 6), (9, 10))
    assert not wide.every_row and WideRows(5, ((0, 5),)).every_row
    assert WideRows(5, ((0, 5),)).others == ()
    assert wide.within(3, 7) == WideRows(4, ((0, 1), (3, 4)))
    assert wide.within(4, 6) is None
    assert wide.within(6, 10) == WideRows(4, ((0, 3),))
    assert wide.within(3, 7) is wide.within(3, 7)  # kept: every layer asks again
    assert wide.index.tolist() == [2, 3, 6, 7, 8] and wide.others_index.tolist() == [0, 1, 4, 5, 9]
    with pytest.raises(AssertionError, match="bad runs"):
        WideRows(10, ((2, 4), (4, 6)))  # touching runs are one run
    with pytest.raises(AssertionError, match="bad runs"):
        WideRows(5, ((2, 6),))


def test_the_current_rows_are_the_threads_own():
    import threading

    mine = WideRows(4, ((1, 2),))
    seen = []
    with row_paths.use(mine):
        thread = threading.Thread(target=lambda: seen.append(row_paths.current()))
        thread.start()
        thread.join()
        assert row_paths.current() is mine
        with row_paths.use(None):
            assert row_paths.current() is None
        assert row_paths.current() is mine
    assert seen == [None] and row_paths.current() is None


def test_from_mask():
    assert row_paths.from_mask(np.zeros(4, dtype=bool)) is None
    mask = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1], dtype=bool)
    assert row_paths.from_mask(mask) == WideRows(9, ((1, 3), (4, 5), (7, 9)))
    assert row_paths.from_mask(np.ones((2, 3), dtype=bool)) == WideRows(6, ((0, 6),))


def _chunk(rid: str, start: int, n: int) -> ScheduledChunk:
    return ScheduledChunk(
        request_id=rid,
        token_ids=[5] * n,
        start_pos=start,
        needs_sample=True,
        new_block_ids=[],
        num_kept_blocks=0,
    )


def test_the_builders_mark_prompt_rows_from_wide_from_on():
    # a: a prompt chunk at positions 10-49 of a 40-token prompt (40-49 are generated tokens
    # recomputed after a preemption: the kernels'); b: a decode row; c: a prompt's first 20.
    chunks = [_chunk("a", 10, 40), _chunk("b", 30, 1), _chunk("c", 0, 20)]
    prompts = [40, 12, 100]
    tables = [list(range(8)), list(range(8, 16)), list(range(16, 24))]
    inp = build_ragged_batch(chunks, tables, 8, generated_from=prompts, wide_from=16)
    # a's positions 16..39 are rows 6..29; c's 16..19 are rows 41+16..41+19.
    assert inp.meta.wide_rows == WideRows(61, ((6, 30), (57, 61)))
    assert build_ragged_batch(chunks, tables, 8, generated_from=prompts).meta.wide_rows is None
    # From 0 (the default): every prompt row, a prompt's first too (c's rows 41..60).
    every = build_ragged_batch(chunks, tables, 8, generated_from=prompts, wide_from=0)
    assert every.meta.wide_rows == WideRows(61, ((0, 30), (41, 61)))
    # A pure decode step has none.
    decode = build_ragged_batch(
        [_chunk("b", 30, 1)], tables[1:2], 8, generated_from=[12], wide_from=16
    )
    assert decode.meta.wide_rows is None
    # The padded layout: rows of width 40, the same real rows, pads the kernels'.
    padded = build_padded_batch(
        chunks, tables, 8, scratch_block=30, generated_from=prompts, wide_from=16
    )
    assert padded.meta.wide_rows == WideRows(120, ((6, 30), (96, 100)))


@pytest.fixture(scope="module")
def dense_weights():
    g = torch.Generator().manual_seed(0)
    return torch.randn(200, 96, generator=g) * 0.05, torch.randn(200, generator=g) * 0.1


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "runs",
    [((0, 7), (40, 41), (100, 290)), ((100, 290),), ((0, 150),), ((3, 40), (41, 300))],
    ids=["indexed", "one run", "a prefix", "two runs"],  # index_copy_ past 2 runs, else slices
)
def test_each_row_gets_its_paths_bits_whatever_the_rows_beside_it(
    dense_weights, kind, dtype, runs, monkeypatch
):
    monkeypatch.setattr(quant, "WIDE_INT4_PROMPTS", True)  # int4 layers take wide rows too
    w, b = dense_weights
    cls = Int8Linear if kind == "int8" else Int4Linear
    lin = cls.from_float(w, b.to(dtype), dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 96, generator=g).to(dtype)
    wide = WideRows(300, runs)
    with torch.inference_mode():
        with row_paths.use(wide):
            mixed = lin.forward(x)
        kernel_alone = lin.forward(x)  # no wide rows: every row the kernels'
        with row_paths.use(WideRows(300, ((0, 300),))):
            wide_alone = lin.forward(x)
        with row_paths.use(WideRows(1, ((0, 1),))):
            one_wide = lin.forward(x[120:121])
    assert mixed.dtype == dtype and mixed.shape == (300, 200)
    is_wide = torch.zeros(300, dtype=torch.bool)
    for a, c in wide.runs:
        is_wide[a:c] = True
    assert torch.equal(mixed[is_wide], wide_alone[is_wide])
    assert torch.equal(mixed[~is_wide], kernel_alone[~is_wide])
    assert torch.equal(one_wide, wide_alone[120:121])  # a wide row alone or beside 299
    # Both paths compute the dequantized weight's product, rounded differently.
    ref = x.float() @ lin.dequantize().float().T + b.to(dtype).float()
    assert torch.allclose(wide_alone.float(), ref, atol=0.05, rtol=0.02)
    # int4: the two paths round differently, so a row on the other path would show. int8: both
    # round the scaled float32 sum once, and here their sums' orders agree to bf16 (placement
    # is still checked above: a row in another row's place shows).
    assert kind == "int8" or not torch.equal(wide_alone, kernel_alone)


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_a_chunked_mlp_takes_each_chunks_own_wide_rows(monkeypatch, tmp_path, quantization):
    # Each chunk's wide rows multiply the matrix widened once for all the chunks
    # (vnni_linear.linear_packed under layers.widen_once); unchunked, each block is widened in
    # the loop (linear_int4 / linear_int8): the same bits.
    monkeypatch.setattr(quant, "WIDE_INT4_PROMPTS", True)
    save_tiny_hf_model("llama", tmp_path)
    model, _ = load_model(tmp_path, dtype="float32", quantization=quantization)
    prepare_model(model, "cpu")
    mlp = model.model.layers[0].mlp
    x = torch.randn(700, mlp.gate_up_proj.in_features)
    wide = WideRows(700, ((10, 20), (200, 600)))  # across the chunks' bounds at 256 and 512
    packed_calls = []
    linear_packed = vnni_linear.linear_packed

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        packed_calls.append(args[0].shape[0])
        return linear_packed(*args, **kwargs)

    monkeypatch.setattr(vnni_linear, "linear_packed", counted)
    with torch.inference_mode(), row_paths.use(wide):
        chunked = mlp.forward(x)
        assert packed_calls, "the chunks did not take the matrix widened once"
        monkeypatch.setattr(layers, "MLP_CHUNK_ROWS", 1 << 30)
        calls = len(packed_calls)
        whole = mlp.forward(x)
        assert len(packed_calls) == calls  # unchunked: the blocks widened in the loop
    assert torch.equal(chunked, whole)


def test_the_decode_stack_declines_a_step_with_wide_rows(tmp_path):
    save_tiny_hf_model("llama", tmp_path)
    model, _ = load_model(tmp_path, dtype="bfloat16", quantization="int8")
    prepare_model(model, "cpu")
    plan = model.decode_plan
    assert plan is not None
    caches = model.allocate_kv_cache(8, 16, torch.bfloat16, "cpu")
    chunks = [_chunk("a", 20, 4)]  # a prompt's rows 20..23, every one a kernel row (below 512)
    inp = build_ragged_batch(chunks, [list(range(8))], 16, generated_from=[100], kernel_below=512)
    assert _takes(plan, 4, inp.meta, caches)
    wide = build_ragged_batch(
        chunks, [list(range(8))], 16, generated_from=[100], kernel_below=512, wide_from=16
    )
    assert wide.meta.wide_rows == WideRows(4, ((0, 4),))
    assert not _takes(plan, 4, wide.meta, caches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_int4_layer_gives_wide_rows_the_kernels_bits_by_default(dense_weights, dtype):
    # WIDE_INT4_PROMPTS off: an int4 layer's rows all take the kernels, wide or not (an int8
    # layer in the same step would still widen its weight for them).
    assert not quant.WIDE_INT4_PROMPTS and not quant.wide_int4_prompts()
    w, b = dense_weights
    lin = Int4Linear.from_float(w, b.to(dtype), dtype)
    assert not lin.takes_wide_rows() and Int8Linear.from_float(w, b, dtype).takes_wide_rows()
    x = torch.randn(300, 96, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.inference_mode():
        kernels = lin.forward(x)
        with row_paths.use(WideRows(300, ((3, 40), (41, 300)))):
            marked = lin.forward(x)
        with row_paths.use(WideRows(300, ((0, 300),))):
            every = lin.forward(x)
    assert torch.equal(marked, kernels) and torch.equal(every, kernels)


def test_wide_prompt_from(tmp_path, monkeypatch):
    save_tiny_hf_model("llama", tmp_path)
    int4, _ = load_model(tmp_path, dtype="float32", quantization="int4")
    quantized, _ = load_model(tmp_path, dtype="float32", quantization="int8")
    dense, _ = load_model(tmp_path, dtype="float32")
    half, _ = load_model(tmp_path, dtype="float16", quantization="int8")
    monkeypatch.setattr(quant, "WIDE_PROMPT_HERE", True)
    # int4 layers take the kernels for every row (WIDE_INT4_PROMPTS); 1 / 0 overrides that for
    # the layers made then.
    assert quant.wide_prompt_from(int4, "cpu") is None
    monkeypatch.setenv(quant.ENV_WIDE_INT4_PROMPTS, "1")
    wide4, _ = load_model(tmp_path, dtype="float32", quantization="int4")
    assert quant.wide_prompt_from(wide4, "cpu") == quant.WIDE_PROMPT_FROM
    assert quant.wide_prompt_from(int4, "cpu") is None  # made before
    monkeypatch.setenv(quant.ENV_WIDE_INT4_PROMPTS, "0")
    assert quant.wide_prompt_from(load_model(tmp_path, quantization="int4")[0], "cpu") is None
    monkeypatch.setenv(quant.ENV_WIDE_INT4_PROMPTS, "yes")
    with pytest.raises(ValueError, match="CARPOOL_WIDE_INT4_PROMPTS: expected 1 or 0"):
        load_model(tmp_path, quantization="int4")
    monkeypatch.delenv(quant.ENV_WIDE_INT4_PROMPTS)
    # int4 layers with an int8 head: the head runs outside the step's row paths.
    c = int4.config
    int4.lm_head = Int8Linear.from_float(torch.randn(c.vocab_size, c.hidden_size) * 0.05)
    assert quant.wide_prompt_from(int4, "cpu") is None
    assert quant.WIDE_PROMPT_FROM == 0  # every prompt row
    assert quant.wide_prompt_from(quantized, "cpu") == quant.WIDE_PROMPT_FROM
    assert quant.wide_prompt_from(dense, "cpu") is None  # no quantized linear
    assert quant.wide_prompt_from(half, "cpu") is None  # float16 kernels: no bf16 widening
    monkeypatch.setenv(quant.ENV_WIDE_PROMPT_FROM, "40")
    assert quant.wide_prompt_from(quantized, "cpu") == 40
    monkeypatch.setenv(quant.ENV_WIDE_PROMPT_FROM, "0")
    assert quant.wide_prompt_from(quantized, "cpu") == 0
    monkeypatch.setenv(quant.ENV_WIDE_PROMPT_FROM, "off")
    assert quant.wide_prompt_from(quantized, "cpu") is None
    monkeypatch.setenv(quant.ENV_WIDE_PROMPT_FROM, "-3")
    with pytest.raises(ValueError, match="CARPOOL_WIDE_PROMPT_FROM: expected a position"):
        quant.wide_prompt_from(quantized, "cpu")
    monkeypatch.delenv(quant.ENV_WIDE_PROMPT_FROM)
    monkeypatch.setattr(quant, "WIDE_PROMPT_HERE", False)
    assert quant.wide_prompt_from(quantized, "cpu") is None
    monkeypatch.setattr(quant, "WIDE_PROMPT_HERE", None)  # this CPU's choice: AMX tiles only
    expected = quant.WIDE_PROMPT_FROM if vnni_linear.amx() else None
    assert quant.wide_prompt_from(quantized, "cpu") == expected
