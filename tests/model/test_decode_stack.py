"""The one-call decode stack (``carpool.model.decode_stack``): a decode step through the C++
operator computes the same bits as the model's Python layers, for every linear kind (plain
float32/bf16, oneDNN-packed, VNNI, int8, int4), with q/k/v bias, a float, int8 or (float32
models) bf16 KV cache, 1-32 sequences, and up to 256 where every linear takes one kernel at
any row count; steps it does not take (prefill, mixed, past the plan's rows, Qwen3's q/k norm)
keep the Python layers; bad arguments get a message."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from carpool.model import decode_stack, fused_ops, kv_quant, paged_attention, vnni_linear
from carpool.model.layers import Linear, prepack_available
from carpool.model.loader import load_model
from carpool.worker.batch import build_ragged_batch
from carpool.worker.model_runner import prepare_model
from helpers.hf_models import save_tiny_hf_model

BLOCK = 16


class _Chunk:
    def __init__(self, rid: str, tokens: list[int], start: int, table: list[int]) -> None:
        self.request_id, self.token_ids, self.start_pos = rid, tokens, start
        self.block_table, self.needs_sample = table, True


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for arch in ("llama", "qwen2", "qwen3"):
        d = tmp_path_factory.mktemp(arch)
        save_tiny_hf_model(arch, d)
        out[arch] = d
    return out


def _model(path, dtype: str, quantization: str | None = None, pack: str | None = None):
    """The model as the engine prepares it; ``pack``: first put every layer's linears into
    that layout ("vnni", "onednn"), whatever this CPU would pick."""
    model, _ = load_model(path, dtype=dtype, quantization=quantization)
    for m in model.model.layers.modules():
        if pack == "vnni" and isinstance(m, Linear):
            assert vnni_linear.load()
            w = m.weight.detach()
            m.weight = nn.Parameter(vnni_linear.pack(w), requires_grad=False)
            m.bias_f32 = None if m.bias is None else m.bias.detach().float()
            m.layout = "vnni"
        elif pack == "onednn" and isinstance(m, Linear):
            # As Linear.prepack("onednn") does for bf16; oneDNN packs float32 weights on any
            # CPU, so this layout's path is exercised where bf16 GEMMs are missing too.
            w = m.weight.detach()
            m.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(w, 32), False)
            m.layout = "onednn"
    prepare_model(model, "cpu")  # packs what is still plain the best way here
    return model


def _step(model, contexts: list[int], kv_dtype: torch.dtype | None = None, new: int = 1):
    """Inputs of one step: sequence i has ``contexts[i] - new`` cached (random) tokens and
    ``new`` new ones; blocks handed out interleaved."""
    g = torch.Generator().manual_seed(len(contexts) * 1000 + sum(contexts))
    per_seq = [-(-c // BLOCK) for c in contexts]
    tables, nxt = [], 1
    for n in per_seq:
        tables.append(list(range(nxt, nxt + n)))
        nxt += n
    dtype = kv_dtype or next(model.parameters()).dtype
    caches = model.allocate_kv_cache(nxt, BLOCK, dtype, "cpu")
    for c in caches:
        if c.dtype == torch.int8:  # rows of random values, scale 0.02; the block layout
            rows = torch.empty_like(c)
            rows[..., :-4].random_(-127, 128, generator=g)
            rows[..., -4:] = torch.tensor([0.02]).view(torch.int8)
            c.copy_(kv_quant.to_blocks(rows))
        else:
            c.normal_(generator=g)
    vocab = model.config.vocab_size
    chunks = [
        _Chunk(f"r{i}", torch.randint(3, vocab, (new,), generator=g).tolist(), c - new, t)
        for i, (c, t) in enumerate(zip(contexts, tables, strict=True))
    ]
    return build_ragged_batch(chunks, tables, BLOCK), caches


def _both_paths(model, inp, caches) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Logits (and written caches) of the Python layers and of the stack, same inputs; the
    number of steps the stack took (from ids to logits where the plan has a head: checked)."""
    out, written = [], []
    before = decode_stack.stack_calls()
    logits_before = decode_stack.logits_calls()
    for on in (False, True):
        decode_stack.use_stack(on)
        c = [x.clone() for x in caches]
        with torch.inference_mode():
            out.append(model(inp.input_ids, inp.positions, inp.meta, c, inp.logits_indices))
        written.append(c)
    decode_stack.use_stack(True)
    for a, b in zip(*written, strict=True):
        assert torch.equal(a, b), "the stack wrote other K/V bytes than the Python layers"
    taken = decode_stack.stack_calls() - before
    every_row = inp.logits_indices.shape[0] == inp.input_ids.shape[0]
    head = None if model.decode_plan is None else model.decode_plan.head
    if head is not None and every_row and inp.input_ids.shape[0] <= head.max_rows:
        assert decode_stack.logits_calls() - logits_before == taken, "the head was not taken"
    else:
        assert decode_stack.logits_calls() == logits_before
    return out[0], out[1], taken


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v bias, tied head
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_stack_is_the_python_layers_bits(checkpoints, arch, dtype, quantization):
    model = _model(checkpoints[arch], dtype, quantization)
    assert model.decode_plan is not None
    # Ids to logits in one call: a dense head, and a quantized one too (a float32 model's
    # from its kernel's float32 logits, as QuantizedLinear.logits takes them) with an int8
    # embedding; an int4 embedding (--quantization int4 quantizes it too) keeps the Python
    # path around the layers.
    assert (model.decode_plan.head is not None) == (quantization != "int4")
    kinds = set(model.decode_plan.ints[0::3])
    expected = {"int8": {decode_stack.INT8}, "int4": {decode_stack.INT4}}
    if quantization is None:  # packed (oneDNN, or VNNI with AMX) where this CPU has bf16 GEMMs
        assert kinds <= {decode_stack.PLAIN, decode_stack.ONEDNN, decode_stack.VNNI}, kinds
    else:
        assert kinds == expected[quantization], kinds
    kernel_runs = paged_attention.kernel_calls()
    # 1-4 rows: the fused int8/int4 kernels; 5, 17, 32: the int8 dot-product kernel where the
    # CPU has it (int8_dot), else torch's kernels / widened codes.
    for contexts in (
        [5],
        [40, 3, 17],
        [9, 30, 2, 64, 1],
        [3 + 7 * i for i in range(17)],
        [1 + i for i in range(32)],
    ):
        # float32 models also on a bf16 cache (kv_cache_dtype="bfloat16": K/V rounded when
        # stored, read by the kernel with float32 queries).
        for kv in (None, torch.int8) + ((torch.bfloat16,) if dtype == "float32" else ()):
            inp, caches = _step(model, contexts, kv)
            want, got, taken = _both_paths(model, inp, caches)
            assert taken == 1, f"{len(contexts)} rows, kv {kv}: the stack was not taken"
            assert torch.equal(got, want), (
                f"{len(contexts)} rows, kv {kv}: max diff {(got - want).abs().max()}"
            )
    assert paged_attention.kernel_calls() > kernel_runs  # counted for the layers it ran


def _every_row_count_here(quantization: str) -> bool:
    """Whether this CPU's kernels for the quantized linears take every row count in one path
    (the tiny model's K, 64 and 128, are whole 32s for int8_dot)."""
    if quantization == "int4":
        return fused_ops.INT4_GEMV_MAX_ROWS == fused_ops.ANY_ROWS
    return fused_ops.ANY_ROWS in (fused_ops.INT8_GEMV_MAX_ROWS, fused_ops.int8_dot_max_rows())


@pytest.mark.parametrize(
    "dtype, quantization",
    [(d, q) for d in ("float32", "bfloat16") for q in ("int8", "int4")]
    + [("bfloat16", "vnni")],  # (the "vnni" layout packs bf16 weights)
)
def test_steps_past_32_rows_run_in_the_stack_where_every_linear_allows(
    checkpoints, dtype, quantization
):
    # A decode step of 33-256 sequences (max_num_seqs is 64) where every linear takes one path
    # at any row count: the same bits as the Python layers, the head in the call up to its own
    # rows (a float32 model's int8 head: int8_logits' 128); past 256 (GatedMLP's row chunks)
    # the Python layers.
    if quantization == "vnni":
        model, every = _model(checkpoints["qwen2"], dtype, pack="vnni"), True
    else:
        model = _model(checkpoints["llama"], dtype, quantization)
        every = _every_row_count_here(quantization)
    plan = model.decode_plan
    assert (
        plan.max_rows
        == (decode_stack.MAX_ROWS if every else decode_stack.EXACT_ROWS)
        == (256 if every else 32)
    )
    for rows in (33, 70, 129, 257):
        inp, caches = _step(model, [2 + (7 * i) % 90 for i in range(rows)])
        want, got, taken = _both_paths(model, inp, caches)
        assert taken == int(rows <= plan.max_rows), rows
        assert torch.equal(got, want), f"{rows} rows: max diff {(got - want).abs().max()}"


def test_vnni_layout_runs_in_the_stack(checkpoints):
    """The "vnni" layout (picked only on AVX-512 BF16 + AMX CPUs; its operator runs anywhere)."""
    model = _model(checkpoints["qwen2"], "bfloat16", pack="vnni")
    assert set(model.decode_plan.ints[0::3]) == {decode_stack.VNNI}
    for contexts in ([7], [3, 50, 18]):
        inp, caches = _step(model, contexts)
        want, got, taken = _both_paths(model, inp, caches)
        assert taken == 1 and torch.equal(got, want)


@pytest.mark.parametrize(
    "dtype",
    [
        "float32",
        pytest.param(
            "bfloat16",
            marks=pytest.mark.skipif(not prepack_available("cpu"), reason="no oneDNN bf16 here"),
        ),
    ],
)
def test_onednn_layout_runs_in_the_stack(checkpoints, dtype):
    model = _model(checkpoints["qwen2"], dtype, pack="onednn")
    assert set(model.decode_plan.ints[0::3]) == {decode_stack.ONEDNN}
    for contexts in ([7], [3, 50, 18]):
        inp, caches = _step(model, contexts)
        want, got, taken = _both_paths(model, inp, caches)
        assert taken == 1 and torch.equal(got, want)


def test_steps_it_does_not_take_keep_the_python_layers(checkpoints):
    model = _model(checkpoints["llama"], "float32")
    # Plain float32 weights: 32 rows (past them bucket_rows would pad a bf16 weight's rows).
    assert model.decode_plan.max_rows == decode_stack.EXACT_ROWS == 32
    # A prefill step, more than 32 decode rows: the Python layers (same logits either way).
    for inp, caches in (_step(model, [12], new=12), _step(model, [4] * 33)):
        want, got, taken = _both_paths(model, inp, caches)
        assert taken == 0 and torch.equal(got, want)
    # A mixed step (a prefill chunk beside decode rows).
    tables = [[1], [2, 3]]
    chunks = [_Chunk("a", [5], 3, tables[0]), _Chunk("b", [6, 7, 8], 17, tables[1])]
    inp = build_ragged_batch(chunks, tables, BLOCK)
    caches = model.allocate_kv_cache(4, BLOCK, torch.float32, "cpu")
    want, got, taken = _both_paths(model, inp, caches)
    assert taken == 0 and torch.equal(got, want)
    # Qwen3's per-head q/k norm: no plan.
    assert _model(checkpoints["qwen3"], "float32").decode_plan is None


def test_bad_arguments_are_refused_with_a_message(checkpoints):
    model = _model(checkpoints["llama"], "float32")
    plan = model.decode_plan
    inp, caches = _step(model, [5])
    x = model.model.embed_tokens(inp.input_ids)
    rope = model.model.rotary.table(inp.positions, x.dtype)
    m = inp.meta
    args = [x, rope, m.slot_mapping, m.block_tables, m.context_lens, caches]
    tail = [plan.limits, plan.num_heads, plan.num_kv_heads, plan.head_dim, plan.eps, plan.scale]
    with pytest.raises(RuntimeError, match="tensors and"):
        torch.ops.carpool.decode_stack(*args, plan.tensors[:-1], plan.ints, *tail)
    big = torch.zeros(257, x.shape[1])
    with pytest.raises(RuntimeError, match="1 <= T <= 256"):
        torch.ops.carpool.decode_stack(big, *args[1:], plan.tensors, plan.ints, *tail)
    bad_kind = [99, *plan.ints[1:]]
    with pytest.raises(RuntimeError, match="unknown linear kind 99"):
        torch.ops.carpool.decode_stack(*args, plan.tensors, bad_kind, *tail)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_int4_head_beside_a_plain_embedding_runs_in_decode_logits(checkpoints, dtype):
    # The int4 head's kinds (float32: its kernel's float32 logits; bf16: its forward) with the
    # embedding's rows as a plain nn.Embedding: ids to logits in one call, the Python path's bits.
    model = _model(checkpoints["llama"], dtype, "int4")
    rows = model.model.embed_tokens(torch.arange(model.config.vocab_size))
    model.model.embed_tokens = nn.Embedding.from_pretrained(rows, freeze=True)
    plan = decode_stack.attach(model)
    assert plan is not None and plan.head is not None and plan.head.embed_scales is None
    kind = decode_stack.INT4_LOGITS if dtype == "float32" else decode_stack.INT4
    assert plan.head.ints[0] == kind
    for contexts in ([5], [40, 3, 17], [1 + i for i in range(32)]):
        inp, caches = _step(model, contexts)
        logits = decode_stack.logits_calls()
        want, got, taken = _both_paths(model, inp, caches)
        assert taken == 1 and torch.equal(got, want), f"{len(contexts)} rows"
        # (Past the kernel's rows the head stays in Python: QuantizedLinear.logits.)
        assert decode_stack.logits_calls() == logits + (len(contexts) <= plan.head.max_rows)


def test_rows_that_do_not_sample_keep_the_head_in_python(checkpoints):
    # A decode step where one row samples nothing (a static batch's finished seat, say): the
    # layers in one call, the gather of the sampling rows, norm and head from Python.
    model = _model(checkpoints["llama"], "float32")
    assert model.decode_plan.head is not None
    inp, caches = _step(model, [9, 30, 2])
    inp.logits_indices = inp.logits_indices[[0, 2]]
    logits = decode_stack.logits_calls()
    want, got, taken = _both_paths(model, inp, caches)
    assert taken == 1 and decode_stack.logits_calls() == logits
    assert got.shape[0] == 2 and torch.equal(got, want)


def test_decode_logits_refuses_a_bad_head(checkpoints):
    model = _model(checkpoints["llama"], "float32")
    plan, head = model.decode_plan, model.decode_plan.head
    inp, caches = _step(model, [5])
    m = inp.meta
    table = model.model.rotary.cast_table(plan.dtype)
    with pytest.raises(RuntimeError, match="the head needs 3 tensors and 3 ints"):
        torch.ops.carpool.decode_logits(
            inp.input_ids, inp.positions, head.embed, head.embed_scales, table, m.slot_mapping,
            m.block_tables,
            m.context_lens, caches, plan.tensors, plan.ints, plan.limits, head.norm,
            head.tensors[:2], head.ints, plan.num_heads, plan.num_kv_heads, plan.head_dim,
            plan.eps, head.norm_eps, plan.scale,
        )  # fmt: skip
