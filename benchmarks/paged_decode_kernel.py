"""One layer's decode attention at B sequences x context: the paged kernel against gather + SDPA
and against a plain streaming read of the same bytes (how close the kernel is to the machine).

    python benchmarks/paged_decode_kernel.py --batch 8 --context 2048 --threads 1
    python benchmarks/paged_decode_kernel.py --heads 16 --kv-heads 4 --threads 2 --no-gather

The cache is by default the small model's layer (8 kv heads x 64 dims, bf16; ``--heads 16
--kv-heads 4``: the medium model's), blocks of 16 interleaved between sequences as a busy block
manager hands them out, ``--layers`` such caches read in turn (from memory, as a model's
layers are; times per layer). Every candidate runs once per round,
``--rounds`` rounds, in one process; prints the median and minimum of each. The int8 rows
(``kv_cache_dtype="int8"``: the same values quantized, in its block layout) run beside.
"""

from __future__ import annotations

import argparse
import statistics
import time

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch
import torch.nn.functional as F

from carpool.model import kv_quant, paged_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument(
        "--layers", type=int, default=8, help="caches read in turn (a model's layers: from memory)"
    )
    ap.add_argument("--no-gather", action="store_true", help="skip gather + SDPA (slow)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    b, h, kvh, d, bs, ctx = a.batch, a.heads, a.kv_heads, a.head_dim, 16, a.context
    nb = b * (-(-ctx // bs))
    kvs = [torch.randn(nb + 2, bs, 2, kvh, d).to(torch.bfloat16) for _ in range(a.layers)]
    kv8s = [kv_quant.to_blocks(kv_quant.quantize(kv)) for kv in kvs]  # int8, the same values
    same_int8 = [torch.randn(kv8s[0].numel() // 4) for _ in kvs]  # float32: the int8 bytes
    same_bytes = [torch.randn(kvs[0].numel() // 2) for _ in kvs]  # float32: the bf16 bytes
    tables = torch.arange(1, nb + 1).view(-1, b).t().contiguous()  # interleaved blocks
    lens = torch.full((b,), ctx, dtype=torch.long)
    q = torch.randn(b, h, d).to(torch.bfloat16)
    mask = torch.ones(b, 1, 1, tables.shape[1] * bs, dtype=torch.bool)
    buf = torch.empty(tables.numel(), *kvs[0].shape[1:], dtype=torch.bfloat16)

    def gather_sdpa(kv: torch.Tensor) -> torch.Tensor:
        torch.index_select(kv, 0, tables.view(-1), out=buf)
        k, v = buf.view(b, -1, 2, kvh, d).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(
            q[:, :, None], k, v, attn_mask=mask, scale=d**-0.5, enable_gqa=h != kvh
        )

    def kernel(kv: torch.Tensor) -> torch.Tensor:
        return paged_attention.paged_decode_attention(q, kv, tables, lens, d**-0.5)

    assert paged_attention.kernel() is not None, "paged decode kernel did not build"
    # Each candidate over every layer's cache in turn: one layer's K/V (16.8 MB for GQA 16/4 at
    # B=8 x 2k) fits a 32 MB L3, so repeating one layer would time the cache, not memory.
    cands = {
        "paged kernel": (kernel, kvs),
        "paged kernel, int8 cache": (kernel, kv8s),
        "gather + SDPA": (gather_sdpa, kvs),
        "sum() of the same bytes": (torch.sum, same_bytes),
        "sum() of the int8 bytes": (torch.sum, same_int8),
    }
    if a.no_gather:
        del cands["gather + SDPA"]
    times: dict[str, list[float]] = {k: [] for k in cands}
    with torch.inference_mode():
        for i in range(a.rounds + 3):
            for k, (f, layers) in cands.items():
                start = time.perf_counter()
                for x in layers:
                    f(x)
                if i >= 3:
                    times[k].append((time.perf_counter() - start) / len(layers))
    mb = kvs[0][:nb].numel() * 2 / 1e6
    print(f"B={b} heads={h}/{kvh} d={d} context={ctx} threads={a.threads} layers={a.layers}")
    print(f"{mb:.1f} MB of bf16 K/V per layer, {kv8s[0][:nb].numel() / 1e6:.1f} MB int8 (+ scales)")
    for k, v in times.items():
        med = statistics.median(v)
        rate = (kv8s[0][:nb].numel() / 1e6 if "int8" in k else mb) / 1e3 / med
        line = f"median {med * 1e3:.2f} ms per layer ({rate:.1f} GB/s), min {min(v) * 1e3:.2f}"
        print(f"{k:>24}: {line}")


if __name__ == "__main__":
    main()
