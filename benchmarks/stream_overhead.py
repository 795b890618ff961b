"""Server-side CPU per streamed token (short vs long streams) and offline decode tokens/s,
for several source trees side by side in one run (e.g. main's ``src`` against a branch's).

Streaming: each tree serves a tiny random-weight Llama (``bench.random_model`` preset ``tiny``,
context 8192, float32) from its own ``carpool`` server process; the client streams completions
of ``--lengths`` tokens (greedy, EOS ignored) and reads the server process's CPU time (all its
threads, ``/proc/PID/task/*/schedstat``, nanoseconds) before and after each request. The model is
tiny so the forward pass is cheap and per-token serving costs (output building, SSE, pickling)
show; a cost that grows with the stream's length shows as CPU/token growing with the length.

Decode: ``LLM.generate`` on the ``small`` preset (bf16) at batch sizes ``--batch-sizes`` in a
subprocess per tree, generated tokens/s over the whole call. Trees and repeats are interleaved,
and medians are reported, because the machine is shared and noisy.

Usage:
    python benchmarks/stream_overhead.py --tree main=/work/main/src --tree core=src \\
        --lengths 100,4000 --repeats 3 --batch-sizes 1,32 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import httpx

# The server counts the CPU time its forward passes take (``ModelRunner.execute``, on the
# engine thread; torch runs single-threaded here), so the serving cost around them is
# total - model.
SERVER = """
import time, uvicorn
from carpool.config import EngineConfig
from carpool.engine.llm_engine import LLMEngine
try:
    from carpool.engine.threads import run_in_own_thread
except ImportError:  # a tree from before it
    def run_in_own_thread(fn, *args):
        return fn(*args)
from carpool.server import ServerConfig, build_app
from carpool.worker.model_runner import ModelRunner
model_ns = [0]
run_model = ModelRunner.execute
def execute(self, *args, **kwargs):
    t = time.thread_time_ns()
    try:
        return run_model(self, *args, **kwargs)
    finally:
        model_ns[0] += time.thread_time_ns() - t
ModelRunner.execute = execute
# --threads through the config (the engine sets torch's threads; its default is one), loaded
# in a thread that ends as carpool serve does (one OpenMP pool: carpool.engine.threads).
config = EngineConfig(model={model!r}, dtype="float32", kv_cache_memory=64 << 20, threads={threads})
engine = run_in_own_thread(LLMEngine, config)
app = build_app(engine, ServerConfig())
app.add_api_route("/bench/model_cpu_ns", lambda: {{"ns": model_ns[0]}})
uvicorn.run(app, host="127.0.0.1", port={port}, log_level="warning", access_log=False)
"""

DECODE = """
import json, random, time, torch
torch.set_num_threads({threads})
from carpool import LLM, SamplingParams
llm = LLM(
    {model!r}, dtype="bfloat16", max_num_seqs=64, kv_cache_memory=256 << 20, threads={threads}
)
rng = random.Random(0)
out = {{}}
for b in {batch_sizes!r}:
    prompts = [[rng.randrange(3, 32000) for _ in range(16)] for _ in range(b)]
    params = SamplingParams(max_tokens={gen_len}, temperature=0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    t = time.{clock}()
    llm.generate(prompts, params, use_tqdm=False)
    out[b] = b * {gen_len} / (time.{clock}() - t)
print(json.dumps(out))
"""


def cpu_ns(pid: int) -> int:
    """CPU time of every live thread of ``pid`` (ns)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # thread ended
            total += int((task / "schedstat").read_text().split()[0])
    return total


def model_ns(url: str) -> int:
    """CPU time the server's forward passes took so far (ns)."""
    return int(httpx.get(f"{url}/bench/model_cpu_ns", timeout=10).json()["ns"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_models(work: Path, src: str) -> tuple[Path, Path]:
    """The tiny (context 8192) and small models, written with ``src``'s own helper."""
    code = (
        "import json, sys; from pathlib import Path\n"
        "from carpool.bench.random_model import save_random_llama\n"
        "w = Path(sys.argv[1])\n"
        "t = save_random_llama(w / 'tiny', 'tiny', 'float32')\n"
        "c = json.loads((t / 'config.json').read_text())\n"
        "c['max_position_embeddings'] = 8192\n"
        "(t / 'config.json').write_text(json.dumps(c))\n"
        "save_random_llama(w / 'small', 'small', 'bfloat16')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(work)], env=env_for(src, 1), check=True)
    return work / "tiny", work / "small"


def env_for(src: str, threads: int) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": str(threads)}


def stream_once(url: str, length: int) -> int:
    """Stream one completion of ``length`` tokens; returns the tokens the usage chunk counts."""
    body = {
        "model": "tiny",
        "prompt": "hello",
        "max_tokens": length,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and '"completion_tokens"' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return tokens


def start_server(src: str, model: Path, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    code = SERVER.format(threads=threads, model=str(model), port=port)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env_for(src, threads))
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server of {src} did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, help="LABEL=SRC_DIR (repeatable)")
    ap.add_argument("--lengths", default="100,4000", help="streamed tokens per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,32", help="decode batch sizes ('' to skip)")
    ap.add_argument("--gen-len", type=int, default=64, help="decode: tokens per sequence")
    ap.add_argument("--decode-repeats", type=int, default=5, help="decode: runs per tree")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument(
        "--decode-clock",
        choices=("wall", "cpu"),
        default="wall",
        help="decode: tokens per wall second, or per CPU second of the process (cpu: less "
        "sensitive to a loaded machine, blind to waiting)",
    )
    ap.add_argument("--output", type=Path, default=None, help="write the medians as JSON")
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    lengths = [int(x) for x in args.lengths.split(",") if x]  # '' skips the streaming part
    batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    work = Path(tempfile.mkdtemp(prefix="stream-overhead-"))
    tiny, small = make_models(work, next(iter(trees.values())))

    cpu: dict[tuple[str, int], list[float]] = {}
    rest: dict[tuple[str, int], list[float]] = {}  # cpu minus the forward passes
    servers = {
        label: start_server(src, tiny, args.threads) for label, src in trees.items() if lengths
    }
    try:
        for _, url in servers.values():  # warm-up
            stream_once(url, 16)
        for _ in range(args.repeats):
            for length in lengths:
                for label, (proc, url) in servers.items():
                    # Short streams are repeated so each sample covers >= ~1,000 tokens.
                    times = max(1, 1000 // length)
                    before, model_before = cpu_ns(proc.pid), model_ns(url)
                    for _ in range(times):
                        got = stream_once(url, length)
                        assert got == length, f"{label}: {got} tokens streamed, not {length}"
                    total = cpu_ns(proc.pid) - before
                    model = model_ns(url) - model_before
                    per = 1e3 * times * length
                    cpu.setdefault((label, length), []).append(total / per)
                    rest.setdefault((label, length), []).append((total - model) / per)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)

    decode: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.decode_repeats if batch_sizes else 0):
        for label, src in trees.items():
            code = DECODE.format(
                threads=args.threads, model=str(small), batch_sizes=batch_sizes,
                gen_len=args.gen_len,
                clock="perf_counter" if args.decode_clock == "wall" else "process_time",
            )  # fmt: skip
            res = subprocess.run(
                [sys.executable, "-c", code],
                env=env_for(src, args.threads),
                check=True,
                capture_output=True,
                text=True,
            )
            for b, tps in json.loads(res.stdout.strip().splitlines()[-1]).items():
                decode.setdefault((label, int(b)), []).append(tps)

    result: dict[str, dict[str, float]] = {label: {} for label in trees}
    for title, table, key in (
        (
            ("server CPU per streamed token, all threads", cpu, "cpu"),
            ("server CPU per streamed token outside the forward passes", rest, "serving"),
        )
        if lengths
        else ()
    ):
        print(f"\n{title} (us, median of {args.repeats})")
        print("| tree | " + " | ".join(f"{n} tokens" for n in lengths) + " | long / short |")
        print("|---|" + "---:|" * (len(lengths) + 1))
        for label in trees:
            med = [statistics.median(table[label, n]) for n in lengths]
            for n, m in zip(lengths, med, strict=True):
                result[label][f"{key}_us_per_token_{n}"] = m
            cells = " | ".join(f"{m:.0f}" for m in med)
            print(f"| {label} | {cells} | {med[-1] / med[0]:.2f} |")
    if batch_sizes:
        unit = "tokens/s" if args.decode_clock == "wall" else "tokens per CPU second"
        print(f"\ndecode {unit} (small preset, bf16, median of {args.decode_repeats})")
        print("| tree | " + " | ".join(f"B={b}" for b in batch_sizes) + " |")
        print("|---|" + "---:|" * len(batch_sizes))
        for label in trees:
            med = [statistics.median(decode[label, b]) for b in batch_sizes]
            for b, m in zip(batch_sizes, med, strict=True):
                result[label][f"decode_tokens_per_s_B{b}"] = m
            print(f"| {label} | " + " | ".join(f"{m:.1f}" for m in med) + " |")
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
