"""Where a model's load sets its peak resident memory: the main thread's stack at the highest
resident size a sampling thread saw, with the anonymous and file-backed parts and the block
allocator's counters at that moment.

A thread reads ``/proc/self/status`` every ``--every-ms`` (2 ms) while ``load_model`` runs (and
``prepare_model`` after it, unless ``--no-prepare``: the bf16 linears' packing and the weights'
move onto huge pages); at each new high (by at least 2 MiB) it keeps ``sys._current_frames()``'s
view of the main thread. The peak ``gguf_load.py`` reports (``VmHWM``) can fall between two
samples: this says *where* it is, that one *what* it is. Linux only.

    python benchmarks/load_trace.py MODEL_DIR_OR_GGUF [--quantization int4] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import traceback

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch


def _status() -> dict[str, int]:
    """``VmRSS`` / ``RssAnon`` / ``RssFile`` in KiB."""
    with open("/proc/self/status") as f:
        return {
            k: int(v.split()[0])
            for k, v in (line.split(":", 1) for line in f)
            if k in ("VmRSS", "RssAnon", "RssFile")
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--quantization", choices=["int8", "int4"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--every-ms", type=float, default=2.0)
    ap.add_argument("--frames", type=int, default=8, help="innermost stack frames shown")
    ap.add_argument("--no-prepare", action="store_true", help="load_model only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from carpool.model import cpu_allocator
    from carpool.model.loader import load_model
    from carpool.worker.model_runner import prepare_model

    main_thread = threading.get_ident()
    peak: dict[str, object] = {"rss": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            status = _status()
            if status["VmRSS"] > int(peak["rss"]) + 2048:  # type: ignore[call-overload]
                frame = sys._current_frames().get(main_thread)
                peak.update(
                    rss=status["VmRSS"],
                    status=status,
                    allocator=cpu_allocator.stats(),
                    stack="".join(traceback.format_stack(frame)[-args.frames :]),
                )
            time.sleep(args.every_ms / 1000)

    before = _status()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    model, _ = load_model(args.model, quantization=args.quantization)
    if not args.no_prepare:
        prepare_model(model, "cpu")
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    after = _status()

    def mib(kib: int) -> str:
        return f"{kib / 1024:,.1f} MiB"

    print(f"before loading: resident {mib(before['VmRSS'])}")
    print(
        f"loaded in {seconds:.2f} s: resident {mib(after['VmRSS'])} "
        f"(anonymous {mib(after['RssAnon'])}, file {mib(after['RssFile'])})"
    )
    status = peak.get("status")
    if not isinstance(status, dict):
        print("no sample above the starting size")
        return
    print(
        f"highest sample: {mib(status['VmRSS'])} (anonymous {mib(status['RssAnon'])}, "
        f"file {mib(status['RssFile'])}), {mib(status['VmRSS'] - after['VmRSS'])} above "
        "the loaded size"
    )
    alloc = peak["allocator"]
    print(
        f"block allocator then: {alloc.mapped / 2**20:,.1f} MiB mapped, "  # type: ignore[attr-defined]
        f"{alloc.cached / 2**20:,.1f} MiB of it free blocks"
    )  # type: ignore[attr-defined]
    print("main thread at that sample:")
    print(peak["stack"])


if __name__ == "__main__":
    main()
