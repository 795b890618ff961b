"""Capacity planning: how much memory a model takes and how much work fits in it.

One folder for every figure the engine and the planning commands (``carpool memory``,
``carpool optimize``) share, so an estimate and the engine's own allocation agree:

- ``weights``: the parameters' bytes as the loader stores them (dense or int8/int4);
- ``kv``: bytes per KV block, blocks per budget, and the engine's block count
  (``plan_num_blocks``);
- ``activations``: an estimate of one forward pass's peak transient memory;
- ``estimate``: weights + KV + activations of a batch, and the largest batch by that estimate;
- ``fit``: the largest batch that really runs (the estimate confirmed by a trial on an engine,
  which the caller supplies), and the throughput knee;
- ``device``: free and total memory of a device, a model's shape read without its weights.
"""

from __future__ import annotations

from carpool.capacity.activations import activation_bytes
from carpool.capacity.device import available_memory_bytes, device_memory_bytes, read_model_config
from carpool.capacity.estimate import (
    MemoryEstimate,
    estimate_memory,
    format_bytes,
    largest_batch_by_estimate,
)
from carpool.capacity.kv import (
    block_bytes,
    kv_cache_bytes,
    kv_cache_bytes_for,
    kv_element,
    num_blocks_for_budget,
    plan_num_blocks,
)
from carpool.capacity.weights import resident_weight_bytes, weight_bytes, weight_bytes_for

__all__ = [
    "MemoryEstimate",
    "activation_bytes",
    "available_memory_bytes",
    "block_bytes",
    "device_memory_bytes",
    "estimate_memory",
    "format_bytes",
    "kv_cache_bytes",
    "kv_cache_bytes_for",
    "kv_element",
    "largest_batch_by_estimate",
    "num_blocks_for_budget",
    "plan_num_blocks",
    "read_model_config",
    "resident_weight_bytes",
    "weight_bytes",
    "weight_bytes_for",
]
