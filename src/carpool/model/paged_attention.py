"""Decode attention that reads the paged KV cache in place: a C++ CPU kernel built at first use.

The gather path of ``carpool.model.attention`` copies every sequence's K/V blocks into one
rectangle per layer per step, then runs SDPA over it: at batch 8, context 8k the copy is
larger than the attention itself. For decode steps (every sequence has one query token) on
the CPU this module runs ``carpool::paged_decode_attention`` instead
(``csrc/paged_attention.cpp``): per sequence (and run of kv heads) it walks the block table,
with an online softmax over the blocks, and reads each K/V row once, in place.

The kernel is compiled by ``torch.utils.cpp_extension`` the first time it is needed and cached
under ``~/.cache/carpool/kernels`` (or ``$CARPOOL_KERNEL_CACHE``), keyed on the source, torch's
version and this CPU's instruction set flags (it is built for the host CPU). When it cannot
be built (no compiler, no ninja) one warning says why and decode keeps the gather path, as it
does on every non-CPU device and for prefill steps.

``CARPOOL_DECODE_ATTENTION=gather`` forces the gather path (to compare); ``use_kernel(False)``
does the same in-process.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

from carpool.model import kernel_build, kv_layout, kv_quant

log = logging.getLogger(__name__)

_SOURCE = kernel_build.CSRC / "paged_attention.cpp"
ENV_MODE = "CARPOOL_DECODE_ATTENTION"


class _State:
    """Whether the kernel is loaded, failed, or disabled; how often it ran (for tests)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.op: object | None = None  # torch.ops.carpool.paged_decode_attention once loaded
        self.failed: str | None = None
        self.enabled = os.environ.get(ENV_MODE, "kernel").strip().lower() != "gather"
        self.build_seconds: float | None = None
        self.calls = 0


_state = _State()


def _load() -> object | None:
    """Build (first time on this machine) and load the kernel."""
    _state.build_seconds = kernel_build.load_library("carpool_paged_attention", _SOURCE)
    return torch.ops.carpool.paged_decode_attention


def kernel() -> object | None:
    """The loaded operator, building it on first call; None when it is unavailable."""
    if _state.op is not None or _state.failed is not None:
        return _state.op
    with _state.lock:
        if _state.op is None and _state.failed is None:
            try:
                _state.op = _load()
            except Exception as e:  # no compiler, no ninja, a build error: all mean fall back
                _state.failed = kernel_build.why(e)
                log.warning(
                    "paged decode attention kernel unavailable, decode uses the gather path (%s)",
                    _state.failed,
                )
    return _state.op


def warm_up() -> None:
    """Build or load the kernel now (unless the gather path is forced), not mid-step."""
    if _state.enabled:
        kernel()


_FLOATS = (torch.float32, torch.bfloat16)  # query and output dtypes the kernel computes


def applies(kv_cache: torch.Tensor, query_dtype: torch.dtype | None = None) -> bool:
    """True when a decode step on ``kv_cache`` should run the in-place kernel: a float32 or
    bfloat16 cache, or the int8 layout of ``carpool.model.kv_quant``, with float32 or bfloat16
    queries (``query_dtype``; None: the cache's own) of the cache's dtype, or float32 queries
    over any of the three."""
    query = query_dtype or kv_cache.dtype
    return (
        _state.enabled
        and kv_cache.device.type == "cpu"
        and (kv_cache.dtype in (query, torch.int8) or query == torch.float32)
        and query in _FLOATS
        and kernel() is not None
    )


# Prompt rows at positions below this many tokens per query head of a kv head take the kernel
# too (prompt_kernel_positions): the kernel reads a row's keys once for the kv head's query
# heads, so its work per row grows with the context where the rectangle's SDPA calls share a
# tile's keys among 32 rows, but below it the kernel was faster (no gather of the blocks, no
# padded tiles): one layer's attention of a prompt of n tokens, bf16 cache on the Zen 4, SDPA
# tiles / kernel in ms: small (8 / 8 heads) 1.16 / 0.94 at 256, 5.6 / 4.2 at 512, 15.3 / 21.0 at
# 1,024; SmolLM2 (9 / 3) 1.26 / 0.74, 6.2 / 3.5, 16.2 / 14.3, 45 / 43 at 2,040; medium (16 / 4)
# 3.0 / 1.4, 10.6 / 6.9, 23.4 / 16.5, 99 / 81 (BENCHMARKS.md, issue 11, thirty-ninth pass).
# A float32 cache takes half as many (its K/V twice the bytes): small's 512-token prefill step
# 0.95x with the kernel to 512, 1.05x to 256 (benchmarks/prompt_kernel.py --dtype float32).
# With AMX (an Intel Xeon) the rectangle's bf16 SDPA runs on tiles: small's one-chunk prefill
# step with every row in the kernel against every row in rectangles 1.66x at 16 rows, 1.11x at
# 128, level at 192, 0.89x at 256 and 0.68x at 512. There 128: 1.64x / 1.24x / 1.12x at 16 /
# 64 / 128 rows, 0.92-0.97x past them (the split's cost; 64 gave 0.96x at 128-512, 192 0.86x at
# 256; benchmarks/prompt_kernel.py, issue 11, fortieth pass).
PROMPT_KERNEL_TOKENS = 128 if kernel_build.amx_tiles() else 512

# Without AMX, a bfloat16 cache of 2 or more query heads a kv head: every prompt row takes the
# kernel, at any position. Past the cut-off above, the rectangle (the context gathered, SDPA tiles
# of 32 rows with a mask) was the slower path for grouped heads at every position measured but one
# (level), and more so the longer the context: a chunk of 512 rows from position p, rectangle /
# kernel, on the Zen 4: SmolLM2 (9 / 3, float32 queries) 1.09x from 1,536, 1.04x from 2,560, 0.99x
# from 3,072, 1.43x from 5,120, 1.61x from 7,680; medium (16 / 4) 1.41x / 1.58x / 1.90x from 2,048 /
# 3,584 / 7,680; a random small of 8 / 4 heads 1.07x / 1.09x / 1.32x from 512 / 1,536 / 3,584 (with
# the score loop of before the fifty-second pass too: medium 1.50x from 3,584; the cut-off had been
# measured to 2,040 tokens). Small's 8 / 8 heads keep the cut-off: 0.84x from 1,536 (BENCHMARKS.md,
# issue 11, fifty-second pass), 0.91x with the fifty-third pass's kernel. Not measured on AMX, whose
# tiles run the rectangle's bf16 SDPA: it keeps PROMPT_KERNEL_TOKENS.
GROUPED_PROMPT_ROWS_IN_KERNEL = not kernel_build.amx_tiles()
EVERY_PROMPT_ROW = 1 << 62  # prompt_kernel_positions' "no position is past the cut-off"


def prompt_kernel_positions(
    kv_cache: torch.Tensor, query_dtype: torch.dtype, num_heads: int, num_kv_heads: int
) -> int:
    """Positions below which a prompt row is a kernel row (``build_ragged_batch``'s
    ``kernel_below``): ``PROMPT_KERNEL_TOKENS`` per query head of a kv head where the kernel
    applies to a bfloat16 cache, half as many over a float32 one, else 0 (an int8 cache's
    kernel rounds queries to int8, a GPU's rows take the rectangle), and ``EVERY_PROMPT_ROW``
    for a bfloat16 cache of 2 or more query heads a kv head where
    ``GROUPED_PROMPT_ROWS_IN_KERNEL`` (a CPU without AMX). Fixed for an engine, so a row's path
    follows from its position."""
    if kv_cache.dtype == torch.int8 or not applies(kv_cache, query_dtype):
        return 0
    group = max(num_heads // num_kv_heads, 1)  # query heads a kv head
    if kv_cache.dtype == torch.bfloat16 and group >= 2 and GROUPED_PROMPT_ROWS_IN_KERNEL:
        return EVERY_PROMPT_ROW
    # A float32 cache's rows are twice a bfloat16 one's bytes: out of L2 at half the tokens.
    per_group = PROMPT_KERNEL_TOKENS * 2 // kv_cache.element_size()
    return per_group * group


def quantizes_int8_queries(head_dim: int) -> bool:
    """True when the kernel computes an int8 cache's attention in integer dot products
    (``csrc/int8_attention.h``): a CPU with AVX-512 VNNI, or one with AVX2 and FMA but no
    AVX-512 (the same integers in two instructions each; issue 11, twenty-third pass; the
    kernel is built with ``-march=native``), and ``head_dim`` a multiple of 64. Its queries are
    then rounded to int8 per 64 values (as llama.cpp rounds a query to q8_0 for its q8_0
    cache): scores differ from the dequantized cache's by that rounding (BENCHMARKS.md, issue
    11, twelfth pass)."""
    flags = kernel_build.cpu_flags().split()
    vnni = "avx512_vnni" in flags and "avx512bw" in flags
    avx2 = "avx2" in flags and "fma" in flags and "avx512f" not in flags
    return head_dim % 64 == 0 and (vnni or avx2)


def store(kv_cache: torch.Tensor, slots: torch.Tensor, new_kv: torch.Tensor) -> None:
    """Write ``new_kv`` ``[T, 2, K, D]`` into a float ``kv_cache``'s flat ``slots`` (float32 rows
    into a bfloat16 cache rounded as ``Tensor.to`` rounds them). A bfloat16 cache is in
    ``kv_layout``'s block layout (keys as pairs across a block's tokens), a float32 one rows.

    CPU with the kernel library loaded, float32/bfloat16: one ``carpool::kv_store`` call (a
    memcpy per token and kv head; ``index_copy_`` spent 16 us setting up a decode step's copy).
    Elsewhere ``kv_layout.store`` or ``index_copy_``, which give the same values.
    """
    same = new_kv.dtype == kv_cache.dtype and kv_cache.dtype in _FLOATS
    narrowed = new_kv.dtype == torch.float32 and kv_cache.dtype == torch.bfloat16
    if kv_cache.device.type == "cpu" and (same or narrowed) and kernel() is not None:
        torch.ops.carpool.kv_store(new_kv, kv_cache, slots)
        return
    if kv_cache.dtype == torch.bfloat16:
        kv_layout.store(kv_cache, slots, new_kv)
        return
    t, two, kvh, d = new_kv.shape
    new_kv = new_kv if new_kv.dtype == kv_cache.dtype else new_kv.to(kv_cache.dtype)
    kv_cache.view(-1, two, kvh, d).index_copy_(0, slots, new_kv)


def gather_rows(kv_cache: torch.Tensor, blocks: torch.Tensor, out: torch.Tensor) -> bool:
    """Blocks ``blocks`` ([B] int64) of a bfloat16 ``kv_cache`` as rows into ``out`` ([B, S, 2,
    K, D], float32 or bfloat16): ``index_select`` then ``kv_layout.rows_of_blocks`` in one
    ``carpool::kv_gather_rows`` pass, the same values. False (``out`` untouched) where that
    operator does not apply (another device or dtype, the kernel library not loaded)."""
    if (
        kv_cache.device.type == "cpu"
        and kv_cache.dtype == torch.bfloat16
        and out.dtype in _FLOATS
        and kernel() is not None
    ):
        torch.ops.carpool.kv_gather_rows(kv_cache, blocks, out)
        return True
    return False


def store_int8(kv_cache: torch.Tensor, slots: torch.Tensor, new_kv: torch.Tensor) -> None:
    """Quantize ``new_kv`` ``[T, 2, K, D]`` into the int8 ``kv_cache``'s flat ``slots``.

    CPU with the kernel library loaded: one ``carpool::kv_store_int8`` call (whichever decode
    path is selected: the write must not depend on it). Elsewhere: the same arithmetic in
    torch ops (``kv_quant.store``), which gives the same bytes.
    """
    if kv_cache.device.type == "cpu" and new_kv.dtype in _FLOATS and kernel() is not None:
        torch.ops.carpool.kv_store_int8(new_kv, kv_cache, slots)
    else:
        kv_quant.store(kv_cache, slots, new_kv)


def use_kernel(enabled: bool) -> None:
    """Turn the kernel on or off in this process (off: the gather path, for comparisons)."""
    _state.enabled = enabled


def kernel_calls() -> int:
    """How many times the kernel ran in this process (tests check it was really taken)."""
    return _state.calls


def count_calls(n: int) -> None:
    """Count ``n`` kernel runs made from C++ (the decode stack calls it once per layer)."""
    _state.calls += n


def build_seconds() -> float | None:
    """Seconds the first ``kernel()`` took (compile + load, or load of the cached build)."""
    return _state.build_seconds


def paged_decode_attention(
    query: torch.Tensor,  # [B, H, D], one query token per sequence
    kv_cache: torch.Tensor,  # [num_blocks, block_size, 2, kv_heads, D (+ 4 when int8)]
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    context_lens: torch.Tensor,  # [B] int64: keys each query attends to (itself included)
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    """Attention of one query per sequence over its first ``context_lens[b]`` cached tokens."""
    op = kernel()
    assert op is not None, "paged decode kernel unavailable: check applies() first"
    _state.calls += 1
    return op(query, kv_cache, block_tables, context_lens, scale)  # type: ignore[operator]
