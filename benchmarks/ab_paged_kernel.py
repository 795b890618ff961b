"""The paged decode kernel of two checkouts in ONE process, calls alternated (fair on a busy VM).

Each checkout's ``csrc`` is built as its own operator library (``ab_before::`` and
``ab_after::``: the same source with its ``TORCH_LIBRARY`` namespace renamed), so both run side
by side on the same caches. Per shape and cache dtype: ``--layers`` caches read in turn (from
memory, as a model's layers are: one layer of GQA 16/4 at 8 x 2k fits a 32 MB L3), ``--rounds``
rounds alternating before / after / a plain ``sum()`` of the same bytes; medians per layer.

    python benchmarks/ab_paged_kernel.py --before /tmp/old/src \\
        --shapes 8x16/4x2048,8x8/8x2048,8x9/3x2048 --caches bf16,fp32q,int8 --threads 2

A shape is ``B x heads/kv_heads x context`` (head_dim ``--head-dim``, blocks of ``--block-size``
tokens, 16 by default, interleaved between sequences); ``context`` may be a list of contexts the
sequences take in turn (``8x16/4x128:2048``: four of 128 tokens and four of 2048). ``bf16``:
bf16 queries over a bf16 cache (a bf16 model); ``fp32q``: float32 queries over a bf16 cache (a
float32 model with ``kv_cache_dtype="bfloat16"``), both in each checkout's own bfloat16
layout (``kv_layout.to_blocks`` where it has that module, rows before it); ``int8``: bf16
queries over the int8 cache of the same values, in each checkout's own layout
(``kv_quant.to_blocks`` where its ``kv_quant`` has the block layout, rows before it). The two
checkouts' outputs must agree, except with ``--diagnostic`` (an "after" build with a loop left
out, to see what that loop costs).

``--prompt``: a shape's ``B`` rows are instead the last ``B`` positions of ONE sequence of
``context`` tokens (one block table; row i sees ``context - B + 1 + i`` tokens), as a prompt's
kernel rows are (``paged_attention.prompt_kernel_positions``): the same blocks read by every
row, from the caches, so the loops' arithmetic rather than the memory sets the time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from carpool.model import kernel_build, kv_quant  # noqa: E402


def build(src: Path, namespace: str, source: str = "paged_attention.cpp") -> None:
    """Build ``src``'s kernel ``source`` (headers beside it) as ``torch.ops.<namespace>``: its
    ``carpool`` operator registrations renamed (also used by ab_vnni_linear.py)."""
    kernel_build.build_as(src / "carpool" / "model" / "csrc", source, namespace)


def ab_parser(doc: str, rounds: int = 15) -> argparse.ArgumentParser:
    """The arguments every kernel A/B benchmark takes: the two checkouts' ``src`` directories
    (``--after`` defaults to this one), ``--threads`` and ``--rounds`` (also used by
    ab_vnni_linear.py and ab_int8_gemv.py)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--before", required=True, help="a checkout's src directory")
    ap.add_argument("--after", default=str(Path(__file__).resolve().parents[1] / "src"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=rounds)
    return ap


def build_both(a: argparse.Namespace, source: str, prefix: str, march: str | None = None) -> None:
    """Build ``source`` of the ``--before`` and ``--after`` checkouts as operator libraries
    ``<prefix>_before`` / ``<prefix>_after`` (for ``march`` instead of native if given; used by
    ab_int4_gemv.py and ab_bf16_linear.py)."""
    from carpool.model import kernel_build

    cflags = kernel_build.CFLAGS
    if march:
        cflags = tuple(f for f in cflags if f != "-march=native") + (f"-march={march}",)
    for side in ("before", "after"):
        csrc = Path(getattr(a, side)) / "carpool" / "model" / "csrc"
        kernel_build.build_as(csrc, source, f"{prefix}_{side}", cflags)


def alternated_medians(
    passes: dict[str, Callable[[], object]],
    rounds: int,
    before_each: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Median seconds of each pass over ``rounds`` rounds, the passes alternated within each
    round (so a slow phase of the machine lands on all of them) and their order reversed every
    other round, after one warm-up round (also used by ab_int8_gemv.py and ab_int4_gemv.py).
    ``before_each`` runs, untimed, before every pass (ab_int8_gemv.py --evict)."""
    times: dict[str, list[float]] = {name: [] for name in passes}
    for r in range(rounds + 1):
        # The order reversed every other round: the pass after another that read the same
        # bytes finds some of them in L3 (see main).
        for name, run in list(passes.items())[:: 1 if r % 2 else -1]:
            if before_each is not None:
                before_each()
            t0 = time.perf_counter()
            run()
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def product_row(rows: int, med: dict[str, float], nbytes: int, same: bool) -> str:
    """A weight-product A/B's markdown row: rows, before / after ms, the speed-up, the after
    side's read rate and whether both gave the same bits (ab_int8_gemv.py, ab_int4_gemv.py)."""
    before, after = med["before"], med["after"]
    return (
        f"| {rows} | {before * 1e3:.2f} | {after * 1e3:.2f} | {before / after:.2f}x "
        f"| {nbytes / after / 1e9:.1f} | {'yes' if same else 'NO'} |"
    )


def mapped(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in a mapping of the engine's KV cache allocator (huge pages)."""
    from carpool.model.pages import zeroed_lazily

    return zeroed_lazily(tuple(t.shape), t.dtype, "cpu").copy_(t)


def block_layout(src: Path) -> bool:
    """Whether a checkout's int8 cache uses kv_quant's block layout (else rows)."""
    return "def to_blocks" in (src / "carpool" / "model" / "kv_quant.py").read_text()


def pair_layout(src: Path) -> bool:
    """Whether a checkout's bfloat16 cache uses kv_layout's block layout (else rows)."""
    return (src / "carpool" / "model" / "kv_layout.py").exists()


def main() -> None:
    ap = ab_parser(__doc__)
    ap.add_argument("--shapes", default="8x16/4x2048,8x8/8x2048,8x9/3x2048")
    ap.add_argument("--caches", default="bf16,fp32q,int8")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=16, help="tokens per cache block")
    ap.add_argument(
        "--huge-pages",
        action="store_true",
        help="caches (and the sum() baseline) in the engine's own mappings "
        "(pages.zeroed_lazily: transparent huge pages where the kernel allows)",
    )
    ap.add_argument(
        "--prompt",
        action="store_true",
        help="each shape's rows are the last positions of one sequence (a prompt's kernel rows)",
    )
    ap.add_argument(
        "--diagnostic",
        action="store_true",
        help="time a diagnostic build whose results are meant to be wrong (a loop left out to "
        "see what it costs): skip the check that both checkouts give the same outputs",
    )
    a = ap.parse_args()
    build(Path(a.before), "ab_before")
    build(Path(a.after), "ab_after")
    torch.set_num_threads(a.threads)
    ops = {
        "before": torch.ops.ab_before.paged_decode_attention,
        "after": torch.ops.ab_after.paged_decode_attention,
    }
    d, bs = a.head_dim, a.block_size
    print(f"threads={a.threads} layers={a.layers} rounds={a.rounds} head_dim={d} block={bs}")
    print(
        "| shape | cache | before ms | after ms | before / after | sum() ms | after / sum() "
        "| same bits |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for shape in a.shapes.split(","):
        b, heads, ctxs = shape.split("x")
        h, kvh = (int(x) for x in heads.split("/"))
        b = int(b)
        # Each sequence's context: the list's values in turn ("128:2048": 128, 2048, 128, ...).
        lens = torch.tensor([int(c) for c in ctxs.split(":")] * b, dtype=torch.long)[:b]
        ctx = int(lens.max())
        nb = b * (-(-ctx // bs))
        tables = torch.arange(1, nb + 1).view(-1, b).t().contiguous()
        if a.prompt:  # one sequence's blocks, its last b positions
            nb = -(-ctx // bs)
            tables = torch.arange(1, nb + 1).expand(b, nb).contiguous()
            lens = torch.arange(ctx - b + 1, ctx + 1, dtype=torch.long)
        for cache in a.caches.split(","):
            caches = [
                torch.randn(nb + 1, bs, 2, kvh, d).to(torch.bfloat16) for _ in range(a.layers)
            ]
            per = {name: caches for name in ops}
            if cache != "int8" and any(pair_layout(Path(src)) for src in (a.before, a.after)):
                from carpool.model import kv_layout

                blocks = [kv_layout.to_blocks(c) for c in caches]
                for name, src in (("before", a.before), ("after", a.after)):
                    per[name] = blocks if pair_layout(Path(src)) else caches
            if cache == "int8":
                rows = [kv_quant.quantize(c).contiguous() for c in caches]
                blocks = [kv_quant.to_blocks(c) for c in rows]
                for name, src in (("before", a.before), ("after", a.after)):
                    per[name] = blocks if block_layout(Path(src)) else rows
                caches = rows
            q = torch.randn(b, h, d).to(torch.float32 if cache == "fp32q" else torch.bfloat16)
            # float32 tensors of the same bytes as each cache, for the streaming-read baseline
            plain = [torch.randn(c.numel() * c.element_size() // 4) for c in caches]
            if a.huge_pages:
                per = {name: [mapped(c) for c in cs] for name, cs in per.items()}
                plain = [mapped(p) for p in plain]
            times: dict[str, list[float]] = {"before": [], "after": [], "sum": []}
            outs = {}
            with torch.inference_mode():
                for r in range(a.rounds + 2):
                    # Each side first in every other round: whichever runs second finds the
                    # first one's last blocks still in L3 (same caches) and TLB; measured 1.08-
                    # 1.2x for identical builds in a fixed order (issue 11, twenty-third pass).
                    for name, op in list(ops.items())[:: 1 if r % 2 else -1]:
                        start = time.perf_counter()
                        for c in per[name]:
                            outs[name] = op(q, c, tables, lens, d**-0.5)
                        if r >= 2:
                            times[name].append((time.perf_counter() - start) / len(caches))
                    start = time.perf_counter()
                    for p in plain:
                        p.sum()
                    if r >= 2:
                        times["sum"].append((time.perf_counter() - start) / len(plain))
            diff = (outs["before"].float() - outs["after"].float()).abs().max().item()
            assert a.diagnostic or diff < 0.05, f"{shape} {cache}: the checkouts differ by {diff}"
            same = "yes" if torch.equal(outs["before"], outs["after"]) else "no"
            mb, ma, ms = (statistics.median(times[k]) * 1e3 for k in ("before", "after", "sum"))
            print(
                f"| {shape} | {cache} | {mb:.3f} | {ma:.3f} | {mb / ma:.2f}x | {ms:.3f} | "
                f"{ma / ms:.2f}x | {same} |"
            )


if __name__ == "__main__":
    main()
