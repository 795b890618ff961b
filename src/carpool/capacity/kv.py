"""KV-cache memory: bytes per block, blocks per budget, and the engine's own block count.

The per-token size comes from the model (``ModelConfig.kv_bytes_per_token_for``:
``2 x layers x kv_heads x row bytes``, where an int8 cache row is ``head_dim + 4`` bytes), so the
planner and the engine agree on the number.
"""

from __future__ import annotations

import math

from carpool.capacity.device import available_memory_bytes
from carpool.config import DEFAULT_BLOCK_SIZE, EngineConfig
from carpool.model_config import ModelConfig


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def block_bytes(kv_bytes_per_token: int, block_size: int) -> int:
    """Bytes one block of ``block_size`` tokens takes (K and V, all layers)."""
    _check_positive_int("kv_bytes_per_token", kv_bytes_per_token)
    _check_positive_int("block_size", block_size)
    return kv_bytes_per_token * block_size


def num_blocks_for_budget(
    kv_cache_memory_bytes: int, kv_bytes_per_token: int, block_size: int
) -> int:
    """Whole blocks that fit in ``kv_cache_memory_bytes`` (floor).

    Raises:
        ValueError: an argument is not a positive int, or the budget cannot hold one block.
    """
    per_block = block_bytes(kv_bytes_per_token, block_size)
    if isinstance(kv_cache_memory_bytes, bool) or not isinstance(kv_cache_memory_bytes, int):
        raise ValueError(f"kv_cache_memory_bytes must be an int, got {kv_cache_memory_bytes!r}")
    num_blocks = kv_cache_memory_bytes // per_block
    if num_blocks < 1:
        raise ValueError(
            f"KV-cache budget of {kv_cache_memory_bytes} bytes cannot hold one block: a block of "
            f"{block_size} tokens x {kv_bytes_per_token} bytes/token needs {per_block} bytes"
        )
    return num_blocks


def kv_cache_bytes(num_blocks: int, kv_bytes_per_token: int, block_size: int) -> int:
    """Bytes taken by ``num_blocks`` blocks (the inverse of ``num_blocks_for_budget``)."""
    _check_positive_int("num_blocks", num_blocks)
    return num_blocks * block_bytes(kv_bytes_per_token, block_size)


def kv_element(config: EngineConfig, dtype_nbytes: int) -> int | str:
    """What ``ModelConfig.kv_bytes_per_token_for`` takes for an engine's cache: the cache dtype's
    name under ``kv_cache_dtype="int8"`` or ``"bfloat16"``, else the model dtype's
    ``dtype_nbytes``."""
    return dtype_nbytes if config.kv_cache_dtype == "auto" else config.kv_cache_dtype


def kv_cache_bytes_for(
    config: ModelConfig,
    num_seqs: int,
    seq_len: int,
    nbytes: int | str,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> int:
    """Bytes of the paged KV cache that holds ``num_seqs`` sequences of ``seq_len`` tokens.

    Each sequence takes whole blocks (``ceil(seq_len / block_size)``), exactly as the engine's
    BlockManager hands them out. ``nbytes``: bytes per element, or a cache dtype name
    (``"int8"``: the quantized layout; see ``ModelConfig.kv_bytes_per_token_for``).
    """
    blocks = num_seqs * math.ceil(seq_len / block_size)
    return kv_cache_bytes(blocks, config.kv_bytes_per_token_for(nbytes), block_size)


def plan_num_blocks(
    config: EngineConfig, model: ModelConfig, max_model_len: int, dtype_bytes: int
) -> int:
    """KV blocks the engine allocates: ``kv_cache_memory`` bytes when given, else
    ``kv_cache_memory_fraction`` of the memory available now, capped at what every seat
    filled to ``max_model_len`` can use (no point holding more). ``dtype_bytes``: the
    model's element size (the cache's when ``kv_cache_dtype="auto"``)."""
    kv = kv_element(config, dtype_bytes)
    per_token = model.kv_bytes_per_token_for(kv)
    if config.kv_cache_memory is not None:
        budget = config.kv_cache_memory
    else:
        useful = kv_cache_bytes_for(
            model, config.max_num_seqs, max_model_len, kv, config.block_size
        )
        available = available_memory_bytes(config.device)
        budget = min(int(available * config.kv_cache_memory_fraction), useful)
    return num_blocks_for_budget(budget, per_token, config.block_size)
