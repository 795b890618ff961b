"""Run carpool on torch's ``meta`` device: the non-CPU path, checked without a GPU.

A model on ``meta`` has shapes, dtypes and a device but no data. Every ``device.type == "cpu"``
test in carpool sends it down the path a CUDA device takes (no C++ CPU kernel, no huge pages,
no CPU allocator), and torch refuses any op that mixes a ``meta`` tensor with a CPU tensor of
more than one element, exactly as CUDA does: a CPU-only operation or a tensor built without
the model's device on the hot path fails here, in CI, on a machine with no GPU.

The engine must still read its sampled tokens back to the host; ``HostReads`` answers those
reads (``tolist``, ``item``, ``bool(t)``, ``.cpu()``...) with zeros of the right shape and
counts them: on CUDA each one is a synchronisation with the device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods that copy a tensor's values to the host.
_READS = frozenset(
    {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}
)


def _is_host(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cpu"


def _is_meta(device: Any) -> bool:
    return device is not None and torch.device(device).type == "meta"


class HostReads(TorchFunctionMode):
    """Answer host reads of ``meta`` tensors with zeros and count them (``count``); count the
    copies from the host to the device too (``copies``: ``.to(device)`` of a host tensor,
    ``torch.tensor(..., device=...)``; on a GPU each is a transfer of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.copies = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        t = args[0] if args else None
        if name in ("tensor", "as_tensor") and _is_meta(kwargs.get("device")):
            self.copies += 1
        if isinstance(t, torch.Tensor) and not t.is_meta and name == "to":
            target = kwargs.get("device") or next(
                (a for a in args[1:] if isinstance(a, (str, torch.device))), None
            )
            if _is_meta(target):
                self.copies += 1
        if isinstance(t, torch.Tensor) and t.is_meta:
            to_host = name == "to" and (
                _is_host(kwargs.get("device"))
                or any(isinstance(a, (str, torch.device)) and _is_host(a) for a in args[1:])
            )
            if name in _READS or to_host:
                self.count += 1
                dtype = kwargs.get("dtype") or next(
                    (a for a in args[1:] if isinstance(a, torch.dtype)), t.dtype
                )
                zeros = torch.zeros(t.shape, dtype=dtype if name == "to" else t.dtype)
                return zeros if name in ("cpu", "to") else getattr(zeros, name)()
        return func(*args, **kwargs)
