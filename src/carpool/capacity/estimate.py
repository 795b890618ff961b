"""The memory estimate of a batch (weights + KV cache + activations) and the largest batch
that fits a budget by that estimate.

``estimate_memory`` answers "does batch B of sequence length L fit?" from a ``ModelConfig`` alone
(no weights needed), with the formulas the engine itself uses:

- **weights**: ``weight_bytes_for``: ``num_parameters x dtype bytes`` for a dense model; int8 /
  int4 matrices (a quantized GGUF file, ``--quantization``) at their packed size. The loader
  logs the same figure.
- **KV cache**: ``B x ceil(L / block_size)`` blocks of ``block_size`` tokens, each token taking
  ``ModelConfig.kv_bytes_per_token_for(kv bytes)`` = ``2 (K and V) x layers x kv_heads x
  head_dim x bytes`` (an int8 cache: ``head_dim + 4`` bytes per row), through
  ``carpool.capacity.kv.kv_cache_bytes``; the engine sizes its
  cache for ``max_num_seqs`` sequences of ``max_model_len`` tokens with ``kv_cache_bytes_for``.
- **activations**: an *estimate* of the peak transient memory of one forward pass (see
  ``activation_bytes``); torch's allocator, kernels' workspaces and fragmentation are not in it.
"""

from __future__ import annotations

from dataclasses import dataclass

from carpool.capacity.activations import activation_bytes
from carpool.capacity.kv import kv_cache_bytes_for
from carpool.capacity.weights import weight_bytes_for
from carpool.config import DEFAULT_BLOCK_SIZE
from carpool.model.quant_plan import QuantPlan
from carpool.model_config import ModelConfig


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory of a model serving ``batch_size`` sequences of ``seq_len`` tokens, in bytes.

    Attributes:
        batch_size: sequences B.
        seq_len: tokens per sequence (prompt + output).
        weights: the parameters.
        kv_cache: the paged KV cache holding every sequence at full length.
        activations: estimated peak transient of one forward pass (see ``activation_bytes``).
    """

    batch_size: int
    seq_len: int
    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        """Weights + KV cache + activations."""
        return self.weights + self.kv_cache + self.activations

    def fits(self, device_memory: int) -> bool:
        """True when ``total`` is at most ``device_memory`` bytes."""
        return self.total <= device_memory

    def to_dict(self) -> dict[str, int]:
        """Plain numbers for JSON."""
        return {
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "activations": self.activations,
            "total": self.total,
        }


def estimate_memory(
    config: ModelConfig,
    batch_size: int,
    seq_len: int,
    dtype_nbytes: int,
    kv_dtype_nbytes: int | str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_num_batched_tokens: int | None = None,
    plan: QuantPlan | None = None,
) -> MemoryEstimate:
    """Weights, KV cache and activations for ``batch_size`` sequences of ``seq_len`` tokens.

    Args:
        config: the model (``read_model_config`` reads one without weights).
        batch_size: sequences served together.
        seq_len: tokens per sequence (prompt + output).
        dtype_nbytes: bytes per weight and activation element (2 for bf16/fp16).
        kv_dtype_nbytes: bytes per KV-cache element, or a cache dtype name (``"int8"``: the
            engine's int8 cache, ``head_dim + 4`` bytes per row); None for ``dtype_nbytes``.
        block_size: tokens per KV block (sequences take whole blocks).
        max_num_batched_tokens: see ``activation_bytes``.
        plan: which matrices are stored int8/int4 (``weight_bytes_for``); None for all dense.

    Raises:
        ValueError: a size is not a positive int.
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    kv_nbytes = kv_dtype_nbytes or dtype_nbytes
    return MemoryEstimate(
        batch_size=batch_size,
        seq_len=seq_len,
        weights=weight_bytes_for(config, dtype_nbytes, plan),
        kv_cache=kv_cache_bytes_for(config, batch_size, seq_len, kv_nbytes, block_size),
        activations=activation_bytes(
            config, batch_size, seq_len, dtype_nbytes, max_num_batched_tokens
        ),
    )


def largest_batch_by_estimate(
    config: ModelConfig,
    seq_len: int,
    budget: int,
    dtype_nbytes: int,
    kv_dtype_nbytes: int | str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_num_batched_tokens: int | None = None,
    limit: int = 1 << 16,
    plan: QuantPlan | None = None,
) -> int:
    """The largest B whose ``estimate_memory(...).total`` fits in ``budget`` (0 if none).

    The total grows with B, so a binary search over ``[1, limit]`` finds it.
    """

    def fits(b: int) -> bool:
        est = estimate_memory(
            config,
            b,
            seq_len,
            dtype_nbytes,
            kv_dtype_nbytes,
            block_size,
            max_num_batched_tokens,
            plan,
        )
        return est.total <= budget

    lo, hi = 0, limit  # fits(lo) (or lo == 0); answer in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def format_bytes(n: float) -> str:
    """``26843545600`` -> ``"26.84 GB"`` (decimal units, as GPU memory is quoted)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
