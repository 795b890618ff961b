"""bf16 linear layers in one "VNNI" weight layout for every row count, on CPUs with AMX.

``csrc/vnni_linear.cpp`` (see its header for the layout and the numbers behind it) multiplies
a few rows (decode) with a prefetching AVX-512 BF16 matrix-vector kernel and more rows
(batched decode, prefill) with oneDNN's AMX micro-kernel, both reading the same packed bytes.
Why: oneDNN's own product reads its packed weights at ~11 GB/s at one row on this CPU; the
kernel here at ~34 GB/s from L3 (~16 GB/s from DRAM), and the AMX path keeps oneDNN's speed
at 8+ rows, with one copy of each weight.

``layers.Linear.prepack`` picks this layout where ``available()`` (built, AVX-512 BF16 and
AMX); elsewhere it keeps oneDNN's packed layout. ``CARPOOL_VNNI_LINEAR=0`` turns it off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from carpool.model import kernel_build

ENV_VNNI = "CARPOOL_VNNI_LINEAR"
BLOCK_N = 64  # output columns per block (the kernel's kBlockN)
# Rows up to which the matrix-vector kernel runs; above, the AMX micro-kernel. Measured on the
# small and medium models' weight sets (2 threads): the kernel leads up to 4 rows (1.3-2.9x
# oneDNN's packed product), AMX from 8 (BENCHMARKS.md "VNNI linear").
GEMV_MAX_ROWS = 4

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
