"""llama.cpp's side of the peers benchmark: build the tools, run ``llama-batched-bench``, parse it.

``llama-batched-bench`` (``tools/batched-bench/batched-bench.cpp``) prefills ``pl`` sequences
of ``pp`` random tokens each in one pass, then decodes ``tg`` steps of one token per sequence
and reports ``speed_tg = pl x tg / t_tg``: the decode tokens/s this benchmark compares first,
and ``speed_pp = pl x pp / t_pp``, the prefill tokens/s beside it.
``--output-format jsonl`` makes it print one JSON object per shape, which is what
``parse_batched_bench`` reads (the markdown table is for people).

Every prompt is its own (no ``-pps``: carpool and ``transformers`` prefill every sequence too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BUILD_SCRIPT = Path(__file__).with_name("build_llama_cpp.sh")


@dataclass(frozen=True)
class BatchedBenchRow:
    """One shape of a ``llama-batched-bench`` run (times in seconds, speeds in tokens/s).

    Attributes:
        pp: prompt tokens per sequence.
        tg: generated tokens per sequence.
        pl: sequences decoded together (the batch size).
        t_pp: prefill time of all ``pl`` prompts.
        speed_pp: prefill tokens/s.
        t_tg: time of the ``tg`` decode steps.
        speed_tg: decode tokens/s, ``pl x tg / t_tg``.
        n_threads: threads of the decode steps.
        n_threads_batch: threads of the prefill.
        flash_attn: llama.cpp's flash-attention setting (-1 auto, 0 off, 1 on).
    """

    pp: int
    tg: int
    pl: int
    t_pp: float
    speed_pp: float
    t_tg: float
    speed_tg: float
    n_threads: int
    n_threads_batch: int
    flash_attn: int


def parse_batched_bench(output: str) -> list[BatchedBenchRow]:
    """The result rows of ``llama-batched-bench --output-format jsonl`` output, in order.

    Log lines around the results (model loading, timings) are skipped; a run that printed no
    result row is an error, so a broken run never reads as a fast one.

    Raises:
        ValueError: no result row in ``output``.
    """
    rows = []
    for line in output.splitlines():
        line = line.strip()
        if not (line.startswith("{") and '"speed_tg"' in line):
            continue
        d = json.loads(line)
        rows.append(
            BatchedBenchRow(
                pp=int(d["pp"]),
                tg=int(d["tg"]),
                pl=int(d["pl"]),
                t_pp=float(d["t_pp"]),
                speed_pp=float(d["speed_pp"]),
                t_tg=float(d["t_tg"]),
                speed_tg=float(d["speed_tg"]),
                n_threads=int(d["n_threads"]),
                n_threads_batch=int(d["n_threads_batch"]),
                flash_attn=int(d["flash_attn"]),
            )
        )
    if not rows:
        tail = "\n".join(output.splitlines()[-15:])
        raise ValueError(f"no llama-batched-bench result rows; its output ended with:\n{tail}")
    return rows


def batched_bench_command(
    binary: Path,
    model: Path,
    batch_sizes: Sequence[int],
    prompt_len: int,
    gen_len: int,
    threads: int,
    no_repack: bool = False,
) -> list[str]:
    """The ``llama-batched-bench`` command line for one model and every batch size.

    The first batch size is run twice and its first row is to be dropped (see
    ``decode_speeds``): the first shape of a process pays one-off costs (first touch of the
    weights, graph allocation), which carpool's sweep also keeps out of its timed rounds.
    The context holds every sequence at once: ``max(B) x (pp + tg)`` tokens. ``no_repack``
    adds ``-nr``: no extra weight buffer types (ggml's AMX and repacked layouts); on this
    project's VMs, which list amx_tile/amx_int8, ggml's AMX Q8_0 kernel died of SIGILL at its
    first ``tilezero`` (SIGSEGV in the fortieth pass).
    """
    sizes = [batch_sizes[0], *batch_sizes]
    return [
        str(binary),
        "-m",
        str(model),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "-c",
        str(max(batch_sizes) * (prompt_len + gen_len)),
        "-b",
        "2048",
        "-ub",
        "512",
        "-npp",
        str(prompt_len),
        "-ntg",
        str(gen_len),
        "-npl",
        ",".join(str(b) for b in sizes),
        "--output-format",
        "jsonl",
        *(["-nr"] if no_repack else []),
    ]


def decode_speeds(rows: Sequence[BatchedBenchRow], batch_sizes: Sequence[int]) -> dict[int, float]:
    """Decode tokens/s per batch size from a ``batched_bench_command`` run (warm-up dropped).

    Raises:
        ValueError: the rows do not match the batch sizes asked for.
    """
    return {r.pl: r.speed_tg for r in _measured_rows(rows, batch_sizes)}


def prefill_speeds(rows: Sequence[BatchedBenchRow], batch_sizes: Sequence[int]) -> dict[int, float]:
    """Prefill tokens/s per batch size (``speed_pp = pl x pp / t_pp``: every prompt through the
    model, to the first tokens' logits), warm-up dropped.

    Raises:
        ValueError: the rows do not match the batch sizes asked for.
    """
    return {r.pl: r.speed_pp for r in _measured_rows(rows, batch_sizes)}


def _measured_rows(
    rows: Sequence[BatchedBenchRow], batch_sizes: Sequence[int]
) -> Sequence[BatchedBenchRow]:
    got = [r.pl for r in rows]
    want = [batch_sizes[0], *batch_sizes]
    if got != want:
        raise ValueError(f"llama-batched-bench ran batch sizes {got}, expected {want}")
    return rows[1:]


def build_tools(python: str = sys.executable) -> Path:
    """Build (or find cached) llama.cpp tools with ``build_llama_cpp.sh``; their folder."""
    env = {**os.environ, "PIP": f"{python} -m pip"}
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], env=env, check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def llama_cpp_version() -> str:
    """The pinned llama-cpp-python version, read from the build script (one source of truth)."""
    for line in BUILD_SCRIPT.read_text().splitlines():
        if line.startswith("LLAMA_CPP_PYTHON_VERSION="):
            return line.split("=", 1)[1].split()[0].strip('"')
    raise ValueError(f"no LLAMA_CPP_PYTHON_VERSION= line in {BUILD_SCRIPT}")
