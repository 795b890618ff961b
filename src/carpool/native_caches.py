"""Bounds on torch's native per-shape caches, set before the first matmul of a server.

torch's bf16 (and widened int8/int4) ``linear`` on CPU runs oneDNN primitives, cached per input
shape with their packed weights in two LRU caches: oneDNN's own
(``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and ideep's (``LRU_CACHE_CAPACITY``), 1,024 entries each
by default. Under serving load, where the token count of a step changes all the time, those
caches were the main part of a steady RSS growth (issue 15, item 5). The model pads row counts
to a few buckets (``carpool.model.layers.bucket_rows``) so the shapes are few and recur; these
capacities bound what is left. Both variables are read once, at the first primitive, so they
are set here (unless the environment already sets them) before any model runs. See
docs/operations.md, "Memory under long runs".
"""

from __future__ import annotations

import os

# Per weight shape a step needs one entry; 64 hold a dozen token-count buckets of a model's
# five weight shapes (measured: a 4M model in bf16 stopped growing after ~750 requests with
# 64, still crept up 2% per 500 requests with 128 and 1,024).
CACHE_CAPACITY = 64
KNOBS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_native_caches(capacity: int = CACHE_CAPACITY) -> dict[str, str]:
    """Set each of ``KNOBS`` to ``capacity`` unless the environment sets it already.

    Replica processes inherit the values. Returns the values in force.
    """
    for name in KNOBS:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in KNOBS}
