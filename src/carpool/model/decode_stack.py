"""A pure decode step's decoder layers in one C++ call (``csrc/decode_stack.cpp``).

Why: at batch 1 each decoder layer is ~20 operator calls from Python, each a few microseconds
of interpreter and dispatcher work around a small kernel. On SmolLM2-135M (30 layers) that was
~6.5 ms of a ~15 ms step on a 2-core AMD Zen 3 (``benchmarks/profile_step.py``). The C++
operator runs the same operators, with the same arguments, in the same order as
``DecoderLayer.forward``, so it computes the same bits (tested) with the Python in between gone.

``attach(model)`` (``prepare_model`` calls it) lays the layers' weights out once as the
operator's flat lists (a ``StackPlan``) when every layer is one the operator knows: the four
linears of kinds ``layers.Linear`` (plain, oneDNN-packed or "vnni" weights), ``Int8Linear`` or
``Int4Linear``, no per-head q/k norm (Qwen3 keeps the Python path). ``run`` takes a step when
it is a pure decode step (one token per sequence, the paged decode kernel applies) of at most
the plan's ``max_rows`` sequences on the CPU with the fused operators loaded (``max_rows``: 256,
or 32 where a linear past 32 rows takes a path the operator does not transcribe, such as a bf16
weight's bucket-padded rows); otherwise it returns None
and the model runs its layers from Python. ``run_logits`` takes such a step from token ids to
logits (``carpool::decode_logits``) when every row samples and the plan has a ``HeadPlan``: a
plain or int8 embedding, and a dense head, a bf16 model's quantized head, or a float32 model's
quantized head within the rows its kernel gives float32 logits for (the default SmolLM2 Q4_1
GGUF: a Q8_0 embedding tied to its head). ``CARPOOL_DECODE_STACK=0`` (or ``use_stack(False)``)
keeps the Python path, to compare.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from carpool.model import fused_ops, kernel_build, layers, paged_attention, quant, vnni_linear
from carpool.model.attention import AttentionMetadata
from carpool.model.layers import Linear

ENV_STACK = "CARPOOL_DECODE_STACK"
# The operator's limit: past it GatedMLP computes its rows in chunks, which the operator does not.
MAX_ROWS = layers.MLP_CHUNK_ROWS
# Rows up to which every linear kind runs in the operator as from Python: past them a plain or
# oneDNN-packed bf16 weight's rows are padded to a bucket (layers.bucket_rows), which the
# operator does not do, and a quantized weight whose kernel does not take every row count takes
# another path there (the weight widened for a GEMM, or torch's kernel).
EXACT_ROWS = layers.EXACT_ROWS
# The operator's linear kinds (csrc/decode_stack.cpp).
PLAIN, ONEDNN, VNNI, INT8, INT4 = 0, 1, 2, 3, 4
# A float32 model's quantized head in decode_logits: float32 logits from the int8 / int4 kernel.
INT8_LOGITS, INT4_LOGITS = 5, 6

_lib = kernel_build.Library(
    "carpool_decode_stack", kernel_build.CSRC / "decode_stack.cpp", "decode stack", env=ENV_STACK
)
_calls = 0
_logits_calls = 0


def load() -> bool:
    """Build (first time on this machine) or load the operator now; False when it cannot be
    built or is turned off."""
    return _lib.load()


def use_stack(enabled: bool) -> None:
    """Turn the one-call decode stack on or off in this process (off: the Python layers)."""
    _lib.enabled = enabled


_head = True


def use_head(enabled: bool) -> None:
    """Turn ``run_logits`` on or off in this process (off: the layers in one call, the
    embedding, final norm and head from Python; ``benchmarks/ab_step.py --before head``)."""
    global _head
    _head = enabled


def stack_calls() -> int:
    """How many decode steps ran through the operator in this process (tests check it)."""
    return _calls


def logits_calls() -> int:
    """How many of them ran from token ids to logits (``run_logits``)."""
    return _logits_calls


@dataclass(frozen=True)
class HeadPlan:
    """What ``carpool::decode_logits`` adds around the layers: the embedding's weight (a plain
    ``nn.Embedding`` of the activation dtype) or an int8 embedding's codes and row scales
    (``quant.QuantizedEmbedding`` over an ``Int8Linear``, a GGUF file's Q8_0 token embedding),
    the final norm's weight and eps, the head's three tensor slots and ``[kind, out_features,
    group]``, and the rows up to which the operator takes the head: a float32 model's quantized
    head gives its logits from its kernel there (``QuantizedLinear.logits``), past them it
    rescores in Python."""

    embed: torch.Tensor
    embed_scales: torch.Tensor | None
    norm: torch.Tensor
    norm_eps: float
    tensors: list[torch.Tensor | None]
    ints: list[int]
    max_rows: int


@dataclass(frozen=True)
class StackPlan:
    """A model's layers as the operator's arguments: ``tensors`` (14 per layer: two norm
    weights, then three slots per linear) and ``ints`` (12 per layer: kind, out_features,
    group size per linear), for activations of ``dtype``."""

    tensors: list[torch.Tensor | None]
    ints: list[int]
    dtype: torch.dtype
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    scale: float
    uses_vnni: bool
    limits: list[int]  # the kernel choices' thresholds (see ``_limits``)
    max_rows: int = EXACT_ROWS  # the steps' rows it takes (``_max_rows``)
    head: HeadPlan | None = None  # None: the model's own embedding, norm and head run


def _linear_entry(m: nn.Module, dtype: torch.dtype) -> tuple[list, list[int]] | None:
    """(three tensor slots, [kind, out_features, group]) of one linear; None if not supported."""
    if isinstance(m, Linear):
        if m.layout == "vnni":
            return [m.weight, m.bias_f32, None], [VNNI, m.out_features, 0]
        if m.weight.dtype != dtype and m.layout == "plain":
            return None
        kind = ONEDNN if m.layout == "onednn" else PLAIN
        return [m.weight, m.bias, None], [kind, m.out_features, 0]
    if isinstance(m, quant.Int8Linear) and m.scales.dtype == torch.bfloat16:
        return [m.qweight, m.scales, m.bias], [INT8, m.out_features, 0]
    if (
        isinstance(m, quant.Int4Linear)
        and m.scales_zeros.dtype == torch.bfloat16
        and m.out_features % 64 == 0  # the kernel's output needs no narrowing copy
    ):
        return [m.packed, m.scales_zeros, m.bias], [INT4, m.out_features, m.group_size]
    return None


def build_plan(model: nn.Module) -> StackPlan | None:
    """The ``StackPlan`` of a ``LlamaForCausalLM``, or None when a layer is not one the
    operator runs (see the module docstring)."""
    layers = model.model.layers
    if len(layers) == 0:
        return None
    first = layers[0]
    dtype = first.input_layernorm.weight.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        return None
    eps, attn0 = first.input_layernorm.eps, first.self_attn
    tensors: list[torch.Tensor | None] = []
    ints: list[int] = []
    linears: list[nn.Module] = []
    uses_vnni = False
    for layer in layers:
        attn = layer.self_attn
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if (
            attn.q_norm is not None
            or any(n.eps != eps or n.weight.dtype != dtype for n in norms)
            or (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale)
            != (attn0.num_heads, attn0.num_kv_heads, attn0.head_dim, attn0.scale)
        ):
            return None
        tensors += [n.weight for n in norms]
        for m in (attn.qkv_proj, attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            entry = _linear_entry(m, dtype)
            if entry is None:
                return None
            tensors += entry[0]
            ints += entry[1]
            linears.append(m)
            uses_vnni = uses_vnni or entry[1][0] == VNNI
    max_rows = _max_rows(linears, ints[0::3])
    head = _head_plan(model, dtype, max_rows)
    uses_vnni = uses_vnni or (head is not None and head.ints[0] == VNNI)
    return StackPlan(
        tensors=[None if t is None else t.detach() for t in tensors],
        ints=ints,
        dtype=dtype,
        num_heads=attn0.num_heads,
        num_kv_heads=attn0.num_kv_heads,
        head_dim=attn0.head_dim,
        eps=eps,
        scale=attn0.scale,
        uses_vnni=uses_vnni,
        limits=_limits(),
        max_rows=max_rows,
        head=head,
    )


def _max_rows(linears: list[nn.Module], kinds: list[int]) -> int:
    """The most rows of a step the operator computes as the Python layers would: ``MAX_ROWS``
    where every linear takes one path at any row count up to it (a "vnni" weight; an int4 or
    int8 weight whose fused kernels take every row count here), else ``EXACT_ROWS``.

    Why more than 32: a decode step of 33-64 sequences (``max_num_seqs`` is 64) from Python
    cost the default model ~3-4 ms more (16 operator calls a layer; BENCHMARKS.md, issue 11,
    forty-seventh pass)."""
    int4_every = fused_ops.INT4_GEMV_MAX_ROWS == fused_ops.ANY_ROWS
    # int8: int8_gemv at every count, or past its rows int8_dot at every count (K whole 32s).
    int8_every = fused_ops.INT8_GEMV_MAX_ROWS == fused_ops.ANY_ROWS
    int8_dot_every = fused_ops.int8_dot_max_rows() == fused_ops.ANY_ROWS
    for m, kind in zip(linears, kinds, strict=True):
        if (
            kind in (PLAIN, ONEDNN)
            or (kind == INT4 and not int4_every)
            or (kind == INT8 and not (int8_every or (int8_dot_every and m.in_features % 32 == 0)))
        ):
            return EXACT_ROWS
    return MAX_ROWS


def _head_plan(model: nn.Module, dtype: torch.dtype, max_rows: int) -> HeadPlan | None:
    """The ``HeadPlan`` of a model whose embedding is a plain ``nn.Embedding`` of ``dtype`` or
    an int8 ``QuantizedEmbedding``, and whose head the operator runs; else None. ``max_rows``:
    the layers' (``_max_rows``)."""
    embed, head, norm = model.model.embed_tokens, model.lm_head, model.model.norm
    scales = None
    if type(embed) is nn.Embedding and embed.weight.dtype == dtype:
        weight = embed.weight
    elif (
        isinstance(embed, quant.QuantizedEmbedding)
        and isinstance(embed.source, quant.Int8Linear)
        and embed.source.out_dtype == dtype
    ):
        weight, scales = embed.source.qweight, embed.source.scales
    else:
        return None
    if norm.weight.dtype != dtype:
        return None
    if isinstance(head, quant.QuantizedLinear) and dtype == torch.float32:
        entry = _logits_entry(head)
    elif isinstance(head, (Linear, quant.QuantizedLinear)):
        # A bf16 model's quantized head: QuantizedLinear.logits is its forward, then .float().
        found = _linear_entry(head, dtype)
        entry = None if found is None else (*found, _max_rows([head], [found[1][0]]))
    else:
        entry = None
    if entry is None:
        return None
    slots, ints, entry_rows = entry
    return HeadPlan(
        embed=weight.detach(),
        embed_scales=None if scales is None else scales.detach(),
        norm=norm.weight.detach(),
        norm_eps=norm.eps,
        tensors=[None if t is None else t.detach() for t in slots],
        ints=ints,
        max_rows=min(max_rows, entry_rows),
    )


def _logits_entry(head: nn.Module) -> tuple[list, list[int], int] | None:
    """(three tensor slots, [kind, out_features, group], rows) of a float32 model's quantized
    head whose ``_kernel_logits`` gives every logit from its kernel up to ``rows`` rows (past
    them, and for other heads, ``QuantizedLinear.logits`` rescores: None)."""
    if isinstance(head, quant.Int8Linear) and head.scales.dtype == torch.bfloat16:
        rows = fused_ops.int8_logits_max_rows(head.qweight.numel())
        return [head.qweight, head.scales, head.bias], [INT8_LOGITS, head.out_features, 0], rows
    if isinstance(head, quant.Int4Linear) and head.scales_zeros.dtype == torch.bfloat16:
        ints = [INT4_LOGITS, head.out_features, head.group_size]
        return [head.packed, head.scales_zeros, head.bias], ints, fused_ops.INT4_GEMV_MAX_ROWS
    return None


def attach(model: nn.Module) -> StackPlan | None:
    """Build the operator and ``model``'s plan (kept as ``model.decode_plan``) on the CPU;
    None (and the Python layers) where either is unavailable."""
    if not hasattr(model, "decode_plan"):  # not a LlamaForCausalLM
        return None
    param = next(model.parameters(), None)
    on_cpu = param is not None and param.device.type == "cpu"
    model.decode_plan = build_plan(model) if on_cpu and load() else None
    return model.decode_plan


def splits_mixed(plan: StackPlan | None, decode_rows: int) -> bool:
    """Whether a mixed step's ``decode_rows`` generated-token rows run as a pure decode step
    of their own, which the operator takes (``ModelRunner._ragged_parts``): past
    ``EXACT_ROWS`` of them (up to it the mixed step costs no more than its parts), within the
    plan's rows, with the operators loaded."""
    return (
        plan is not None
        and _lib.active()
        and fused_ops.active()
        and EXACT_ROWS < decode_rows <= plan.max_rows
    )


def _limits() -> list[int]:
    """The thresholds by which the linears pick their kernels (the operator's ``Limits``)."""
    return [
        fused_ops.INT8_GEMV_MAX_ROWS,
        quant.INT8_WIDEN_ABOVE_ROWS,
        fused_ops.INT4_GEMV_MAX_ROWS,
        quant.int4_row_block(),
        int(fused_ops.bf16_emulated()),
        fused_ops.INT8_GEMV_LARGE_CODES,
        fused_ops.INT8_GEMV_LARGE_MAX_ROWS,
        fused_ops.int8_dot_max_rows(),
        int(fused_ops.silu_float32_fused()),
    ]


def _takes(plan: StackPlan, t: int, meta: AttentionMetadata, kv_caches: list[torch.Tensor]) -> bool:
    """Whether the operator takes a step of ``t`` rows: a pure decode step of 1 to max_rows
    rows through the paged kernel, with the operators loaded, none of them a row whose
    quantized linears take the widened weight (``row_paths``: the stack has only the kernels)."""
    return (
        _lib.active()
        and meta.wide_rows is None
        and fused_ops.active()
        and meta.context_lens is not None
        and meta.kernel_rows is None  # else a mixed prefill + decode step
        and 1 <= t <= plan.max_rows
        and paged_attention.applies(kv_caches[0], plan.dtype)
        and (not plan.uses_vnni or vnni_linear.loaded())
    )


def _layer_args(plan: StackPlan, meta: AttentionMetadata, kv_caches: list[torch.Tensor]) -> tuple:
    """The arguments both operators take for the layers, in their order."""
    return (
        meta.slot_mapping,
        meta.block_tables,
        meta.context_lens,
        kv_caches,
        plan.tensors,
        plan.ints,
        plan.limits,
    )


def run_logits(
    plan: StackPlan,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    rope_table: torch.Tensor,
    meta: AttentionMetadata,
    kv_caches: list[torch.Tensor],
) -> torch.Tensor | None:
    """Float32 logits ``[T, vocab]`` of a pure decode step where every row samples, from its
    token ids (``carpool::decode_logits``: embedding, layers, final norm and head in one call),
    or None when the plan has no head or the step is not one the operator takes.
    ``rope_table``: ``RotaryEmbedding.cast_table(plan.dtype)``."""
    global _calls, _logits_calls
    head = plan.head
    t = input_ids.shape[0]
    if head is None or not _head or t > head.max_rows or not _takes(plan, t, meta, kv_caches):
        return None
    logits = torch.ops.carpool.decode_logits(
        input_ids,
        positions,
        head.embed,
        head.embed_scales,
        rope_table,
        *_layer_args(plan, meta, kv_caches),
        head.norm,
        head.tensors,
        head.ints,
        plan.num_heads,
        plan.num_kv_heads,
        plan.head_dim,
        plan.eps,
        head.norm_eps,
        plan.scale,
    )
    _calls += 1
    _logits_calls += 1
    paged_attention.count_calls(len(kv_caches))
    return logits


def run(
    plan: StackPlan,
    x: torch.Tensor,
    rope: torch.Tensor,
    meta: AttentionMetadata,
    kv_caches: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(last layer's MLP output, residual stream before it)`` of every layer over the step's
    embeddings ``x`` (what the model's layer loop returns), or None when the step is not one
    the operator takes (the caller runs the layers)."""
    global _calls
    if (
        x.dtype != plan.dtype
        or not x.is_contiguous()
        or not _takes(plan, x.shape[0], meta, kv_caches)
    ):
        return None
    out = torch.ops.carpool.decode_stack(
        x,
        rope,
        *_layer_args(plan, meta, kv_caches),
        plan.num_heads,
        plan.num_kv_heads,
        plan.head_dim,
        plan.eps,
        plan.scale,
    )
    _calls += 1
    paged_attention.count_calls(len(kv_caches))
    return out[0], out[1]
