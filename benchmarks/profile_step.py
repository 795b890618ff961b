"""Where a decode step spends its time: wall-clock split and torch.profiler op groups.

Run after benchmarks/throughput.py, which writes the random models to the temp dir:
    python benchmarks/profile_step.py
"""

from __future__ import annotations

import statistics
import tempfile
import time

from torch.profiler import ProfilerActivity, profile

from carpool import LLM, SamplingParams

GROUPS = {
    "matmuls": ("aten::mm", "aten::addmv_", "aten::addmm", "aten::mv", "aten::bmm"),
    "attention (SDPA)": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
    "KV gather/scatter": ("aten::index_select", "aten::index_copy_"),
    "sampling (argmax)": ("aten::argmax",),
}


def profile_decode(name: str, batch: int, steps: int = 10) -> None:
    path = f"{tempfile.gettempdir()}/carpool-bench-models/{name}-bfloat16"
    llm = LLM(path, dtype="bfloat16", max_num_seqs=64, kv_cache_memory=256 * 2**20)
    engine = llm.engine
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request([5 + i] * 32, params)
    for _ in range(4):  # prefill and warm-up
        engine.step()
    forward_times: list[float] = []
    step_times: list[float] = []
    forward = engine.model.forward

    def timed_forward(*args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        forward_times.append(time.perf_counter() - start)
        return out

    engine.model.forward = timed_forward
    for _ in range(20):
        start = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - start)
    print(
        f"{name} B={batch}: step {statistics.median(step_times) * 1e3:.2f} ms, "
        f"model forward {statistics.median(forward_times) * 1e3:.2f} ms"
    )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    ops = prof.key_averages()
    total = sum(k.self_cpu_time_total for k in ops)
    grouped: set[str] = set()
    for group, names in GROUPS.items():
        t = sum(k.self_cpu_time_total for k in ops if k.key in names)
        grouped |= set(names)
        print(f"  {group}: {t / total * 100:.0f}%")
    other = [k for k in ops if k.key not in grouped]
    share = sum(k.self_cpu_time_total for k in other) / total * 100
    print(f"  all other ops: {share:.0f}% in {sum(k.count for k in other) / steps:.0f} ops/step")


if __name__ == "__main__":
    profile_decode("small", 1)
    profile_decode("medium", 32)
