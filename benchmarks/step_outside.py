"""Share of a decode step outside its matmuls and attention, without a profiler.

``profile_step.py`` attributes time with torch.profiler, whose per-op recording inflates the
small ops (inside the one-call decode stack too) and then scales every op to the wall clock.
Here, in ONE process and alternated step by step: the model's full decode step (batch build +
forward, as ``profile_step.py``), and the same step's kernels alone: every layer's four linears
(each through its module's ``forward``, so its own kernel choice) on inputs of the right shapes,
the paged decode kernel over the same cache, and the head. ``outside = 1 - kernels / step``.
The kernels-alone loop still pays one Python call per kernel (~40-130 per step), so this share
is a lower bound of the true one by about that.

    PYTHONPATH=src:benchmarks python benchmarks/step_outside.py --random-config small --batch 1
    PYTHONPATH=src:benchmarks python benchmarks/step_outside.py --model model.gguf --batch 1,8
"""

from __future__ import annotations

import argparse
import statistics
import time

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch
from profile_step import (
    add_model_args,
    decode_chunks,
    decode_step,
    engine_cache_dtype,
    fill_random,
    prepared_model,
)

from carpool.model import paged_attention
from carpool.worker.batch import build_ragged_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap, batch="1", steps=30)
    a = ap.parse_args()
    path, model = prepared_model(a)
    dtype = model.model.layers[0].input_layernorm.weight.dtype
    cfg = model.config
    print(f"{path}: {dtype}, {a.threads} threads, context {a.context}")
    layers = model.model.layers
    print("| batch | step ms | kernels alone ms | outside |\n|---:|---:|---:|---:|")
    for b in (int(x) for x in a.batch.split(",")):
        chunks = decode_chunks(b, a.context, 16)
        caches = model.allocate_kv_cache(
            2 + b * -(-a.context // 16), 16, engine_cache_dtype(model), "cpu"
        )
        fill_random(caches)
        inp = build_ragged_batch(chunks, [c.block_table for c in chunks], 16)
        meta = inp.meta
        widths = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim)
        ins = {n: torch.randn(b, n, dtype=dtype) for n in widths}
        query = torch.randn(b, cfg.num_attention_heads, cfg.head_dim, dtype=dtype)

        def step(chunks=chunks, caches=caches) -> None:  # noqa: ANN001
            decode_step(model, chunks, caches)

        def kernels(caches=caches, meta=meta, ins=ins, query=query) -> None:  # noqa: ANN001
            for layer, kv in zip(layers, caches, strict=True):
                attn, mlp = layer.self_attn, layer.mlp
                for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                    m.forward(ins[m.in_features])
                paged_attention.paged_decode_attention(
                    query, kv, meta.block_tables, meta.context_lens, attn.scale
                )
            head = model.lm_head
            x = ins[cfg.hidden_size]
            head.logits(x) if hasattr(head, "logits") else head(x).float()

        times: dict[str, list[float]] = {"step": [], "kernels": []}
        with torch.inference_mode():
            step()
            kernels()
            for _ in range(a.steps):
                for name, fn in (("step", step), ("kernels", kernels)):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        s, k = (statistics.median(times[n]) * 1e3 for n in ("step", "kernels"))
        print(f"| {b} | {s:.2f} | {k:.2f} | {100 * (1 - k / s):.0f}% |")


if __name__ == "__main__":
    main()
