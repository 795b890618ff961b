"""Share of a decode step outside its matmuls and attention, without a profiler.

``profile_step.py`` attributes time with torch.profiler, whose per-op recording inflates the
small ops (inside the one-call decode stack too) and then scales every op to the wall clock.
Here, in ONE process and alternated step by step: the model's full decode step (batch build +
forward, as ``profile_step.py``), and the same step's kernels alone: every layer's four linears
(each through its module's ``forward``, so its own kernel choice) on inputs of the right shapes,
the paged decode kernel over the same cache, and the head. ``outside = 1 - kernels / step``.
The kernels-alone loop still pays one Python call per kernel (~40-130 per step), so this share
is a lower bound of the true one by about that.

``engine step``: the same shapes as a real ``LLMEngine.step()`` (``batch`` requests decoding,
each ``context`` tokens deep at the start, steps alternated with the other two): the model's
step plus the engine's Python around it (schedule, batch build, sampling, update, outputs).
``outside (engine)`` = 1 - kernels / engine step: what a batch-1 request pays beyond its
matmuls and attention. The model is the engine's own (prepared by its runner). ``engine
Python ms``: the engine step less its model call (timed around ``model.forward``), that
Python alone.

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
    random_model,
)

from carpool import LLM, SamplingParams
from carpool.model import paged_attention
from carpool.worker.batch import build_ragged_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap, batch="1", steps=30)
    a = ap.parse_args()
    path = a.model or random_model(a.random_config, "bfloat16", a.context)
    batches = [int(x) for x in a.batch.split(",")]
    # Room for every timed engine step (and the warm-up ones) past the context.
    llm = LLM(
        str(path),
        dtype=a.dtype,
        threads=a.threads,
        max_num_seqs=max(batches),
        max_model_len=a.context + a.steps + 16,
    )
    engine = llm.engine
    model = engine.model
    dtype = model.model.layers[0].input_layernorm.weight.dtype
    cfg = model.config
    print(f"{path}: {dtype}, {a.threads} threads, context {a.context}")
    layers = model.model.layers
    # The model's calls timed (the engine step's own is subtracted: its Python around them).
    forwards: list[float] = []
    forward = model.forward

    def timed_forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        forwards.append(time.perf_counter() - start)
        return out

    model.forward = timed_forward
    print(
        "| batch | step ms | kernels alone ms | outside | engine step ms | outside (engine) "
        "| engine Python ms |\n"
        "|---:|---:|---:|---:|---:|---:|---:|"
    )
    for b in batches:
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

        decoding(engine, b, a.context, cfg.vocab_size, a.steps + 8)
        times: dict[str, list[float]] = {"step": [], "kernels": [], "engine": [], "python": []}
        with torch.inference_mode():
            step()
            kernels()
        for _ in range(a.steps):
            for name, fn in (("step", step), ("kernels", kernels), ("engine", engine.step)):
                forwards.clear()
                with torch.inference_mode():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
                if name == "engine":  # the engine step less its model call
                    times["python"].append(times[name][-1] - sum(forwards))
        for i in range(b):
            engine.abort(f"outside-{i}")
        s, k, e, p = (
            statistics.median(times[n]) * 1e3 for n in ("step", "kernels", "engine", "python")
        )
        print(
            f"| {b} | {s:.2f} | {k:.2f} | {100 * (1 - k / s):.0f}% | {e:.2f} "
            f"| {100 * (1 - k / e):.0f}% | {p:.3f} |"
        )


def decoding(engine, batch: int, context: int, vocab: int, tokens: int) -> None:  # noqa: ANN001
    """``batch`` requests in ``engine``, each with ``context - 1`` prompt tokens, stepped
    until every one decodes (room for ``tokens`` more)."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        prompt = torch.randint(3, vocab, (context - 1,), generator=g).tolist()
        engine.add_request(prompt, params, request_id=f"outside-{i}")
    while True:
        record = engine.run_step().record
        assert record is not None, "the engine idled with requests to prefill"
        if record.num_prefill_tokens == 0 and record.num_seqs == batch:
            return


if __name__ == "__main__":
    main()
