"""Load time (per stage) and peak RSS of a GGUF model (or a Hugging Face directory), each load in
a fresh process.

Each run starts a new interpreter that imports torch and carpool, pins 1 torch thread, then
builds ``LLM(path, threads=1, kv_cache_memory=64 MiB)`` and reports the engine's own stage log
lines (``loading: <stage> done``, timestamped here to the millisecond), the seconds spent in
``read_gguf_config`` alone (header + metadata + config, timed in a second fresh process),
``VmHWM`` (peak RSS) / ``VmRSS`` from ``/proc/self/status`` before and after loading, and the
same for ``load_model`` alone (a third fresh process: no tokenizer, engine or KV cache). Several
source trees (``--src NAME=DIR``, each put first on ``PYTHONPATH``) are run alternately, so all
see the same machine load; medians are printed.

    python benchmarks/gguf_load.py --src old=/tmp/gguf_base/src --src new=src --repeats 3
    python benchmarks/gguf_load.py --model HF_DIR --quantization int4 --src old=... --src new=src

``--quantization`` is passed to both loads (``LLM`` and ``load_model``); a directory has no
``read_gguf_config`` figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

_CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _child(mode: str, model: str, kv_cache: int, quantization: str | None) -> dict[str, float]:
    """Runs in the fresh process: one load, its figures as a dict."""
    import logging

    import torch

    torch.set_num_threads(1)
    import carpool  # noqa: F401  (imported before the baseline is read)
    from carpool import LLM
    from carpool.model.gguf_loader import read_gguf_config

    out: dict[str, float] = {
        "base_hwm_mib": _status_kib("VmHWM") / 1024,
        "base_rss_mib": _status_kib("VmRSS") / 1024,
    }
    start = time.perf_counter()
    if mode == "load_model":  # the loader alone: no tokenizer, no engine, no KV cache
        from carpool.model.loader import load_model

        model, _ = load_model(model, quantization=quantization)
        out["load_model_s"] = time.perf_counter() - start
        out["load_model_hwm_mib"] = _status_kib("VmHWM") / 1024
        out["load_model_rss_mib"] = _status_kib("VmRSS") / 1024
        del model
        return out
    if mode == "config":
        read_gguf_config(model)
        out["config_s"] = time.perf_counter() - start
        return out
    stamps: list[tuple[str, float]] = []

    class Stages(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if msg.startswith("loading: ") and " done in " in msg:
                stamps.append((msg[len("loading: ") : msg.index(" done in ")], time.perf_counter()))

    root = logging.getLogger("carpool")
    root.setLevel(logging.INFO)
    root.addHandler(Stages())
    llm = LLM(model, threads=1, kv_cache_memory=kv_cache, quantization=quantization)
    out["total_s"] = time.perf_counter() - start
    last = start
    for stage, t in stamps:
        out[f"{stage}_s"] = t - last
        last = t
    out["hwm_mib"] = _status_kib("VmHWM") / 1024
    out["rss_mib"] = _status_kib("VmRSS") / 1024
    del llm
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    ap.add_argument("--src", action="append", required=False, default=[], help="NAME=DIR")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-mib", type=int, default=64, help="kv_cache_memory of the engine")
    ap.add_argument("--quantization", default=None, help="int8 / int4 / none (default: the file's)")
    ap.add_argument("--output", default=None, help="write all runs as JSON here")
    ap.add_argument("--child", choices=("llm", "config", "load_model"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        got = _child(args.child, args.model, args.kv_cache_mib * 2**20, args.quantization)
        print(json.dumps(got))
        return
    model = args.model
    if model is None:
        from carpool.model.source import default_model_path

        model = str(default_model_path())
    trees = dict(s.split("=", 1) for s in args.src) or {"current": "src"}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for r in range(args.repeats):
        for name, src in trees.items():
            env = {**os.environ, **_CHILD_ENV, "PYTHONPATH": str(Path(src).resolve())}
            row: dict[str, float] = {}
            modes = (
                ("llm", "load_model") if Path(model).is_dir() else ("llm", "config", "load_model")
            )
            for mode in modes:
                cmd = [sys.executable, __file__, "--child", mode, "--model", model,
                       "--kv-cache-mib", str(args.kv_cache_mib)]  # fmt: skip
                if args.quantization:
                    cmd += ["--quantization", args.quantization]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                if mode == "config":
                    got = {"config_only_s": got["config_s"]}
                elif mode == "load_model":
                    got = {k: v for k, v in got.items() if k.startswith("load_model")}
                row.update(got)
            runs[name].append(row)
            print(f"run {r} {name}: " + ", ".join(f"{k}={v:.2f}" for k, v in row.items()))
    print(f"\nmedians over {args.repeats} runs (model {model}, quantization {args.quantization}):")
    keys = list(next(iter(runs.values()))[0])
    print("| figure | " + " | ".join(trees) + " |")
    print("|---|" + "---:|" * len(trees))
    for key in keys:
        cells = [
            f"{statistics.median(row.get(key, float('nan')) for row in runs[n]):.2f}" for n in trees
        ]
        print(f"| {key} | " + " | ".join(cells) + " |")
    if args.output:
        Path(args.output).write_text(json.dumps({"model": model, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
