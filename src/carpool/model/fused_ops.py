"""Fused RMSNorm, residual add + RMSNorm, SwiGLU activation, the greedy argmax and int8/int4
weight-only products of a few rows: C++ on the CPU, torch elsewhere.

``csrc/fused_ops.cpp`` does each in one pass over the rows (see its header for why and for the
numerics, which are the torch ops'). It is built like the paged decode kernel
(``kernel_build``), at the model runner's start; until it is built, when it cannot be, on other
devices, other dtypes or strided inputs, the functions here run the same math as torch ops.
``CARPOOL_FUSED_OPS=0`` keeps the torch ops (to compare).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from carpool.model import kernel_build

_SOURCE = kernel_build.CSRC / "fused_ops.cpp"
ENV_FUSED = "CARPOOL_FUSED_OPS"
_DTYPES = (torch.float32, torch.bfloat16)


_lib = kernel_build.Library("carpool_fused_ops", _SOURCE, "fused CPU ops", env=ENV_FUSED)
_calls = 0


def load() -> bool:
    """Build (first time on this machine) or load the operators now; False (and one warning)
    when they cannot be built, or when turned off."""
    return _lib.load()


def failure() -> str | None:
    """Why the operators could not be built (None when they were, or were not tried)."""
    return _lib.failed


def use_fused(enabled: bool) -> None:
    """Turn the fused operators on or off in this process (off: torch ops, for comparisons)."""
    _lib.enabled = enabled


def _fused(*tensors: torch.Tensor) -> bool:
    # Only once loaded: the model runner loads them at start; a model used without a runner
    # (tests, the parity reference) keeps torch ops rather than compiling mid-forward. Plain
    # early returns: this runs ~5 times per layer per step.
    global _calls
    if not _lib.active():
        return False
    t = tensors[0]
    dtype = t.dtype
    if not t.is_cpu or dtype not in _DTYPES:
        return False
    for x in tensors:
        if x.dtype != dtype or not x.is_contiguous():
            return False
    _calls += 1
    return True


def active() -> bool:
    """True when the fused operators are loaded and turned on (the decode stack calls them)."""
    return _lib.active()


def fused_calls() -> int:
    """How many times a fused operator ran in this process (tests check it was taken)."""
    return _calls


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * rms_norm(x in float32).to(x.dtype)`` over the last dimension."""
    if _fused(x, weight):
        return torch.ops.carpool.rms_norm(x, weight, eps)
    # Normalise in float32 and round to the activation dtype *before* the weight multiply,
    # exactly as the HF reference does. The one-op ``F.rms_norm(x, shape, weight)`` on a
    # bfloat16 input was tried (three fewer dispatches) and broke SmolLM2-135M in bf16 (its
    # greedy answer to "What is the capital of France?" became French gibberish).
    x32 = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``: the residual stream's add and the next norm."""
    if x.shape == residual.shape and _fused(x, residual, weight):
        out, total = torch.ops.carpool.add_rms_norm(x, residual, weight, eps)
        return out, total
    total = x + residual
    return rms_norm(total, weight, eps), total


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up`` is ``[..., 2 * I]`` (gate first).

    Fused for bfloat16, and for float32 where the kernel's float32 path gives torch's bits
    (``silu_float32_fused``): there it computes silu as torch's CPU kernel does, with torch's
    own vector exp (Sleef's). The bf16 path's polynomial exp (relative error ~2e-7) differs
    from torch's in the last bits, and in float32 that flipped the default model's greedy
    answer to "What is the capital of France?" (see ``rotary_``).
    """
    dtype = gate_up.dtype
    if (dtype == torch.bfloat16 or (dtype == torch.float32 and silu_float32_fused())) and _fused(
        gate_up
    ):
        return torch.ops.carpool.silu_and_mul(gate_up)
    return _torch_silu_and_mul(gate_up)


def _torch_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu_and_mul`` in torch's own ops (the reference the float32 kernel must match)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_float32_fused() -> bool:
    """Whether the float32 SwiGLU takes the kernel: where it gives the bits of torch's
    ``F.silu(gate) * up`` on a probe of rows with and without a scalar tail, magnitudes from
    1e-3 to 200, signed zeros, infinities and NaN (checked once, after the operators load).
    The kernel calls the exp of torch's vector loop for the instruction set it was built for;
    where torch dispatches to another (``ATEN_CPU_CAPABILITY``), the bits may differ and
    torch's two ops stay. On a Zen 4: 2.0x torch's two ops at one row of SmolLM2's 1536,
    1.35-1.7x at 16-32 rows (issue 11, thirty-sixth pass)."""
    global _silu_float32
    if _silu_float32 is None:
        if not _lib.active():
            return False
        g = torch.Generator().manual_seed(0)
        probe = [
            torch.randn(3, 2 * n, generator=g) * m for n in (69, 1536) for m in (1e-3, 4.0, 200.0)
        ]
        special = torch.tensor(
            [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 88.0, -104.0, 1e-40]
        )
        probe.append(special.repeat(2, 8))
        _silu_float32 = all(
            torch.equal(
                torch.ops.carpool.silu_and_mul(gu).view(torch.int32),
                _torch_silu_and_mul(gu).view(torch.int32),
            )
            for gu in probe
        )
    return _silu_float32


_silu_float32: bool | None = None


def use_silu_float32(enabled: bool | None) -> None:
    """Force the float32 SwiGLU's path (True: the kernel, False: torch's ops; None: the
    probe's choice), for benchmarks/ab_step.py's per-step A/B. A decode stack keeps the
    choice it was built with (its plan's limits)."""
    global _silu_float32
    _silu_float32 = enabled


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first maximal index of ``[R, V]`` logits (``logits.max(-1).indices``; a NaN
    counts as the largest value)."""
    if (
        logits.dim() == 2
        and logits.shape[1] > 0
        and logits.dtype == torch.float32
        and _fused(logits)
    ):
        return torch.ops.carpool.argmax_rows(logits)
    return logits.max(-1).indices


def rotary_(x: torch.Tensor, cs: torch.Tensor) -> bool:
    """Rotate ``x`` ``[T, H, D]`` in place by the step's ``[T, 2, D]`` cos / sign-folded sin
    table (``RotaryEmbedding.table``), as ``layers.apply_rotary`` does; False (and ``x``
    untouched) where the fused operator does not apply.

    Bit for bit torch's result in float32 and bfloat16 (tested): a first version let the
    compiler fuse the other product into its multiply-add, and that last-bit difference was
    enough to flip the default model's greedy answer to "What is the capital of France?"
    (SmolLM2 Q4_1 runs float32 activations; its first token leads by 0.01). The kernel now
    rounds ``x * cos`` and adds the rolled product with one explicit fused multiply-add, as
    torch's ``addcmul`` does.
    """
    if (
        x.dtype in _DTYPES
        and x.device.type == "cpu"
        and x.dim() == 3
        and x.stride(2) == 1
        and x.shape[2] % 2 == 0
        and x.shape[2] <= 1024
        and cs.dtype == x.dtype
        and _fused(cs)  # last: it counts the call as taken (x is strided: checked above)
    ):
        torch.ops.carpool.rotary_(x, cs)
        return True
    return False


def _int8_layout(qweight: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether ``qweight``/``scales`` are ``quant.Int8Linear``'s layout: contiguous int8 codes
    and bf16 row scales (what the int8 kernels read)."""
    return (
        qweight.dtype == torch.int8
        and scales.dtype == torch.bfloat16
        and qweight.is_contiguous()
        and scales.is_contiguous()
    )


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """``(x @ qweight.T) * scales`` for up to ``int8_gemv_max_rows`` rows ``x`` ``[M, K]``, int8
    ``qweight`` ``[N, K]`` and bf16 ``scales`` ``[N]`` (``quant.Int8Linear``'s layout): bf16
    ``x`` to bf16 out, or float32 ``x`` rounded to bf16 inside and the bf16 result widened
    (what casting around torch's kernel does); None where the fused kernel does not apply (the
    caller runs torch's)."""
    if (
        x.dim() == 2
        and 1 <= x.shape[0] <= int8_gemv_max_rows(qweight.numel())
        and x.dtype in (torch.float32, torch.bfloat16)
        and _int8_layout(qweight, scales)
        and _fused(x)
    ):
        return torch.ops.carpool.int8_gemv(x, qweight, scales)
    return None


def int8_dot(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """``int8_gemv``'s product for a decode batch past its rows: ``(x @ qweight.T) * scales``
    for ``int8_gemv_max_rows(codes)`` < M <= ``INT8_DOT_MAX_ROWS`` rows, in bf16 dot products
    (x rounded to bf16 inside, float32 sums, the result rounded to bf16 and returned in x's
    dtype, as int8_gemv); None where it does not apply (the caller runs torch's kernel or the
    widened GEMM). A row's result does not depend on the rows beside it."""
    if (
        x.dim() == 2
        and int8_gemv_max_rows(qweight.numel()) < x.shape[0] <= int8_dot_max_rows()
        and x.shape[1] % 32 == 0
        and x.dtype in _DTYPES
        and _int8_layout(qweight, scales)
        and _fused(x)
    ):
        return torch.ops.carpool.int8_dot(x, qweight, scales)
    return None


def int8_logits(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor | None:
    """A vocabulary head's float32 logits ``(x @ qweight.T) * scales`` for float32 ``x``
    ``[R, K]``, up to ``int8_logits_max_rows`` rows: ``int8_gemv``'s kernel without its bf16
    roundings (x as it is, float32 sums), so every logit is the dequantized weight's in float32
    but for the order of the sums; on AMX CPUs (``int8_logits_fixed()``) exact integer sums of
    x in fixed point (27 bits of its row's largest value), rounded once to float32. None where
    it does not apply (the caller rescores)."""
    if (
        x.dim() == 2
        and x.dtype == torch.float32
        and 1 <= x.shape[0] <= int8_logits_max_rows(qweight.numel())
        and _int8_layout(qweight, scales)
        and _fused(x)
    ):
        return torch.ops.carpool.int8_logits(x, qweight, scales)
    return None


def int8_logits_at(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor | None:
    """``int8_logits(x, qweight, scales).gather(1, ids)``, the same bits, computing only the
    ``[R, J]`` columns ``ids`` (any row count: the rescoring of top logits computed in bf16
    elsewhere); None where it does not apply."""
    if (
        x.dim() == 2
        and x.dtype == torch.float32
        and ids.dim() == 2
        and ids.dtype == torch.int64
        and _int8_layout(qweight, scales)
        and _fused(x)
    ):
        return torch.ops.carpool.int8_logits_at(x, qweight, scales, ids.contiguous())
    return None


def bf16_emulated() -> bool:
    """True on a CPU whose torch has no fast bf16 GEMM: no oneDNN bf16 (it needs AVX-512 or
    AMX), so torch's bf16 ``linear`` takes its generic loops (an AMD Zen 3 with AVX2 ran it
    3-5x slower than float32 at 8-32 rows). There ``bf16_linear`` multiplies bf16 weights."""
    return _BF16_EMULATED


_BF16_EMULATED = (
    not torch.backends.mkldnn.is_available()
    or not bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
) and torch.backends.cpu.get_cpu_capability() == "AVX2"

_AVX512_BF16 = "avx512_bf16" in kernel_build.cpu_flags().split()
# A row limit that is none: the kernel takes every row count.
ANY_ROWS = sys.maxsize
# Where the quantized kernels take every row count (ANY_ROWS, below): where bf16 is emulated,
# and on AVX-512 BF16 (an AMD Zen 4 / Zen 5, an Intel Xeon with AMX), whose int4 kernel decodes
# a group's codes once for many rows (a prefill's) and whose int8_dot takes every count past
# int8_gemv's 8 rows, in the same sums (int8_gemv runs int8_dot's loop there, for K a multiple
# of 32, as every Q8_0 weight's: a row's bits at any row count). With AMX too since the
# fortieth pass: there a prefill's rows took the weight widened to bf16 for a GEMM on tiles past
# 4 rows, so a row's numbers depended on its step (a quantized test model's greedy tokens
# changed with the prefill's chunking; BENCHMARKS.md, issue 11, fortieth pass). Since the
# forty-first pass a prompt's rows take the widened weight on AMX again, chosen by the
# row's position rather than by the step's row count (quant.wide_prompt_from, row_paths).
_EVERY_ROW_COUNT = _BF16_EMULATED or _AVX512_BF16


def rows_invariant() -> bool:
    """Whether, with this CPU's row limits, a quantized linear computes a row's bits whatever
    rows share its step (a Q8_0 weight's K a multiple of 32): where the kernels take every row
    count in one sum order (``_EVERY_ROW_COUNT``). Elsewhere (AVX-512 without BF16) a prefill's
    rows take the widened weight's GEMM past a limit. (A prompt's rows on AMX take the
    widened weight by their position, ``quant.wide_prompt_from``: a row's bits follow from the
    row there too.)"""
    return _EVERY_ROW_COUNT


# Where _EVERY_ROW_COUNT the fused int4 and int8 kernels take every row count, a prefill's too,
# rather than handing a step of more than 128 rows to the weight widened to bf16: that GEMM
# rounds differently (the widened weights, the sums' order), so a row's numbers depended on how
# many rows shared its step. A decoding request's logprobs moved by up to 0.06 whenever another
# request's prompt arrived (the default SmolLM2 Q4_1 model), and greedy tokens differed between
# batching strategies (3 of 8 prompts, sequential against continuous, on a Zen 4 too). One
# kernel at every row count: a row computes the same bits alone or in any step (tested). The
# price where bf16 is emulated (a Zen 2): a 512-token prompt's step of SmolLM2 ~1.1x slower, of
# a Q8_0 model 1.04-1.12x (BENCHMARKS.md, issue 11, twenty-ninth pass); on a Zen 4 see the
# thirtieth pass. With AMX a prompt's rows take the widened weight by position (above).
# Rows up to which int4_gemv takes an int4 weight-only product (the kernel takes any count):
# where bf16 is emulated every count (above; it measured 1.3-2x torch's
# _weight_int4pack_mm_for_cpu at 4-64 rows there: benchmarks/quant_kernels.py, BENCHMARKS.md
# "Sixth pass"); on AVX-512 BF16 without AMX (a Zen 4) every count too: at 1-128 rows of
# SmolLM2-135M's layer matrices it measured 1.10-1.29x torch's with a float32 x (the casts
# included) and 1.04-1.12x with a bf16 one (BENCHMARKS.md, issue 11, eleventh pass), past them
# see _EVERY_ROW_COUNT; on AVX-512 without BF16 up to quant.INT4_WIDEN_ABOVE_ROWS.
INT4_GEMV_MAX_ROWS = ANY_ROWS if _EVERY_ROW_COUNT else 128
# Rows up to which int8_gemv takes an int8 weight-only product (the kernel takes any count):
# where bf16 is emulated (AVX2) every count (above; up to 128 before, since there it measured
# 1.0-1.5x torch's _weight_int8pack_mm at 1-32 rows and level with bf16_linear on the widened
# codes without widening them: BENCHMARKS.md "Sixth pass"); on AVX-512 1-8, since its four-row
# tiles: on a Zen 4 1.18-1.40x torch's kernel (with the casts a float32 model needs) at 4-8
# rows of the small model's layer matrices, 0.85-1.25x at 12, level at 16 (BENCHMARKS.md,
# issue 11, eleventh pass; with AVX-512 BF16 its loop is int8_dot's since the thirty-first
# pass: 0.96x the float32-FMA loop at one row, 1.3-2.1x at 2-8), past them int8_dot: the same
# bits. Every weight takes it, for a bf16 or a float32 input (a float32 one saves the two casts
# around torch's bf16 kernel; on a Zen 4 the layer matrices at one row went faster through it
# too: the small Q8_0 model's batch-1 step 3.11-3.92 ms against 3.86-5.26 with torch's, tenth
# pass). AMX machines had kept torch's kernel for bf16 inputs to layer matrices (0.92x there at
# one row, "Third pass") until the fortieth pass: other sums than int8_dot's past 8 rows, so a
# row's bits depended on its step.
INT8_GEMV_MAX_ROWS = ANY_ROWS if _BF16_EMULATED else 8
# Codes (N x K) from which an int8 weight counts as a vocabulary head rather than a layer matrix.
INT8_GEMV_LARGE_CODES = 1 << 22
# Weights of at least INT8_GEMV_LARGE_CODES codes (vocabulary heads) take int8_gemv up to
# INT8_GEMV_LARGE_MAX_ROWS rows. On an AMD Zen 4 a head's other paths are no faster
# at 8-32 rows (SmolLM2's 49152 x 576 head: int8_gemv 4.0 / 10.6 / 23.0 ms at 8 / 16 / 32 rows,
# torch's kernel 5.7 / 11.5 / 23.0, widened to bf16 23.4 / 8.8 / 24.3), and widening it
# holds a 57 MB bf16 copy for the step: the resident peak of a batch-32 decode (BENCHMARKS.md,
# issue 11, ninth pass); AMX machines take the same limit since the fortieth pass (before, 4
# rows, then the widened head on tiles; its speed there is inside the peers' decode figures,
# 0.98-1.09x at 16-32 rows). Where bf16 is emulated: every count, as INT8_GEMV_MAX_ROWS.
INT8_GEMV_LARGE_MAX_ROWS = INT8_GEMV_MAX_ROWS if _BF16_EMULATED else 128


# Rows up to which int8_dot takes the layer matrices past int8_gemv's rows: on AVX-512 BF16 without
# AMX (an AMD Zen 5), a pass over the small model's 32 layer matrices from memory with float32
# inputs (benchmarks/int8_dot.py) took 1.07 / 1.83 / 3.04 / 5.50 ms at 9 / 16 / 32 / 64 rows
# against 2.32 / 3.09 / 5.90 / 10.76 for torch's kernel and 3.18 / 3.64 / 4.74 / 6.14 for the
# widened GEMM (what ran at 9-16 and 17+ rows before), and level with the widened GEMM at
# 96-128 rows (BENCHMARKS.md, issue 11, twenty-first pass); past them too where
# _EVERY_ROW_COUNT: on a Zen 4 11.8 / 21.2 / 80.1 ms at 64 / 128 / 512 rows against 17.9 /
# 30.2 / 82.4 widened (thirtieth pass), and a row's bits at any count. 0: not here (no AVX-512
# BF16 in the build, or the operators not loaded).
INT8_DOT_MAX_ROWS = ANY_ROWS if _EVERY_ROW_COUNT else 64


def int8_dot_max_rows() -> int:
    """``INT8_DOT_MAX_ROWS`` where ``int8_dot`` runs here, else 0 (known once loaded)."""
    global _int8_dot_here
    if _int8_dot_here is None:
        if not _lib.active():
            return 0
        fast = bool(torch.ops.carpool.int8_dot_fast()) and not _BF16_EMULATED
        _int8_dot_here = fast
    return INT8_DOT_MAX_ROWS if _int8_dot_here else 0


_int8_dot_here: bool | None = None

# Rows up to which int8_logits gives a float32 model's int8 head of fewer than
# INT8_GEMV_LARGE_CODES codes every logit; past them QuantizedLinear rescores its bf16
# product's top logits (the same greedy tokens, logprobs of other bits than in a step that
# samples fewer rows). Every count where _EVERY_ROW_COUNT: at INT8_GEMV_MAX_ROWS (its limit
# before) a small-vocabulary Q8_0 model's logprobs depended on how many rows its step sampled,
# and its float32 loop over a small head costs little at any count. A vocabulary head's limit:
# INT8_GEMV_LARGE_MAX_ROWS (past it 1.5-1.8x the rescored head's time on a Zen 4).
INT8_LOGITS_MAX_ROWS = ANY_ROWS if _EVERY_ROW_COUNT else INT8_GEMV_MAX_ROWS

# The row limits above, by name (tests and benchmarks set them to other values).
ROW_LIMITS = (
    "INT4_GEMV_MAX_ROWS",
    "INT8_GEMV_MAX_ROWS",
    "INT8_GEMV_LARGE_MAX_ROWS",
    "INT8_DOT_MAX_ROWS",
    "INT8_LOGITS_MAX_ROWS",
)


def int8_gemv_max_rows(codes: int) -> int:
    """Rows up to which ``int8_gemv`` takes a weight of ``codes`` codes."""
    return INT8_GEMV_LARGE_MAX_ROWS if codes >= INT8_GEMV_LARGE_CODES else INT8_GEMV_MAX_ROWS


def int8_logits_max_rows(codes: int) -> int:
    """Rows up to which ``int8_logits`` takes a head of ``codes`` codes."""
    return INT8_GEMV_LARGE_MAX_ROWS if codes >= INT8_GEMV_LARGE_CODES else INT8_LOGITS_MAX_ROWS


def bf16_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``F.linear`` for a plain bf16 ``weight`` ``[N, K]`` and ``x`` ``[M, K]`` (bf16 or float32,
    any M) in float32 sums rounded once to ``x``'s dtype, on CPUs where ``bf16_emulated()``;
    None where the kernel does not apply (the caller runs torch's)."""
    if (
        _BF16_EMULATED
        and x.dim() == 2
        and weight.dtype == torch.bfloat16
        and not weight.is_mkldnn
        and weight.is_contiguous()
        and _fused(x)
    ):
        return torch.ops.carpool.bf16_linear(x, weight, bias)
    return None


def int4_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    group_size: int,
    scales_zeros: torch.Tensor,
    block: int,
) -> torch.Tensor | None:
    """``torch.ops.aten._weight_int4pack_mm_for_cpu`` for up to ``INT4_GEMV_MAX_ROWS`` rows ``x``
    ``[M, K]`` over the same packed codes and bf16 ``scales_zeros`` (``quant.Int4Linear``'s CPU
    layout, interleaved in ``block`` output rows: ``quant.int4_row_block()``), with a float32
    ``x`` rounded to bf16 inside and the bf16 result returned in ``x``'s dtype (what casting
    around torch's kernel does); None where the fused kernel does not apply (the caller runs
    torch's). ``[M, N padded to 64]`` out, like torch's."""
    if _int4_takes(x, packed, scales_zeros, _DTYPES):
        return torch.ops.carpool.int4_gemv(x, packed, group_size, scales_zeros, block)
    return None


def int8_logits_fixed() -> bool:
    """Whether ``int8_logits`` and ``int8_logits_at`` compute here on AMX tiles in integers:
    each row of x in fixed point (times 2^e, e from its largest magnitude, rounded to integers
    of up to 27 bits), the exact integer sums with the codes, then ``float32(double(sum) *
    (scale * 2^-e))``: a logit's bits follow from its row and column alone, whatever the
    order of the sums."""
    return active() and bool(torch.ops.carpool.int8_logits_fixed())


def int4_amx() -> bool:
    """Whether ``int4_gemv`` multiplies on AMX tiles here (every row count, groups a multiple
    of 32): its sums then take AMX's order of adds, not ``int4_logits``' (a row's bits still do
    not depend on the rows beside it)."""
    return active() and bool(torch.ops.carpool.int4_gemv_amx())


def int4_logits(
    x: torch.Tensor,
    packed: torch.Tensor,
    group_size: int,
    scales_zeros: torch.Tensor,
    block: int,
) -> torch.Tensor | None:
    """An int4 vocabulary head's float32 logits ``[M, N padded to 64]`` for float32 ``x``
    ``[M, K]``, up to ``INT4_GEMV_MAX_ROWS`` rows: ``int4_gemv``'s dot-product loops without
    their bf16 roundings (x as it is, float32 sums in input order; never AMX's tiles, which
    take bf16 inputs), so every logit is the dequantized weight's in float32 but for the order
    of the sums; None where it does not apply (the caller rescores)."""
    if _int4_takes(x, packed, scales_zeros, (torch.float32,)):
        return torch.ops.carpool.int4_logits(x, packed, group_size, scales_zeros, block)
    return None


def int4_logits_at(
    x: torch.Tensor,
    packed: torch.Tensor,
    group_size: int,
    scales_zeros: torch.Tensor,
    block: int,
    ids: torch.Tensor,
) -> torch.Tensor | None:
    """``int4_logits(...).gather(1, ids)``, the same bits, computing only the ``[R, J]`` columns
    ``ids`` (any row count: the rescoring of top logits computed in bf16 elsewhere); None where
    it does not apply."""
    if (
        x.dim() == 2
        and x.dtype == torch.float32
        and ids.dim() == 2
        and ids.dtype == torch.int64
        and _int4_layout(packed, scales_zeros)
        and _fused(x)
    ):
        return torch.ops.carpool.int4_logits_at(
            x, packed, group_size, scales_zeros, block, ids.contiguous()
        )
    return None


def _int4_takes(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_zeros: torch.Tensor,
    dtypes: tuple[torch.dtype, ...],
) -> bool:
    """Whether ``int4_gemv`` / ``int4_logits`` take ``x`` (of one of ``dtypes``) over ``packed``:
    up to ``INT4_GEMV_MAX_ROWS`` rows, the int4 ops' layout, the fused ops loaded."""
    return (
        x.dim() == 2
        and 1 <= x.shape[0] <= INT4_GEMV_MAX_ROWS
        and x.dtype in dtypes
        and _int4_layout(packed, scales_zeros)
        and _fused(x)
    )


def _int4_layout(packed: torch.Tensor, scales_zeros: torch.Tensor) -> bool:
    """Whether int4 ``packed`` codes and their ``scales_zeros`` are what the int4 ops read."""
    return (
        scales_zeros.dtype == torch.bfloat16
        and packed.dtype == torch.uint8
        and packed.is_contiguous()
        and scales_zeros.is_contiguous()
    )


def int4_widen(
    packed: torch.Tensor, group_size: int, scales_zeros: torch.Tensor, block: int
) -> torch.Tensor | None:
    """The bf16 weight ``[N, K]`` (N padded to 64) that int4 ``packed`` codes stand for
    (``quant.Int4Linear``'s CPU layout in ``block``-row blocks, bf16 ``scales_zeros`` ``[K/g,
    N, 2]``): ``(q - 8) * scale`` rounded to bf16, plus ``zero``, rounded again, the bits of
    ``Int4Linear._dense`` in bf16; None where the fused kernel does not apply (the caller
    widens with torch ops)."""
    if (
        packed.dtype == torch.uint8
        and packed.is_cpu
        and packed.is_contiguous()
        and scales_zeros.dtype == torch.bfloat16
        and _fused(scales_zeros)
    ):
        return torch.ops.carpool.int4_widen(packed, group_size, scales_zeros, block)
    return None


def int4_widen_vnni(
    packed: torch.Tensor, group_size: int, scales_zeros: torch.Tensor, block: int, n: int
) -> torch.Tensor | None:
    """``int4_widen``'s first ``n`` rows packed as ``vnni_linear.pack`` packs them (``[ceil(n /
    64), K / 2, 64, 2]`` bf16), in one pass; None where the fused kernel does not apply."""
    if (
        packed.dtype == torch.uint8
        and packed.is_cpu
        and packed.is_contiguous()
        and scales_zeros.dtype == torch.bfloat16
        and group_size % 2 == 0
        and _fused(scales_zeros)
    ):
        return torch.ops.carpool.int4_widen_vnni(packed, group_size, scales_zeros, block, n)
    return None
