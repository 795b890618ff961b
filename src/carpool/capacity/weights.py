"""Weight memory: what the parameters take as the loader stores them (dense or quantized)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from carpool.model.quant_plan import QuantPlan, plan_weight_bytes
from carpool.model_config import ModelConfig

if TYPE_CHECKING:
    import torch


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
        if t.is_mkldnn:  # a packed linear weight (layers.Linear.prepack): opaque, not shared
            total += t.numel() * t.element_size()
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total
