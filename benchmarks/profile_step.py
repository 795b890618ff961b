"""Where a decode step spends its time: wall clock, op counts and torch.profiler op groups.

Drives the model directly (batch builder + one forward per step, no scheduler or sampler), so
the same script measures any checkout that keeps ``build_ragged_batch`` and the model's forward
signature: run it with ``PYTHONPATH=<checkout>/src`` to compare two branches.

    python benchmarks/profile_step.py --random-config small --batch 1 --context 64
    python benchmarks/profile_step.py --random-config small --batch 8 --context 2048,8192
    python benchmarks/profile_step.py --batch 8 --context 2048 --decode-attention gather
    python benchmarks/profile_step.py --batch 8 --context 2048 --kv-cache-dtype int8
    python benchmarks/profile_step.py --model model.gguf --dtype auto --batch 1,32 --top 8

For each (batch, context): B sequences whose caches already hold ``context - 1`` tokens decode
one token each per step. Prints the median step (batch build + forward), torch.profiler's ops
per step and per layer, and the share of the step in matmuls, in attention (SDPA, the KV
write/gather, masks) and outside both (dispatch, Python and every small op).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch
from torch.profiler import ProfilerActivity, profile

from carpool.bench.random_model import save_random_llama
from carpool.model import kv_quant
from carpool.model.kv_quant import resolve_kv_dtype
from carpool.model.loader import load_model
from carpool.model_config import KV_CACHE_DTYPES
from carpool.worker.batch import build_ragged_batch
from carpool.worker.model_runner import prepare_model

MATMUL_OPS = {
    "aten::mm",
    "aten::addmv_",
    "aten::addmm",
    "aten::mv",
    "aten::bmm",
    "aten::mkldnn_rr",
    "mkldnn::_linear_pointwise",  # packed bf16 weights (layers.Linear.prepack, "onednn")
    "carpool::vnni_linear",  # packed bf16 weights (layers.Linear.prepack, "vnni")
    "aten::_weight_int8pack_mm",
    "aten::_weight_int4pack_mm_for_cpu",
    "carpool::int8_gemv",  # quantized weights, 1-4 rows (fused_ops)
    "carpool::int8_dot",  # int8 weights past int8_gemv's rows (fused_ops)
    "carpool::int8_logits",  # an int8 vocabulary head of a float32 model (fused_ops)
    "carpool::int8_logits_at",
    "carpool::int4_gemv",
    "carpool::bf16_linear",  # bf16 weights where bf16 GEMMs are emulated (AVX2 CPUs)
}
ATTENTION_OPS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_efficient_attention_forward",
    "aten::_flash_attention_forward",
    "aten::index_select",
    "aten::index_copy_",
    "aten::index_put_",
    "aten::_softmax",
    "carpool::paged_decode_attention",  # record_function label of the in-place decode path
    "carpool::kv_store_int8",  # the KV write of an int8 cache
}


@dataclass
class _Chunk:
    request_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    needs_sample: bool = True


def random_model(preset: str, dtype: str, max_positions: int) -> Path:
    """The random model of ``preset`` with ``max_position_embeddings >= max_positions``."""
    out = Path(tempfile.gettempdir()) / "carpool-profile-models" / f"{preset}-{dtype}"
    if not (out / "model.safetensors").is_file():
        save_random_llama(out, preset=preset, dtype=dtype)
    cfg = json.loads((out / "config.json").read_text())
    if cfg["max_position_embeddings"] < max_positions:
        cfg["max_position_embeddings"] = max_positions
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def engine_cache_dtype(model, kv_cache_dtype: str = "auto") -> torch.dtype:  # noqa: ANN001
    """The cache tensor's dtype the engine would allocate for ``model``: ``"auto"`` is
    bfloat16 for a float32 model with quantized matrices (a GGUF Q8_0/Q4 file; see
    ``kv_quant.effective_kv_cache_dtype``), not float32 (this script's runs before the
    twenty-fourth pass of issue 11 measured such models over a float32 cache)."""
    dtype = next(model.parameters()).dtype
    effective = getattr(kv_quant, "effective_kv_cache_dtype", None)
    if effective is not None:  # (absent in checkouts before it: PYTHONPATH=<src> A/B runs)
        from carpool.model.quant import QuantizedLinear

        quantized = any(isinstance(m, QuantizedLinear) for m in model.modules())
        kv_cache_dtype = effective(kv_cache_dtype, dtype, quantized)
    return resolve_kv_dtype(kv_cache_dtype, dtype)


def decode_chunks(batch: int, context: int, block_size: int) -> list[_Chunk]:
    """``batch`` sequences of ``context - 1`` cached tokens, each decoding one more token."""
    blocks = -(-context // block_size)
    # Interleave the sequences' blocks, as a busy block manager would hand them out.
    return [
        _Chunk(f"r{k}", [5 + k], context - 1, [1 + k + batch * n for n in range(blocks)])
        for k in range(batch)
    ]


def decode_step(model, chunks, caches, block_size: int = 16) -> torch.Tensor:  # noqa: ANN001
    """One decode step of ``chunks`` as the runner takes it: batch build + forward."""
    inp = build_ragged_batch(chunks, [c.block_table for c in chunks], block_size)
    return model(inp.input_ids, inp.positions, inp.meta, caches, inp.logits_indices)


def add_model_args(ap: argparse.ArgumentParser, batch: str, steps: int) -> None:
    """The model, thread and shape options the step benchmarks share."""
    ap.add_argument("--model", help="HF directory or .gguf file (default: a random model)")
    ap.add_argument("--random-config", default="small")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", default=batch)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--steps", type=int, default=steps, help="timed steps of each variant")
    ap.add_argument("--threads", type=int, default=2)


def prepared_model(a: argparse.Namespace):  # noqa: ANN201
    """``(path, model)`` of ``add_model_args``' options, prepared as the engine's runner does,
    with torch's threads set."""
    torch.set_num_threads(a.threads)
    path = a.model or random_model(a.random_config, "bfloat16", a.context)
    model, _ = load_model(path, dtype=a.dtype)
    prepare_model(model, "cpu")
    return path, model


def fill_random(caches: list[torch.Tensor]) -> None:
    """Random keys/values in every cache page. Why: zeros could hit special cases in the
    kernels, and a page never written is the kernel's shared zero page (the cache is allocated
    lazily), which every read would find in the CPU's cache instead of memory. An int8 cache
    gets random int8 values and a plausible scale in every row, at the scales' places of its
    layout (kv_quant's block layout; rows in checkouts before it, for A/B runs with
    ``PYTHONPATH=<src>``: random bytes read as scales were denormals and NaNs)."""
    scale = torch.tensor([0.02]).view(torch.int8)
    for c in caches:
        if c.dtype != torch.int8:
            c.normal_()
            continue
        c.random_(-127, 128)
        if hasattr(kv_quant, "block_parts"):
            _, k_scales, _, v_scales = kv_quant.block_parts(c)
            k_scales.copy_(scale.expand_as(k_scales))
            v_scales.copy_(scale.expand_as(v_scales))
        else:
            c[..., -4:] = scale


def measure(
    model,
    batch: int,
    context: int,
    steps: int,
    block_size: int = 16,
    kv_dtype=None,
    top_ops: int = 0,
) -> dict:
    cfg = model.config
    dtype = next(model.parameters()).dtype
    chunks = decode_chunks(batch, context, block_size)
    num_blocks = 2 + batch * (-(-context // block_size))
    caches = model.allocate_kv_cache(num_blocks, block_size, kv_dtype or dtype, "cpu")
    fill_random(caches)

    def step() -> None:
        decode_step(model, chunks, caches, block_size)

    with torch.inference_mode():
        for _ in range(3):
            step()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
    wall = statistics.median(times)
    ops = prof.key_averages()
    # Top-level ops only (no parent op): what Python dispatches. Children run inside them.
    top = [e for e in prof.events() if e.cpu_parent is None and not e.name.startswith("Profiler")]
    if top_ops:  # the ops with the most self time, per step
        for k in sorted(ops, key=lambda k: -k.self_cpu_time_total)[:top_ops]:
            print(
                f"  {k.key:<48} {k.self_cpu_time_total / steps / 1e3:8.3f} ms/step "
                f"{k.count / steps:6.1f} calls/step"
            )
    top_ops = len(top) / steps
    total = sum(k.self_cpu_time_total for k in ops) / steps / 1e6
    mm = sum(k.self_cpu_time_total for k in ops if k.key in MATMUL_OPS) / steps / 1e6
    att = sum(k.self_cpu_time_total for k in ops if k.key in ATTENTION_OPS) / steps / 1e6
    # The profiler slows every op a little; scale its op times to the unprofiled step.
    scale = min(1.0, wall / total) if total else 1.0
    mm, att = mm * scale, att * scale
    return {
        "batch": batch,
        "context": context,
        "step_ms": wall * 1e3,
        "tokens_per_s": batch / wall,
        "ops_per_step": top_ops,
        "ops_per_layer": top_ops / cfg.num_hidden_layers,
        "matmul_share": mm / wall,
        "attention_share": att / wall,
        "other_share": max(0.0, 1 - (mm + att) / wall),
        "other_ms": max(0.0, wall - mm - att) * 1e3,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--random-config", default="small")
    p.add_argument("--model", help="a model directory or GGUF file instead of a random model")
    p.add_argument("--top", type=int, default=0, help="print this many ops by self time")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--context", default="64", help="comma-separated context lengths")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="append the rows to this JSON file")
    p.add_argument(
        "--decode-attention",
        choices=["kernel", "gather"],
        default="kernel",
        help="decode attention path: the in-place paged kernel or gather + SDPA",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=list(KV_CACHE_DTYPES),
        default="auto",
        help="KV cache: the model's dtype, bfloat16, or int8 rows with a float32 scale each",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    try:  # checkouts from before the paged decode kernel have only the gather path
        from carpool.model import paged_attention

        paged_attention.use_kernel(a.decode_attention == "kernel")
        if a.decode_attention == "kernel":
            assert paged_attention.kernel() is not None, "paged decode kernel did not build"
    except ImportError:
        pass
    contexts = [int(c) for c in a.context.split(",")]
    path = a.model or random_model(a.random_config, a.dtype, max(contexts) + 16)
    model, _ = load_model(path, dtype=a.dtype)
    prepare_model(model, "cpu")  # as the engine's runner does: packed weights, fused ops
    print(f"kv cache: {engine_cache_dtype(model, a.kv_cache_dtype)}")
    print(
        "| batch | context | step ms | tok/s | top-level ops/step | per layer "
        "| matmuls | attention | outside both |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for b in (int(x) for x in a.batch.split(",")):
        for ctx in contexts:
            kv = engine_cache_dtype(model, a.kv_cache_dtype)
            r = measure(model, b, ctx, a.steps, a.block_size, kv_dtype=kv, top_ops=a.top)
            rows.append(r)
            print(
                f"| {b} | {ctx} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} "
                f"| {r['ops_per_step']:.0f} | {r['ops_per_layer']:.1f} "
                f"| {r['matmul_share']:.0%} | {r['attention_share']:.0%} "
                f"| {r['other_share']:.0%} ({r['other_ms']:.2f} ms) |",
                flush=True,
            )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
