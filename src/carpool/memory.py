"""Memory figures the engine and the planning tools share.

``estimate_memory`` answers "does batch B of sequence length L fit?" from a ``ModelConfig`` alone
(no weights needed), with the formulas the engine itself uses:

- **weights**: ``weight_bytes_for``: ``num_parameters x dtype bytes`` for a dense model; int8 /
  int4 matrices (a quantized GGUF file, ``--quantization``) at their packed size. The loader
  logs the same figure.
- **KV cache**: ``B x ceil(L / block_size)`` blocks of ``block_size`` tokens, each token taking
  ``ModelConfig.kv_bytes_per_token_for(kv bytes)`` = ``2 (K and V) x layers x kv_heads x
  head_dim x bytes``, through ``carpool.kv_cache.sizing.kv_cache_bytes``; the engine sizes its
  cache for ``max_num_seqs`` sequences of ``max_model_len`` tokens with ``kv_cache_bytes_for``.
- **activations**: an *estimate* of the peak transient memory of one forward pass (see
  ``activation_bytes``); torch's allocator, kernels' workspaces and fragmentation are not in it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from carpool.config import EngineConfig, ModelConfig
from carpool.errors import ModelLoadError
from carpool.kv_cache.sizing import kv_cache_bytes, num_blocks_for_budget
from carpool.model.quant_plan import QuantPlan, plan_weight_bytes

if TYPE_CHECKING:
    import torch


def available_memory_bytes(device: str = "cpu") -> int:
    """Memory free for new allocations on ``device`` right now.

    CPU: ``MemAvailable`` from /proc/meminfo (what the kernel can hand out without swapping),
    falling back to free physical pages. CUDA: ``torch.cuda.mem_get_info``.
    """
    if device.startswith("cuda"):
        import torch  # only here: the planning commands must not load torch for a CPU figure

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_memory_bytes(device: str = "cpu") -> int:
    """Total memory of ``device``: the GPU's, or the machine's physical memory for a CPU."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def read_model_config(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of a model directory, a ``.gguf`` file or a bare ``config.json``.

    No weights are read, so a 70B model can be planned on a laptop.

    Raises:
        ModelLoadError: the path does not exist or does not describe a supported model.
    """
    path = Path(path)
    if path.is_dir():
        return ModelConfig.from_json_file(path / "config.json")
    if path.is_file() and path.suffix == ".gguf":
        from carpool.model.gguf_loader import read_gguf_config

        return read_gguf_config(path)
    if path.is_file():
        return ModelConfig.from_json_file(path)
    raise ModelLoadError(f"{path}: no such model directory, .gguf file or config.json")


def weight_bytes(config: ModelConfig, nbytes: int) -> int:
    """Bytes of the weights at ``nbytes`` per parameter (a tied head counted once)."""
    return config.num_parameters * nbytes


def weight_bytes_for(config: ModelConfig, nbytes: int, plan: QuantPlan | None = None) -> int:
    """Resident bytes of the weights as the loader stores them under a quantization ``plan``.

    The one formula behind the loader's "weights:" log line and ``carpool memory``: dense
    matrices at ``nbytes`` per element, int8 ones at 1 byte plus a scale per row, int4 ones at
    half a byte plus a (scale, zero) pair per group of 32 (``quant_plan.matrix_bytes``); norms
    and biases at ``nbytes``. None (no plan) equals ``weight_bytes``.
    """
    return plan_weight_bytes(config, nbytes, plan)


def resident_weight_bytes(model: torch.nn.Module) -> int:
    """Measured bytes of a loaded model's parameters and persistent buffers, each storage once.

    Non-persistent buffers (the rotary tables) are not weights and are left out.
    """
    seen: set[int] = set()
    total = 0
    tensors = [p for p in model.parameters()]
    for module in model.modules():
        skip = module._non_persistent_buffers_set
        tensors += [b for n, b in module.named_buffers(recurse=False) if n not in skip]
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def kv_cache_bytes_for(
    config: ModelConfig, num_seqs: int, seq_len: int, nbytes: int, block_size: int = 16
) -> int:
    """Bytes of the paged KV cache that holds ``num_seqs`` sequences of ``seq_len`` tokens.

    Each sequence takes whole blocks (``ceil(seq_len / block_size)``), exactly as the engine's
    BlockManager hands them out.
    """
    blocks = num_seqs * math.ceil(seq_len / block_size)
    return kv_cache_bytes(blocks, config.kv_bytes_per_token_for(nbytes), block_size)


def plan_num_blocks(
    config: EngineConfig, model: ModelConfig, max_model_len: int, dtype_bytes: int
) -> int:
    """KV blocks the engine allocates: ``kv_cache_memory`` bytes when given, else
    ``kv_cache_memory_fraction`` of the memory available now, capped at what every seat
    filled to ``max_model_len`` can use (no point holding more)."""
    per_token = model.kv_bytes_per_token_for(dtype_bytes)
    if config.kv_cache_memory is not None:
        budget = config.kv_cache_memory
    else:
        useful = kv_cache_bytes_for(
            model, config.max_num_seqs, max_model_len, dtype_bytes, config.block_size
        )
        available = available_memory_bytes(config.device)
        budget = min(int(available * config.kv_cache_memory_fraction), useful)
    return num_blocks_for_budget(budget, per_token, config.block_size)


def activation_bytes(
    config: ModelConfig,
    batch_size: int,
    seq_len: int,
    nbytes: int,
    max_num_batched_tokens: int | None = None,
) -> int:
    """Estimated peak transient memory of one forward pass (the prefill of the batch).

    The pass computes ``T = min(B x L, max_num_batched_tokens)`` tokens, ``Q = min(L, T)`` of
    them per sequence for ``b = ceil(T / Q)`` sequences, each attending to up to ``L`` keys.
    Layers run one after another and free their intermediates, so the peak is one layer's:

        nbytes x ( 2 T h                                  hidden states + residual stream
                   + max( T (q + 2 kv)                    fused q/k/v projection
                          + 2 b L kv                      K and V gathered from the cache
                          + b H Q L,                      scores of the padded [b, H, Q, L]
                                                          attention (not flash: materialised)
                          3 T i ) )                       MLP: gate/up (2i) and their product
        + b Q L                                           the bool attention mask
        + B V (nbytes + 8)                                logits of the sampled rows, their
                                                          float32 copy and probabilities

    where ``h`` = hidden size, ``q`` = heads x head_dim, ``kv`` = kv_heads x head_dim, ``H`` =
    heads, ``i`` = intermediate size and ``V`` = vocabulary. This is an estimate: kernels'
    workspaces, the allocator's rounding and fragmentation come on top.

    Args:
        config: the model.
        batch_size: sequences B.
        seq_len: tokens per sequence L (prompt + output).
        nbytes: bytes per activation element.
        max_num_batched_tokens: the engine's token budget per pass (chunked prefill); None for
            the whole ``B x L`` batch in one pass (static batching's worst case).
    """
    c = config
    tokens = batch_size * seq_len
    if max_num_batched_tokens is not None:
        tokens = min(tokens, max_num_batched_tokens)
    q_len = min(seq_len, tokens)
    seqs = math.ceil(tokens / q_len)
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    attention = tokens * (q + 2 * kv) + 2 * seqs * seq_len * kv
    attention += seqs * c.num_attention_heads * q_len * seq_len
    mlp = 3 * tokens * c.intermediate_size
    per_pass = nbytes * (2 * tokens * c.hidden_size + max(attention, mlp))
    mask = seqs * q_len * seq_len
    logits = batch_size * c.vocab_size * (nbytes + 8)
    return per_pass + mask + logits


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
    kv_dtype_nbytes: int | None = None,
    block_size: int = 16,
    max_num_batched_tokens: int | None = None,
    plan: QuantPlan | None = None,
) -> MemoryEstimate:
    """Weights, KV cache and activations for ``batch_size`` sequences of ``seq_len`` tokens.

    Args:
        config: the model (``read_model_config`` reads one without weights).
        batch_size: sequences served together.
        seq_len: tokens per sequence (prompt + output).
        dtype_nbytes: bytes per weight and activation element (2 for bf16/fp16).
        kv_dtype_nbytes: bytes per KV-cache element; None for ``dtype_nbytes``.
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
    kv_dtype_nbytes: int | None = None,
    block_size: int = 16,
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
