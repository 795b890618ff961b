"""Leaf layers of a LLaMA-family decoder: RMSNorm, rotary embedding, gated MLP.

Numerics follow the Hugging Face reference so that fp32 logits agree to ~1e-5: RMSNorm
normalises in float32 and casts back before the weight multiply; rotary cos/sin tables are
computed in float32 and cast to the activation dtype.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import overload

import torch
import torch.nn.functional as F
from torch import nn

from carpool.config import ModelConfig, RopeScaling
from carpool.model import fused_ops, pages, row_paths, vnni_linear

# Rows of a reduced-precision matmul are padded up to one of a few sizes: exact up to
# ``EXACT_ROWS``, then ``_BUCKETS_PER_OCTAVE`` sizes per power of two (at most 25% padding).
EXACT_ROWS = 32
_BUCKETS_PER_OCTAVE = 4


def bucket_rows(rows: int) -> int:
    """The padded row count of a ``rows``-row bf16 matmul (``rows`` itself up to 32).

    Why: torch's bf16 ``linear`` on CPU goes through oneDNN, which caches a primitive (with
    its packed weights) per input shape, in two LRU caches of 1,024 entries each (oneDNN's
    and ideep's). A continuous batch has a different token count at almost every step, so
    each distinct count of each weight shape added an entry: RSS grew by hundreds of MiB over
    a few thousand requests (issue 15, item 5) until the caches filled. With the count
    bucketed, ~60 sizes per weight shape cover up to 8k tokens, the caches stop growing once
    they saw them, and the steps hit them.
    """
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 1 - (_BUCKETS_PER_OCTAVE.bit_length() - 1))
    return -(-rows // step) * step


# Rows of a step's MLP computed at once. A 1,024-token prefill of SmolLM2-135M otherwise holds a
# [T, 2I] float32 gate/up output and its SwiGLU products at once (~40 MB: the step's resident
# peak, measured -23 MiB with 256-row chunks; llama.cpp's physical batch is 512 tokens).
MLP_CHUNK_ROWS = 256
# No chunk is this short or shorter (a short tail joins the chunk before it): the quantized
# linears pick their kernel by row count, up to 128 rows (checked in carpool.model.quant), so
# every chunk takes the same kind of kernel as the whole step would.
MLP_MIN_CHUNK_ROWS = 128


class _Widened:
    """Widened quantized weights kept while ``widen_once`` is active (None: not active)."""

    cache: dict[tuple[int, torch.dtype, str], torch.Tensor] | None = None


@contextlib.contextmanager
def widen_once() -> Iterator[None]:
    """Within this block each quantized linear widens its weight at most once (``widened``):
    an MLP run in row chunks multiplies every chunk by the same widened weight instead of
    widening it per chunk. The widened copies are dropped on exit."""
    outer = _Widened.cache
    _Widened.cache = {} if outer is None else outer
    try:
        yield
    finally:
        _Widened.cache = outer


def widening_once() -> bool:
    """Whether a ``widen_once`` block is active (a chunked MLP's): a weight widened now serves
    every chunk."""
    return _Widened.cache is not None


def widened(
    owner: nn.Module,
    dtype: torch.dtype,
    make: Callable[[], torch.Tensor],
    layout: str = "plain",
) -> torch.Tensor:
    """``owner``'s weight widened to ``dtype`` (in ``layout``) by ``make()``: made once per
    ``widen_once`` block, every call outside one."""
    cache = _Widened.cache
    if cache is None:
        return make()
    key = (id(owner), dtype, layout)
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, or oneDNN's linear on a weight packed by ``Linear.prepack``."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    y = fused_ops.bf16_linear(x, weight, bias)  # bf16 weights on a CPU without bf16 GEMM
    return F.linear(x, weight, bias) if y is None else y


def linear_bucketed(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` over ``x`` ``[T, K]`` with ``T`` padded to ``bucket_rows(T)`` for
    reduced-precision weights (float32 takes MKL's sgemm, which caches nothing per shape)."""
    rows = x.shape[0]
    padded = bucket_rows(rows)
    # (No padding where bf16_linear multiplies: its cost follows the rows, its sums not.)
    if weight.dtype == torch.float32 or x.dim() != 2 or padded == rows or fused_ops.bf16_emulated():
        return _linear(x, weight, bias)
    out = _linear(F.pad(x, (0, 0, 0, padded - rows)), weight, bias)  # [padded, N]
    return out[:rows]  # contiguous: a prefix of the rows


def packing_on() -> bool:
    """False when ``CARPOOL_PREPACK=0`` keeps every bf16 linear weight plain (to compare)."""
    return os.environ.get(ENV_PREPACK, "1").strip() != "0"


def prepack_available(device: torch.device | str) -> bool:
    """True when bf16 linear weights on ``device`` can be packed for oneDNN (see ``Linear``)."""
    return (
        torch.device(device).type == "cpu"
        and torch.backends.mkldnn.is_available()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        and packing_on()
    )


# Batch-size hint oneDNN picks the packed layout for; one layout then serves every row count.
# Of the hints tried (1, 16, 32, 128; BENCHMARKS.md "Third pass"), 16 and 32 were level and
# ahead at batches 8-32; 1 was 0.7x plain at batch 1.
PREPACK_BATCH_HINT = 32
ENV_PREPACK = "CARPOOL_PREPACK"  # "0": keep plain weights (to compare)


class Linear(nn.Linear):
    """``nn.Linear`` for inference: bf16 weights packed once on the CPU; otherwise a
    matrix-vector fast path for a single input row, and bucketed row counts for more (see
    ``bucket_rows``).

    ``prepack`` picks one of two packed layouts (``layout`` says which):
    - ``"vnni"`` where ``vnni_linear.available`` (AVX-512 BF16, or AVX2 without AVX-512): our
      own AMX loop with prefetched weights, 32 rows at a time, or without AMX an AVX-512 BF16
      matrix-vector loop, or on AVX2 float32 FMA loops, over one copy of the weight, the same
      bits at every row count (see ``carpool.model.vnni_linear``; measured against oneDNN's
      packed linear in BENCHMARKS.md "Fourth pass" with AMX, issue 11's ninth pass without, and
      against ``fused_ops.bf16_linear`` on AVX2 in its twenty-second).
    - ``"onednn"`` elsewhere where oneDNN has bf16 (else the weight stays plain): torch's bf16
      ``linear`` on a plain ``[N, K]`` weight has oneDNN reorder it into its blocked layout
      inside the call, and caches the reordered copy per input shape; packed once at load,
      the weight is read as it is by every call of every shape, and no per-shape copies pile
      up (decode 0.95-1.16x at batch 1, 1.14-1.35x at batch 8 and 0.97-1.30x at batch 32
      against plain weights; BENCHMARKS.md "Third pass").

    Unpacked (``"plain"``), at batch 1 torch's bf16 ``linear`` reads the weight at ~10-14 GB/s,
    while ``torch.mv`` on the same weight reaches ~25-35 GB/s (measured on this machine:
    2816x512 138 us vs 81 us; a 32000x512 LM head 2.0 ms vs 1.2 ms). Same result, same layout.
    """

    layout = "plain"
    bias_f32: torch.Tensor | None = None  # the "vnni" kernel adds the bias in float32

    def prepack(self, layout: str | None = None, in_place: bool = False) -> bool:
        """Replace a CPU bf16 weight by a packed layout (``"vnni"``, ``"onednn"``, or None for
        the best available). Returns whether it did. Call it once the model is loaded and
        placed: a packed weight cannot be moved, sliced or shared; ``dense_weight()`` gives
        the plain matrix back.

        ``in_place``: the VNNI layout is written over the plain weight's bytes (no second copy
        of the matrix while packing: ``vnni_linear.pack_in_place``) where no other tensor is
        over them and nothing but this module holds the parameter; a new copy otherwise."""
        w = self.weight
        if self.layout != "plain" or w.dtype != torch.bfloat16 or not packing_on():
            return False
        vnni_ok = vnni_linear.available(w.device) and vnni_linear.packable(w)
        if layout is None:
            layout = "vnni" if vnni_ok else "onednn"
        if layout == "onednn" and not prepack_available(w.device):
            return False
        if layout == "vnni":
            if not vnni_ok:
                return False
            packed = vnni_linear.pack_in_place(w.detach()) if in_place and _sole_tensor(w) else None
            if packed is None:
                packed = vnni_linear.pack(w.detach())
            self.bias_f32 = None if self.bias is None else self.bias.detach().float()
        elif layout == "onednn":
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PREPACK_BATCH_HINT)
        else:
            raise ValueError(f"unknown linear layout {layout!r}: vnni, onednn or None")
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.layout = layout
        return True

    def dense_weight(self) -> torch.Tensor:
        """The ``[out_features, in_features]`` weight, whatever the layout (a copy if packed)."""
        if self.layout == "vnni":
            return vnni_linear.unpack(self.weight.detach(), self.out_features)
        if self.layout == "onednn":
            return self.weight.to_dense()
        return self.weight.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "vnni":
            if x.dim() == 2 and x.is_contiguous():  # the model's case: one op, no views
                return torch.ops.carpool.vnni_linear(
                    x, self.weight, self.bias_f32, self.out_features
                )
            n, k = self.out_features, x.shape[-1]
            out = vnni_linear.linear(x.reshape(-1, k), self.weight, self.bias_f32, n)
            return out.view(*x.shape[:-1], n)
        if x.dim() == 2 and x.shape[0] == 1 and self.layout == "plain":
            y = fused_ops.bf16_linear(x, self.weight, self.bias)  # a CPU without bf16 GEMM
            if y is not None:
                return y
            out = torch.mv(self.weight, x[0]).unsqueeze(0)
            return out if self.bias is None else out + self.bias
        return linear_bucketed(x, self.weight, self.bias)


def _sole_tensor(param: nn.Parameter) -> bool:
    """Whether ``param`` is the one tensor over its bytes (``pages.sole_tensor_over``) and only
    its module refers to it, so its bytes can be rewritten in place without anyone seeing it.
    The parameter's references counted: its module's dict, the caller's variable (the caller
    being ``Linear.prepack``), this function's and ``getrefcount``'s argument."""
    return pages.sole_tensor_over(param) and sys.getrefcount(param) <= 4


def prepack_linears(model: nn.Module) -> int:
    """``Linear.prepack`` every linear of ``model`` whose weight no other parameter shares (a
    head tied to the embedding keeps its plain weight: the embedding reads it by rows), over
    its own bytes where nothing else refers to them (``in_place``). Returns how many were
    packed."""
    # Counted in a generator (its own scope): a loop variable left holding the last parameter
    # (the plain head) kept its 65 MB alive past the final trim below.
    users = Counter(
        p.untyped_storage().data_ptr()
        for _, p in model.named_parameters(remove_duplicate=False)
        if not p.is_mkldnn  # a packed oneDNN weight has no storage (and is not shared)
    )
    packed = since_trim = 0
    for m in model.modules():
        if (
            isinstance(m, Linear)
            and m.layout == "plain"
            and users.get(m.weight.untyped_storage().data_ptr(), 0) == 1
            and m.prepack(in_place=True)
        ):
            packed += 1
            since_trim += m.weight.nbytes
            if since_trim >= pages.TRIM_EVERY:
                # Each plain weight is freed as its packed copy replaces it; without trims
                # the heap kept them (the medium bf16 model: +84 MiB at the end of packing).
                pages.trim_heap()
                since_trim = 0
    if packed:
        pages.trim_heap()
    return packed


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension (no mean subtraction, no bias).

    ``norm(x)`` normalises ``x``; ``norm(x, residual)`` first adds ``x`` into the residual
    stream and returns ``(normalised sum, sum)`` (one fused pass on the CPU: ``fused_ops``).
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @overload
    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...

    @overload
    def forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return fused_ops.rms_norm(x, self.weight, self.eps)
        return fused_ops.add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies ``theta^(-2i/d)``, adjusted by ``rope_scaling`` (llama3 or linear)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None or scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with a precomputed cos/sin table indexed by position.

    The table is a non-persistent ``[max_position, 2, head_dim]`` float32 buffer holding cos
    and a *sign-folded* sin (``-sin`` on the first half), so the rotation needs no negation;
    looking up ``positions`` is one gather per step, shared by every layer.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("cos_sin_cached", torch.empty(0), persistent=False)
        # The table cast to the activation dtype, made on first use: saves a cast per step.
        self._cast: dict[torch.dtype, torch.Tensor] = {}
        if self.cos_sin_cached.device.type != "meta":  # built for loading: tables after
            self.reset_tables()

    def reset_tables(self) -> None:
        """(Re)compute the float32 tables, e.g. after the model was built on the meta device."""
        c = self.config
        device = self.cos_sin_cached.device
        self._cast = {}
        if device.type == "meta":
            # A model run on the meta device (tests check the non-CPU path's shapes and
            # devices there): a table of the right shape, no memory.
            shape = (c.max_position_embeddings, 2, c.head_dim)
            self.cos_sin_cached = torch.empty(shape, device=device)
            return
        inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling).to(device)
        t = torch.arange(c.max_position_embeddings, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        half = c.head_dim // 2
        sign = torch.ones(c.head_dim, device=device)
        sign[:half] = -1.0
        self.cos_sin_cached = torch.stack((emb.cos(), emb.sin() * sign), dim=1)  # [P, 2, D]

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # ``.to(device)`` etc. replace the buffer: drop casts of the old one.
        self._cast = {}
        return super()._apply(fn, recurse)

    def cast_table(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole ``[max_position, 2, D]`` table in ``dtype`` (cast once, then kept)."""
        table = self._cast.get(dtype)
        if table is None:
            # No check of the buffer's device here: ``_apply`` (``.to()`` and the like) and
            # ``reset_tables``, what replaces the buffer, drop the casts. This runs in every
            # decode step, right after the weights' stream, where reading the buffer (through
            # ``Module.__getattr__``) and comparing two devices cost ~20 us.
            table = self._cast[dtype] = self.cos_sin_cached.to(dtype)
        return table

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[T, 2, D]``: cos and sign-folded sin of flat positions ``[T]`` (one gather)."""
        return self.cast_table(dtype).index_select(0, positions)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos and sign-folded sin, each ``[T, 1, D]``, for flat positions ``[T]``."""
        cs = self.table(positions, dtype)
        return cs[:, :1], cs[:, 1:]


def rotate_in_place(x: torch.Tensor, cs: torch.Tensor) -> None:
    """Rotate ``x`` ``[T, H, D]`` in place by the ``[T, 2, D]`` table of
    ``RotaryEmbedding.table``: one fused operator on the CPU, else ``apply_rotary``."""
    if not fused_ops.rotary_(x, cs):
        apply_rotary(x, cs[:, :1], cs[:, 1:], out=x)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate ``x`` ``[T, H, D]`` by the half-split convention used by HF Llama checkpoints.

    ``sin`` is sign-folded (``-sin`` on the first half, as ``RotaryEmbedding`` returns it), so
    ``rotate_half(x) * sin`` is ``roll(x) * sin``: three ops (roll, mul, addcmul) instead of
    the reference's six (two slices, neg, cat, two muls and an add). ``out`` may alias ``x``:
    both products are computed into temporaries before ``addcmul`` writes.
    """
    rolled = x.roll(x.shape[-1] // 2, dims=-1)
    if out is None:
        return torch.addcmul(x * cos, rolled, sin)
    return torch.addcmul(x * cos, rolled, sin, out=out)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` with gate and up fused in one matmul."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        i = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * i, bias=config.mlp_bias)
        self.down_proj = Linear(i, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        if x.dim() != 2 or t <= MLP_CHUNK_ROWS:
            return self._swiglu(x)
        bounds = [*range(0, t, MLP_CHUNK_ROWS), t]
        if bounds[-1] - bounds[-2] <= MLP_MIN_CHUNK_ROWS:
            del bounds[-2]  # the short tail joins the chunk before it
        wide = row_paths.current()
        with widen_once():  # quantized weights widened once for all the chunks
            # The chunks' [rows, hidden] outputs are small next to their [rows, 2I] temporaries.
            chunks = zip(bounds, bounds[1:], strict=False)
            if wide is None:
                return torch.cat([self._swiglu(x[i:j]) for i, j in chunks])
            out = []
            for i, j in chunks:  # each chunk's own wide rows (row_paths)
                with row_paths.use(wide.within(i, j)):
                    out.append(self._swiglu(x[i:j]))
            return torch.cat(out)

    def _swiglu(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward(fused_ops.silu_and_mul(self.gate_up_proj.forward(x)))
