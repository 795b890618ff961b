"""Model step of two checkouts interleaved step by step in ONE process (fair on a busy machine).

The ``--before`` checkout's ``carpool`` package is copied to a temp dir as ``carpool_before``
(imports rewritten), so both versions load side by side; each decode step alternates between
them, so load spikes of a shared machine hit both alike. Per (batch, context): B sequences
with ``context - 1`` cached tokens decode one token per step (batch build + forward).

    python benchmarks/ab_step.py --before /work/main/src --cases 1x64,32x64,8x2048
    python benchmarks/ab_step.py --before pages --model SmolLM2.Q4_1.gguf --dtype auto --cases 1x64

``--before gather`` compares this checkout with itself: decode attention through gather + SDPA
("before") against the in-place paged decode kernel ("after"), one model, the path switched
per step; the table then also gives each path's attention share of the step (torch.profiler:
median over 8 profiled steps of each, after the timed ones, of attention op time in the step
over the step's wall time; attention ops as in profile_step.py).

``--before pages`` compares where the weights lie, two copies of one model in this process:
each weight on its own 4 KiB pages where packing left it (``CARPOOL_WEIGHT_PAGES=0``, "before")
against the engine's one huge-page arena in read order (``pages.move_weights``, "after"), for a
model whose weights ``prepare_model`` moves on this CPU (``--model`` a GGUF file: the quantized
kernels on an AVX2 CPU, ``model_runner.weights_want_huge_pages``).
``--before head`` compares a pure decode step's embedding, final norm and head from Python
("before") with the whole step from token ids to logits in one C++ call
(``decode_stack.run_logits``, "after"), one model, switched per step.
``--before silu`` switches a float32 model's SwiGLU, per step: torch's two ops (``F.silu(gate) *
up``, "before") or the fused kernel in torch's bits (``fused_ops.silu_float32_fused``, "after"),
and checks that both steps give the same logits, bit for bit.
``--before prefetch`` keeps the arena and switches only the bf16 linears' streaming: software
prefetch as on 4 KiB pages ("before") or the hardware's alone (``vnni_linear``'s huge-page
passes, "after"), per step.

``--kv-cache-dtype int8`` compares KV caches instead, both through the in-place kernel: the
model's dtype ("before") against int8 rows with a float32 scale each ("after"), one model, each
system with its own cache, steps alternated; the table gives both attention shares too. Every
mode fills the caches with random values first (``profile_step.fill_random``: a KV page never
written reads as the kernel's shared zero page, always in the CPU's cache).

    python benchmarks/ab_step.py --kv-cache-dtype int8 --cases 8x512,8x2048,8x8192
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch

sys.path.insert(0, str(Path(__file__).parent))
from profile_step import (  # noqa: E402
    ATTENTION_OPS,
    decode_chunks,
    engine_cache_dtype,
    fill_random,
    random_model,
)
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402


def import_before(src: Path):  # type: ignore[no-untyped-def]
    """``(load_model, build_ragged_batch, prepare_model)`` of the checkout at ``src``, renamed
    (``prepare_model`` None where the checkout has none). Its C++ operators are this
    checkout's where the sources are the same (one build, loaded once); a checkout whose
    kernels differ needs ab_vnni_linear.py / ab_paged_kernel.py, which rename them."""
    root = Path(tempfile.mkdtemp(prefix="carpool-before-"))
    pkg = root / "carpool_before"
    shutil.copytree(src / "carpool", pkg)
    for f in pkg.rglob("*.py"):
        text = f.read_text()
        f.write_text(re.sub(r"\b(from|import) carpool\b", r"\1 carpool_before", text))
    sys.path.insert(0, str(root))
    from carpool_before.model.loader import load_model
    from carpool_before.worker.batch import build_ragged_batch

    try:
        from carpool_before.worker.model_runner import prepare_model
    except ImportError:
        prepare_model = None
    return load_model, build_ragged_batch, prepare_model


def build_batch(build, chunks, block_size: int):  # noqa: ANN001, ANN201
    """Call either checkout's ``build_ragged_batch``: since issue 10 the block tables are an
    argument of their own (the runner keeps them), before they were a field of each chunk."""
    if "block_tables" in inspect.signature(build).parameters:
        return build(chunks, [c.block_table for c in chunks], block_size)
    return build(chunks, block_size)


def step_once(model, build, chunks, caches) -> None:  # noqa: ANN001
    inp = build_batch(build, chunks, 16)
    model(inp.input_ids, inp.positions, inp.meta, caches, inp.logits_indices)


def attention_share(model, build, chunks, caches, steps: int = 8) -> float:  # noqa: ANN001
    """Median over ``steps`` profiled steps of attention's share of the step: per step, the
    self-time of profile_step.py's attention ops inside it over the step's wall time (on a
    busy machine a per-step ratio is steadier than a ratio of separately timed runs)."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function("ab_step"):
                step_once(model, build, chunks, caches)
    events = list(prof.events())
    spans = [(e.time_range.start, e.time_range.end) for e in events if e.name == "ab_step"]
    att = [e for e in events if e.name in ATTENTION_OPS]
    shares = []
    for start, end in spans:
        inside = sum(e.self_cpu_time_total for e in att if start <= e.time_range.start < end)
        shares.append(inside / (end - start))
    return statistics.median(shares)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--before",
        default="/work/main/src",
        help="a checkout's src, or gather, pages, prefetch, head, silu",
    )
    ap.add_argument("--cases", default="1x64,32x64,8x512,8x2048,8x8192", help="BxCONTEXT,...")
    ap.add_argument("--random-config", default="small")
    ap.add_argument("--model", help="HF directory or .gguf file (default: a random model)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, help="timed steps per system and case (default: by size)")
    ap.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "int8"],
        default="auto",
        help="int8: compare the model-dtype cache (before) with the int8 cache (after), "
        "both through the paged decode kernel (--before is then ignored)",
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from carpool.model.loader import load_model
    from carpool.worker.batch import build_ragged_batch

    cases = [tuple(map(int, c.split("x"))) for c in a.cases.split(",")]
    path = a.model or random_model(a.random_config, a.dtype, max(c for _, c in cases) + 16)
    kv_ab = a.kv_cache_dtype == "int8"
    self_ab = a.before == "gather" or kv_ab
    from carpool.model import decode_stack, fused_ops, pages, vnni_linear
    from carpool.worker.model_runner import prepare_model

    if a.before == "pages":
        before = load_model(path, dtype=a.dtype)[0]
        os.environ[pages.ENV_WEIGHT_PAGES] = "0"
        prepare_model(before, "cpu")
        del os.environ[pages.ENV_WEIGHT_PAGES]
        assert pages.weight_arena(before) is None
        systems = {
            "before": (before, build_ragged_batch),
            "after": (load_model(path, dtype=a.dtype)[0], build_ragged_batch),
        }
    elif a.before in ("prefetch", "head", "silu"):
        model = load_model(path, dtype=a.dtype)[0]
        systems = {"before": (model, build_ragged_batch), "after": (model, build_ragged_batch)}
    elif self_ab:
        from carpool.model import paged_attention

        assert paged_attention.kernel() is not None, "paged decode kernel did not build"
        model = load_model(path, dtype=a.dtype)[0]
        systems = {"before": (model, build_ragged_batch), "after": (model, build_ragged_batch)}
    else:
        csrc = Path("carpool/model/csrc")
        here = Path(__file__).resolve().parents[1] / "src"
        for f in (here / csrc).iterdir():
            other = Path(a.before) / csrc / f.name
            if not other.exists() or other.read_bytes() != f.read_bytes():
                sys.exit(
                    f"{csrc / f.name} differs between the checkouts: both would register the "
                    "same carpool:: operators in this process. Compare kernels with "
                    "ab_vnni_linear.py / ab_paged_kernel.py, or switch a path (--before gather, "
                    "pages, prefetch, head)."
                )
        before_load, before_build, before_prepare = import_before(Path(a.before))
        systems = {
            "before": (before_load(path, dtype=a.dtype)[0], before_build),
            "after": (load_model(path, dtype=a.dtype)[0], build_ragged_batch),
        }
        if before_prepare is not None:  # its packed weights, fused ops and decode stack
            before_prepare(systems["before"][0], "cpu")

    prepare_model(systems["after"][0], "cpu")  # as the engine's runner does
    arena = pages.weight_arena(systems["after"][0])
    if a.before == "pages":
        assert arena is not None, "this model's weights stay in place on this CPU"
    if a.before == "prefetch":
        assert arena is not None and vnni_linear.streams_from_huge_pages(arena), (
            "the weights are not on huge pages here: nothing to switch"
        )
    if a.before == "silu":
        model = systems["after"][0]
        assert next(model.parameters()).dtype == torch.float32, "silu: a float32 model"
        assert fused_ops.silu_float32_fused(), "the kernel's float32 SwiGLU is not torch's here"

    def select(k: str) -> None:
        if a.before == "head":
            decode_stack.use_head(k == "after")
        if self_ab:
            paged_attention.use_kernel(kv_ab or k == "after")
        if a.before == "silu":  # fused_ops' choice, and the decode stack's copy of it
            fused_ops.use_silu_float32(k == "after")
            if getattr(systems[k][0], "decode_plan", None) is not None:
                systems[k][0].decode_plan.limits[-1] = int(k == "after")
        if a.before == "prefetch":
            on = k == "after"
            torch.ops.carpool.vnni_linear_huge_pages(arena.data_ptr(), arena.nbytes, on)

    def kv_dtype(k: str) -> torch.dtype:
        return torch.int8 if kv_ab and k == "after" else engine_cache_dtype(systems[k][0])

    extra = " before attention | after attention |" if self_ab else ""
    print(f"| batch | context | before ms | after ms | speedup |{extra}")
    print("|---:|---:|---:|---:|---:|" + ("---:|---:|" if self_ab else ""))
    for b, ctx in cases:
        chunks = decode_chunks(b, ctx, 16)
        nb = 2 + b * (-(-ctx // 16))
        caches = {
            k: m.allocate_kv_cache(nb, 16, kv_dtype(k), "cpu") for k, (m, _) in systems.items()
        }
        for c in caches.values():  # resident pages: never-written ones read the zero page
            fill_random(c)
        if a.before == "silu":  # the same cache contents, for the logits' check
            for mine, theirs in zip(caches["after"], caches["before"], strict=True):
                mine.copy_(theirs)
        times: dict[str, list[float]] = {k: [] for k in systems}
        n = a.steps or max(4, min(30, 20000 // (b * ctx) + 4))
        with torch.inference_mode():
            for i in range(n + 2):
                for k in list(systems) if i % 2 else list(reversed(systems)):
                    model, build = systems[k]
                    select(k)
                    start = time.perf_counter()
                    inp = build_batch(build, chunks, 16)
                    model(inp.input_ids, inp.positions, inp.meta, caches[k], inp.logits_indices)
                    if i >= 2:  # two warm-up steps
                        times[k].append(time.perf_counter() - start)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        if a.before == "silu":  # the same logits either way
            logits = {}
            with torch.inference_mode():
                for k, (model, build) in systems.items():
                    select(k)
                    inp = build_batch(build, chunks, 16)
                    logits[k] = model(
                        inp.input_ids, inp.positions, inp.meta, caches[k], inp.logits_indices
                    )
            assert torch.equal(logits["before"], logits["after"]), "silu: the logits differ"
        shares = ""
        if self_ab:
            share = {}
            for k, (model, build) in systems.items():
                select(k)
                share[k] = attention_share(model, build, chunks, caches[k])
            shares = f" {share['before']:.0%} | {share['after']:.0%} |"
        print(
            f"| {b} | {ctx} | {med['before']:.2f} | {med['after']:.2f} "
            f"| {med['before'] / med['after']:.2f}x |{shares}",
            flush=True,
        )
        del caches


if __name__ == "__main__":
    main()
