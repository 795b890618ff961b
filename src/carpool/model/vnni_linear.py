"""bf16 linear layers in one "VNNI" weight layout for every row count, on CPUs with AVX-512 BF16.

``csrc/vnni_linear.cpp`` (see its header for the layout and the numbers behind it) multiplies
with our own AMX loop, 32 rows at a time with the weights prefetched (oneDNN's AMX
micro-kernel where K is not a multiple of 32), reading the packed bytes with the same
instructions in the same order at every row count: a row's result does not depend on the rows
beside it, so a request's greedy tokens are the same alone and batched. Why: oneDNN's own bf16
linear reads its packed weights at ~11 GB/s at one row on this CPU, and its micro-kernel
through ATen costs ~1 us of set-up per call (a step at batch 1 makes ~1,000: one per column
block); our loop has neither cost (1.4-2x oneDNN's linear at 1-32 rows, 0.9-1.2x from 64 to
512; BENCHMARKS.md "Fourth pass"), with one copy of each weight.

Without AMX (an AMD Zen 4, say) the same layout goes through the kernel's AVX-512 BF16
matrix-vector loop at every row count, again the same bits for a row whatever its batch: there
it measured 1.0-2.2x oneDNN's packed linear at 1-32 rows with the weights read from memory, and
level with it (0.95-1.2x) at 64-512 rows (BENCHMARKS.md, issue 11, ninth pass).

On AVX2 CPUs without AVX-512 (AMD Zen 2/3), which have no bf16 instructions and where torch's
bf16 GEMM takes its generic loops, the same layout goes through float32 FMA loops (a pair's 8
columns widened from one load, up to six rows a pass): 1.4-1.7x ``fused_ops.bf16_linear`` on
plain weights at 4-32 rows, ~1.05x at 1-2 (BENCHMARKS.md, issue 11, twenty-second pass), and
1.1-1.4x more at 16-512 rows since the twenty-seventh pass (six rows keep 12 sums in flight).
There a quantized model's prefill also multiplies its widened weights in this layout
(``quant.QuantizedLinear._widened_product``; ``pack`` is then one C++ pass per step). With
AMX a quantized model's prompts go through this loop too, for the rows ``carpool.model.row_paths``
marks (a prompt's from ``quant.wide_prompt_from`` on): it gives a row its bits whatever the
rows beside it, which oneDNN's GEMM did not. There the codes are widened a block at a time
inside the loop (``linear_int4`` / ``linear_int8``), never into a whole bf16 matrix.

``layers.Linear.prepack`` picks this layout where ``available()`` (built, AVX-512 BF16 with or
without AMX, or AVX2 without AVX-512); elsewhere it keeps oneDNN's packed layout where oneDNN
has bf16, plain weights otherwise. ``CARPOOL_VNNI_LINEAR=0`` turns it off.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from carpool.model import kernel_build

ENV_VNNI = "CARPOOL_VNNI_LINEAR"
BLOCK_N = 64  # output columns per block (the kernel's kBlockN)
# The operator's paths: automatic (our AMX loop; the matrix-vector kernel without AMX), or one
# forced (tests, benchmarks): the matrix-vector kernel, or oneDNN's micro-kernel.
# The matrix-vector kernel (VDPBF16PS) orders each pair's two products differently from AMX:
# about one output in a few thousand rounds the other way, which is why it is not mixed with
# the AMX paths (a request's bf16 greedy tokens would depend on its batch).
PATH_AUTO, PATH_GEMV, PATH_BRGEMM = 0, 1, 2

_lib = kernel_build.Library(
    "carpool_vnni_linear", kernel_build.CSRC / "vnni_linear.cpp", "VNNI bf16 linear", ENV_VNNI
)


def load() -> bool:
    """Build (first time on this machine) or load the operator now; False when it cannot be
    built or is turned off."""
    return _lib.load()


def loaded() -> bool:
    """True once the operator is loaded and turned on."""
    return _lib.active()


def failure() -> str | None:
    """Why the operator could not be built (None when it was, or was not tried)."""
    return _lib.failed


def available(device: torch.device | str) -> bool:
    """True where ``Linear.prepack`` should use this layout: a CPU whose build has AVX-512 BF16
    or AVX2 without AVX-512 (the operator itself also runs elsewhere, in plain loops: tests use
    it anywhere)."""
    return (
        torch.device(device).type == "cpu"
        and _lib.active()
        and bool(torch.ops.carpool.vnni_linear_fast())
    )


def amx() -> bool:
    """True where the automatic path multiplies on AMX tiles (else the matrix-vector loop)."""
    return _lib.active() and bool(torch.ops.carpool.vnni_linear_amx())


def packable(weight: torch.Tensor) -> bool:
    """Whether ``weight`` fits the layout: a 2-D bf16 ``[N, K]`` matrix with K even."""
    return weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` -> ``[ceil(N / 64), K / 2, 64, 2]``: block b, pair p, column c holds
    ``weight[64 b + c, 2 p : 2 p + 2]`` (zero past N)."""
    assert packable(weight), f"vnni_linear.pack: need [N, even K] bf16, got {weight.shape}"
    if weight.device.type == "cpu" and _lib.active():
        return torch.ops.carpool.vnni_pack(weight)  # one pass (a quantized prefill's per step)
    return pack_reference(weight)


def pack_int8(codes: torch.Tensor) -> torch.Tensor:
    """``pack(codes.to(torch.bfloat16))`` for int8 ``[N, K]`` codes (K even), in one pass where
    the operator is loaded (``linear_int8``'s reference: the same widening, a block at a
    time)."""
    assert codes.dim() == 2 and codes.dtype == torch.int8 and codes.shape[1] % 2 == 0, (
        f"vnni_linear.pack_int8: need [N, even K] int8, got {tuple(codes.shape)} {codes.dtype}"
    )
    if codes.device.type == "cpu" and _lib.active():
        return torch.ops.carpool.vnni_pack_int8(codes)
    return pack_reference(codes.to(torch.bfloat16))


# Rows ``pack_in_place`` packs at a time: 4 MiB of bf16 (the one temporary, their packed copy).
IN_PLACE_SLICE_BYTES = 4 << 20


def pack_in_place(weight: torch.Tensor) -> torch.Tensor | None:
    """``pack(weight)`` written over ``weight``'s own bytes, a slice of whole blocks at a time;
    returns the packed view of them, or None where the layout does not fit in them (N not a
    multiple of ``BLOCK_N``: the last block is padded) or ``weight`` is not contiguous.

    Block b of the layout is rows ``64 b .. 64 b + 63`` rearranged, the same bytes in the same
    place, so a slice of blocks can be packed into a temporary and copied back over its rows
    without touching the next ones. Why: ``pack`` holds the plain and the packed matrix at
    once, and a model's largest (a Llama 3 vocabulary's head, 500 MiB at 1B's width) set the
    peak of loading it. The caller must own ``weight``'s bytes: every other tensor over them
    sees them packed afterwards (``layers.Linear.prepack`` checks that none exists)."""
    assert packable(weight), f"vnni_linear.pack_in_place: need [N, even K] bf16, got {weight.shape}"
    n, k = weight.shape
    if n % BLOCK_N or not weight.is_contiguous():
        return None
    packed = weight.view(n // BLOCK_N, k // 2, BLOCK_N, 2)
    rows = max(BLOCK_N, IN_PLACE_SLICE_BYTES // max(1, 2 * k) // BLOCK_N * BLOCK_N)
    with torch.no_grad():
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            # ``pack`` reads the rows into a new tensor before the copy writes over them.
            packed[r0 // BLOCK_N : r1 // BLOCK_N].copy_(pack(weight[r0:r1]))
    return packed


def pack_reference(weight: torch.Tensor) -> torch.Tensor:
    """``pack`` in torch ops (any device; the operator's reference)."""
    n, k = weight.shape
    blocks = -(-n // BLOCK_N)
    padded = F.pad(weight, (0, 0, 0, blocks * BLOCK_N - n))
    return padded.view(blocks, BLOCK_N, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The ``[n, K]`` weight back from ``pack``'s layout."""
    blocks, pairs, block_n, two = packed.shape
    assert block_n == BLOCK_N and two == 2, f"not a packed weight: {tuple(packed.shape)}"
    plain = packed.permute(0, 2, 1, 3).reshape(blocks * BLOCK_N, pairs * 2)
    return plain[:n].contiguous()


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    path: int = PATH_AUTO,
) -> torch.Tensor:
    """``x @ W.T + bias`` for bf16 ``x`` ``[M, K]`` and ``packed = pack(W)``; ``bias`` is
    float32 ``[n]`` or None. bf16 ``[M, n]`` out (float32 sums rounded once)."""
    return torch.ops.carpool.vnni_linear(x.contiguous(), packed, bias, n, path)


def linear_packed(
    x: torch.Tensor,
    packed: torch.Tensor,
    n: int,
    scales: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    path: int = PATH_AUTO,
) -> torch.Tensor:
    """``linear(x, packed, None, n)`` taken as ``linear_int8`` takes its arguments: ``x`` bf16
    or float32, the result in ``x``'s dtype (times ``scales`` as ``linear_int8`` applies them),
    into ``out`` where given. For a weight widened once for several calls (a chunked MLP's)."""
    return _product("vnni_linear_packed", (x.contiguous(), packed, n, scales), out, path)


def linear_int8(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    path: int = PATH_AUTO,
) -> torch.Tensor:
    """``linear(x, pack_int8(codes), None, N)`` (times ``scales``, ``[N]`` bf16: on AMX tiles
    the float32 sums times them, rounded once; elsewhere the bf16 rows times them, as a bf16
    multiply rounds) for int8 ``codes`` ``[N, K]`` without the packed matrix: each 64-column
    block widened into a thread's buffer as its task reaches it (the same bits). ``x``: bf16, or
    float32 (rounded to bf16 inside, as its cast would); the result in ``x``'s dtype, into
    ``out`` (contiguous ``[M, N]``, the rows of a layer's output) where given. CPU, operator
    loaded."""
    return _product("vnni_linear_int8", (x.contiguous(), codes, scales), out, path)


def linear_int4(
    x: torch.Tensor,
    packed: torch.Tensor,
    group_size: int,
    scales_zeros: torch.Tensor,
    block: int,
    n: int,
    out: torch.Tensor | None = None,
    path: int = PATH_AUTO,
) -> torch.Tensor:
    """``linear(x, fused_ops.int4_widen_vnni(packed, group_size, scales_zeros, block, n), None,
    n)`` without the widened matrix (block by block, as ``linear_int8``): the same bits, in
    ``x``'s dtype (bf16 or float32), into ``out`` where given."""
    args = (x.contiguous(), packed, group_size, scales_zeros, block, n)
    return _product("vnni_linear_int4", args, out, path)


def _product(op: str, args: tuple, out: torch.Tensor | None, path: int) -> torch.Tensor:
    """``torch.ops.carpool.<op>(*args, path)``, or its ``_out`` form into ``out``."""
    if out is None:
        return getattr(torch.ops.carpool, op)(*args, path)
    getattr(torch.ops.carpool, op + "_out")(*args, out, path)
    return out


def stream_from_huge_pages(region: torch.Tensor) -> None:
    """Tell the kernel that the weights inside ``region`` (a CPU tensor: ``pages.move_weights``'
    arena) lie on transparent huge pages: a pass of 1-6 rows over them then leaves the
    streaming to the hardware prefetcher instead of asking for each line ahead (see
    ``on_huge_pages`` in the kernel). Only the speed depends on it, never a result. Forgotten
    when ``region`` is freed."""
    if not _lib.active() or region.nbytes == 0:
        return
    start, nbytes = region.data_ptr(), region.nbytes
    torch.ops.carpool.vnni_linear_huge_pages(start, nbytes, True)
    weakref.finalize(region, _forget_range, start, nbytes)


def streams_from_huge_pages(t: torch.Tensor) -> bool:
    """Whether the kernel treats ``t``'s bytes as on huge pages (``stream_from_huge_pages``)."""
    return _lib.active() and bool(
        torch.ops.carpool.vnni_linear_on_huge_pages(t.data_ptr(), t.nbytes)
    )


def _forget_range(start: int, nbytes: int) -> None:
    if _lib.active():
        torch.ops.carpool.vnni_linear_huge_pages(start, nbytes, False)
