"""One layer's decode attention at B sequences x context: the paged kernel against gather + SDPA
and against a plain streaming read of the same bytes (how close the kernel is to the machine).

    python benchmarks/paged_decode_kernel.py --batch 8 --context 2048 --threads 1

The cache is the small model's layer (8 kv heads x 64 dims, bf16), blocks of 16 interleaved
between sequences as a busy block manager hands them out. Every candidate runs once per round,
``--rounds`` rounds, in one process; prints the median and minimum of each. The int8 rows
(``kv_cache_dtype="int8"``: the same values quantized, head_dim + 4 bytes per row) run beside.
"""

from __future__ import annotations

import argparse
import statistics
import time

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
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    b, h, kvh, d, bs, ctx = a.batch, a.heads, a.kv_heads, a.head_dim, 16, a.context
    nb = b * (-(-ctx // bs))
    kv = torch.randn(nb + 2, bs, 2, kvh, d).to(torch.bfloat16)
    kv8 = kv_quant.quantize(kv).contiguous()  # the int8 cache of the same values
    same_int8 = torch.randn(kv8.numel() // 4)  # float32: as many bytes as the int8 cache
    same_bytes = torch.randn(kv.numel() // 2)  # float32: as many bytes as the bf16 cache
    tables = torch.arange(1, nb + 1).view(-1, b).t().contiguous()  # interleaved blocks
    lens = torch.full((b,), ctx, dtype=torch.long)
    q = torch.randn(b, h, d).to(torch.bfloat16)
    mask = torch.ones(b, 1, 1, tables.shape[1] * bs, dtype=torch.bool)
    buf = torch.empty(tables.numel(), *kv.shape[1:], dtype=kv.dtype)

    def gather_sdpa() -> torch.Tensor:
        torch.index_select(kv, 0, tables.view(-1), out=buf)
        k, v = buf.view(b, -1, 2, kvh, d).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(
            q[:, :, None], k, v, attn_mask=mask, scale=d**-0.5, enable_gqa=h != kvh
        )

    assert paged_attention.kernel() is not None, "paged decode kernel did not build"
    cands = {
        "paged kernel": lambda: paged_attention.paged_decode_attention(
            q, kv, tables, lens, d**-0.5
        ),
        "paged kernel, int8 cache": lambda: paged_attention.paged_decode_attention(
            q, kv8, tables, lens, d**-0.5
        ),
        "gather + SDPA": gather_sdpa,
        "sum() of the same bytes": same_bytes.sum,
        "sum() of the int8 bytes": same_int8.sum,
    }
    times: dict[str, list[float]] = {k: [] for k in cands}
    with torch.inference_mode():
        for i in range(a.rounds + 3):
            for k, f in cands.items():
                start = time.perf_counter()
                f()
                if i >= 3:
                    times[k].append(time.perf_counter() - start)
    mb = kv[:nb].numel() * kv.element_size() / 1e6
    print(f"B={b} context={ctx} threads={a.threads}: {mb:.1f} MB of K/V per layer")
    mb8 = kv8[:nb].numel() / 1e6
    print(f"int8 cache: {mb8:.1f} MB of K/V (and scales) per layer")
    for k, v in times.items():
        med = statistics.median(v)
        rate = (mb8 if "int8" in k else mb) / 1e3 / med
        print(f"{k:>24}: median {med * 1e3:.2f} ms ({rate:.1f} GB/s), min {min(v) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
