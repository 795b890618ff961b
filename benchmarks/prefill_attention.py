"""A prompt's causal attention as one SDPA call against calls of fewer rows (the engine's tiles).

One sequence of ``--rows`` query rows over as many keys, a causal boolean mask, grouped-query
heads (``--heads``/``--kv-heads`` of ``--head-dim``): the medians of ``--rounds`` timed runs of
one ``scaled_dot_product_attention`` over the whole square, and of calls of ``--chunks`` rows
each, every call over keys ``[0, its last row + 1)`` (the engine's tiles: calls of
``batch.PREFILL_TILE_ROWS`` rows at fixed positions), alternated; and whether the two give the
same bits (they do not: a key count is an order of sums, hence the engine's calls follow from
the positions alone).

    python benchmarks/prefill_attention.py --rows 512,2048 --chunks 64,128,256
"""

from __future__ import annotations

import argparse
import statistics
import time

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="512,2048", help="comma-separated query rows (= keys)")
    ap.add_argument("--chunks", default="64,128,256", help="comma-separated rows per call")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"threads={a.threads}, {a.heads} heads / {a.kv_heads} kv heads of {a.head_dim}")
    print("| rows | dtype | rows per call | one call ms | calls ms | one / calls | same bits |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for dtype in (getattr(torch, d) for d in a.dtypes.split(",")):
        for n in (int(r) for r in a.rows.split(",")):
            g = torch.Generator().manual_seed(n)
            q = torch.randn(1, a.heads, n, a.head_dim, generator=g).to(dtype)
            k = torch.randn(1, a.kv_heads, n, a.head_dim, generator=g).to(dtype)
            v = torch.randn(1, a.kv_heads, n, a.head_dim, generator=g).to(dtype)
            mask = torch.ones(n, n, dtype=torch.bool).tril().view(1, 1, n, n)

            def one(q=q, k=k, v=v, mask=mask):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

            for c in (int(x) for x in a.chunks.split(",")):

                def calls(q=q, k=k, v=v, mask=mask, n=n, c=c):
                    out = torch.empty_like(q)
                    for q0 in range(0, n, c):
                        q1 = min(n, q0 + c)
                        out[:, :, q0:q1] = F.scaled_dot_product_attention(
                            q[:, :, q0:q1],
                            k[:, :, :q1],
                            v[:, :, :q1],
                            attn_mask=mask[..., q0:q1, :q1],
                            enable_gqa=True,
                        )
                    return out

                same = torch.equal(one(), calls())
                times: dict[str, list[float]] = {"one": [], "calls": []}
                for _ in range(a.rounds):
                    for name, f in (("one", one), ("calls", calls)):
                        t = time.perf_counter()
                        f()
                        times[name].append(time.perf_counter() - t)
                t1, tc = (statistics.median(times[x]) for x in ("one", "calls"))
                dt = str(dtype).removeprefix("torch.")
                print(
                    f"| {n} | {dt} | {c} | {t1 * 1e3:.1f} | {tc * 1e3:.1f} | {t1 / tc:.2f}x "
                    f"| {'yes' if same else 'no'} |"
                )


if __name__ == "__main__":
    main()
