"""bf16 linear layers in one "VNNI" weight layout for every row count, on CPUs with AMX.

``csrc/vnni_linear.cpp`` (see its header for the layout and the numbers behind it) multiplies
rows with oneDNN's AMX micro-kernel, prefetching the next column block, and (opt-in, see
``GEMV_MAX_ROWS``) a few rows with a prefetching AVX-512 BF16 matrix-vector kernel, both reading
the same packed bytes. Why: oneDNN's own linear reads its packed weights at ~11 GB/s at one row
on this CPU; the micro-kernel over this layout at ~27-29 GB/s from L3 (the matrix-vector kernel
~34), and it keeps oneDNN's speed at 8+ rows, with one copy of each weight.

``layers.Linear.prepack`` picks this layout where ``available()`` (built, AVX-512 BF16 and
AMX); elsewhere it keeps oneDNN's packed layout. ``CARPOOL_VNNI_LINEAR=0`` turns it off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from carpool.model import kernel_build

ENV_VNNI = "CARPOOL_VNNI_LINEAR"
BLOCK_N = 64  # output columns per block (the kernel's kBlockN)
ENV_GEMV_ROWS = "CARPOOL_VNNI_GEMV_ROWS"
# Rows up to which the matrix-vector kernel runs; above, the AMX micro-kernel. Default 0: AMX
# for every row count. Why: the two paths round the same float32 sums differently about once
# in a few thousand outputs (VDPBF16PS and AMX's TDPBF16PS order a pair's two products
# differently), and then a request's bf16 greedy tokens would depend on how many rows shared
# its step (the soak test caught 50 of 8,069 completions differing from the request alone).
# The kernel is 1.2-1.5x the AMX path at 1-4 rows (BENCHMARKS.md "Fourth pass"):
# ``CARPOOL_VNNI_GEMV_ROWS=4`` trades that invariance for the speed.
GEMV_MAX_ROWS = int(os.environ.get(ENV_GEMV_ROWS, "0") or 0)

_lib = kernel_build.Library(
    "carpool_vnni_linear", kernel_build.CSRC / "vnni_linear.cpp", "VNNI bf16 linear", ENV_VNNI
)


def load() -> bool:
    """Build (first time on this machine) or load the operator now; False when it cannot be
    built or is turned off."""
    return _lib.load()


def failure() -> str | None:
    """Why the operator could not be built (None when it was, or was not tried)."""
    return _lib.failed


def available(device: torch.device | str) -> bool:
    """True where ``Linear.prepack`` should use this layout: a CPU whose build has AVX-512 BF16
    and AMX (the operator itself also runs without them, slower: tests use it anywhere)."""
    return (
        torch.device(device).type == "cpu"
        and _lib.enabled
        and _lib.loaded
        and bool(torch.ops.carpool.vnni_linear_fast())
    )


def packable(weight: torch.Tensor) -> bool:
    """Whether ``weight`` fits the layout: a 2-D bf16 ``[N, K]`` matrix with K even."""
    return weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` -> ``[ceil(N / 64), K / 2, 64, 2]``: block b, pair p, column c holds
    ``weight[64 b + c, 2 p : 2 p + 2]`` (zero past N)."""
    assert packable(weight), f"vnni_linear.pack: need [N, even K] bf16, got {weight.shape}"
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
    gemv_max_rows: int = GEMV_MAX_ROWS,
) -> torch.Tensor:
    """``x @ W.T + bias`` for bf16 ``x`` ``[M, K]`` and ``packed = pack(W)``; ``bias`` is
    float32 ``[n]`` or None. bf16 ``[M, n]`` out (float32 sums rounded once)."""
    return torch.ops.carpool.vnni_linear(x.contiguous(), packed, bias, n, gemv_max_rows)
