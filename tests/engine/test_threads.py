"""``--threads``: the engine sets torch's threads (default: the measured DEFAULT_THREADS); with
replicas each replica gets its own; ``--threads-per-replica`` alone is refused (see
test_cli_startup)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from carpool import LLM
from carpool.cli import build_parser
from carpool.engine.threads import DEFAULT_THREADS, default_threads
from carpool.entrypoints.engine_args import engine_config_from_args
from carpool.entrypoints.serve import _replica_pool


def test_engine_sets_the_threads_it_is_given_and_the_default_otherwise():
    before = torch.get_num_threads()
    try:
        llm = LLM("embedded", threads=2)
        assert torch.get_num_threads() == 2 and llm.engine.threads == 2
        llm = LLM("embedded")
        assert torch.get_num_threads() == default_threads() == llm.engine.threads
    finally:
        torch.set_num_threads(before)
    cores = len(os.sched_getaffinity(0))
    assert default_threads() == max(1, min(DEFAULT_THREADS, cores))


def test_the_threads_flag_reaches_the_engine_of_a_real_process():
    proc = subprocess.run(
        [sys.executable, "-m", "carpool.cli", "generate", "--model", "embedded", "-p", "x",
         "--max-tokens", "1", "--threads", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "threads=2" in proc.stderr


def _pool(*flags: str):
    args = build_parser().parse_args(["serve", "--model", "embedded", *flags])
    return _replica_pool(args, engine_config_from_args(args))


def test_each_replica_gets_its_threads():
    assert _pool() is None  # one in-process engine: --threads applies to it
    pool = _pool("--replicas", "2", "--threads-per-replica", "3")
    assert pool.config.threads_per_replica == 3 == pool.config.engine_config.threads
    pool = _pool("--replicas", "2", "--threads", "2")
    assert pool.config.threads_per_replica == 2 == pool.config.engine_config.threads
    pool = _pool("--replicas", "2")
    expected = max(1, (os.cpu_count() or 1) // 2)
    assert pool.config.threads_per_replica == expected == pool.config.engine_config.threads
