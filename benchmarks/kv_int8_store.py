"""Cost of one layer's KV write into the cache: bf16 ``index_copy_`` against the int8 cache's
two writers, the torch-op ``kv_quant.store`` (any device) and the C++ ``carpool::kv_store_int8``
(CPU), alternated call by call in one process (medians, microseconds per call).

    python benchmarks/kv_int8_store.py --tokens 1,8,512 --kv-heads 8 --head-dim 64 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch

from carpool.model import kv_quant, paged_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8,512", help="new tokens per step (T), comma-separated")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    assert paged_attention.kernel() is not None, "kernel library did not build"
    k, d = a.kv_heads, a.head_dim
    bf16 = torch.zeros(a.blocks, 16, 2, k, d, dtype=torch.bfloat16)
    int8 = torch.zeros(a.blocks, 16, 2, k, d + 4, dtype=torch.int8)
    writers = {
        "bf16 index_copy_": lambda kv, s: bf16.view(-1, 2, k, d).index_copy_(0, s, kv),
        "int8 torch ops": lambda kv, s: kv_quant.store(int8, s, kv),
        "int8 C++ op": lambda kv, s: paged_attention.store_int8(int8, s, kv),
    }
    print("| tokens | " + " | ".join(f"{n} us" for n in writers) + " |")
    print("|---:|" + "---:|" * len(writers))
    for t in (int(x) for x in a.tokens.split(",")):
        qkv = torch.randn(t, 8 + 2 * k, d).bfloat16()  # the layer's fused qkv output
        new_kv = qkv[:, 8:].view(t, 2, k, d)
        slots = torch.randperm(a.blocks * 16)[:t]
        times: dict[str, list[float]] = {n: [] for n in writers}
        rounds = max(20, a.rounds // max(1, t // 8))
        with torch.inference_mode():
            for i in range(rounds + 5):
                for name, write in writers.items():
                    start = time.perf_counter()
                    write(new_kv, slots)
                    if i >= 5:
                        times[name].append(time.perf_counter() - start)
        cells = " | ".join(f"{statistics.median(v) * 1e6:.1f}" for v in times.values())
        print(f"| {t} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
