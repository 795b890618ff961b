"""``--threads``: the engine sets torch's threads (default: the measured DEFAULT_THREADS;
``auto``: the physical cores); with replicas each replica gets its own;
``--threads-per-replica`` alone is refused (see test_cli_startup). A served engine is loaded in
a thread that ends (``run_in_own_thread``), so the engine thread's OpenMP pool is the process's
only one."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from carpool import LLM
from carpool.cli import build_parser
from carpool.config import EngineConfig
from carpool.engine import threads as threads_module
from carpool.engine.threads import (
    DEFAULT_THREADS,
    default_threads,
    physical_cores,
    resolve_threads,
    run_in_own_thread,
)
from carpool.entrypoints import serve
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


def test_the_default_says_how_many_cores_more_threads_could_use(caplog):
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="carpool.engine"):
            LLM("embedded")
        hinted = [r for r in caplog.records if "is the default" in r.getMessage()]
        assert bool(hinted) == (physical_cores() > default_threads())
        if hinted:
            assert f"--threads auto (its {physical_cores()} cores)" in hinted[0].getMessage()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="carpool.engine"):
            LLM("embedded", threads=1)  # chosen: no hint
        assert not [r for r in caplog.records if "is the default" in r.getMessage()]
    finally:
        torch.set_num_threads(before)


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
    pool = _pool("--replicas", "2", "--threads", "auto")  # the physical cores, shared out
    expected = max(1, physical_cores() // 2)
    assert pool.config.threads_per_replica == expected == pool.config.engine_config.threads


def _fake_cpus(root, siblings: dict[int, tuple[int, int]]) -> None:
    """A sysfs CPU folder: cpu -> (package, core)."""
    for cpu, (package, core) in siblings.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")


def test_physical_cores_count_a_cores_hyperthreads_once(tmp_path, monkeypatch):
    # Two packages of two cores, two hyperthreads each (Linux numbers siblings apart).
    topology = {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1)}
    topology |= {4: (0, 0), 5: (0, 1), 6: (1, 0), 7: (1, 1)}
    _fake_cpus(tmp_path, topology)
    monkeypatch.setattr(threads_module, "_affinity", lambda: list(range(8)))
    assert physical_cores(tmp_path) == 4
    monkeypatch.setattr(threads_module, "_affinity", lambda: [0, 4, 5])  # pinned: 2 cores
    assert physical_cores(tmp_path) == 2
    monkeypatch.setattr(threads_module, "_affinity", lambda: [0, 9])  # cpu9's topology unread
    assert physical_cores(tmp_path) == 2


def test_auto_threads_are_resolved_where_the_engine_runs():
    assert EngineConfig(threads="auto").threads == "auto"  # the config keeps the word
    assert resolve_threads("auto") == physical_cores() >= 1
    assert resolve_threads(None) == default_threads() and resolve_threads(3) == 3
    for bad in ("many", 0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"threads must be an int >= 1 or 'auto', got"):
            EngineConfig(threads=bad)
    before = torch.get_num_threads()
    try:
        llm = LLM("embedded", threads="auto")
        assert llm.engine.threads == physical_cores() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_the_threads_flag_takes_auto_and_refuses_other_words(capsys):
    args = build_parser().parse_args(["serve", "--model", "embedded", "--threads", "auto"])
    assert engine_config_from_args(args).threads == "auto"
    args = build_parser().parse_args(["serve", "--model", "embedded", "--threads", "2"])
    assert engine_config_from_args(args).threads == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "embedded", "--threads", "many"])
    assert "argument --threads: not a thread count or 'auto': 'many'" in capsys.readouterr().err


def test_run_in_own_thread_returns_or_raises_from_a_thread_that_ended():
    seen: list[threading.Thread] = []

    def work(a: int, b: int) -> int:
        seen.append(threading.current_thread())
        return a + b

    assert run_in_own_thread(work, 2, 3) == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def fail() -> None:
        raise KeyError("no such model")

    with pytest.raises(KeyError, match="no such model"):
        run_in_own_thread(fail)


# A fresh interpreter (pytest's main thread has run torch already): the first parallel torch
# work on the main thread or in run_in_own_thread, then more on a long-lived second thread (an
# engine thread); prints how many OpenMP workers the process keeps once the first pool could go.
_POOLS = """
import os, sys, threading, time
import torch
torch.set_num_threads(2)
from carpool.engine.threads import run_in_own_thread

def parallel_work():
    return float(torch.rand(1 << 22).exp().sum())  # far past at::parallel_for's grain

def native():
    python = {t.native_id for t in threading.enumerate()}
    return {int(t) for t in os.listdir("/proc/self/task")} - python

before = native()
if sys.argv[1] == "own":
    run_in_own_thread(parallel_work)
else:
    parallel_work()
stop, worked = threading.Event(), threading.Event()
def engine():
    parallel_work()
    worked.set()
    stop.wait()
thread = threading.Thread(target=engine)
thread.start()
worked.wait()
deadline = time.monotonic() + float(sys.argv[2])
while True:  # a pool's workers leave a moment after their thread ended
    workers = native() - before
    if len(workers) <= 1 or time.monotonic() > deadline:
        break
    time.sleep(0.1)
stop.set()
thread.join()
print(len(workers))
"""


def test_work_in_own_thread_leaves_no_openmp_pool_behind():
    """The mechanism ``carpool serve`` relies on, with torch's own OpenMP: the main thread's
    pool outlives the work (two pools' workers: libgomp's spinning throttled), a pool made in
    ``run_in_own_thread`` goes with its thread (only the engine thread's worker stays)."""

    def workers(mode: str, wait_s: float) -> int:
        proc = subprocess.run(
            [sys.executable, "-c", _POOLS, mode, str(wait_s)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.split()[-1])

    assert workers("main", wait_s=2) == 2  # still there 2 s after its thread's last work
    assert workers("own", wait_s=30) == 1


def test_serve_loads_the_engine_in_a_thread_that_ends(monkeypatch):
    loaded_in: list[threading.Thread] = []

    def load_engine(config):
        loaded_in.append(threading.current_thread())
        raise RuntimeError("no weights here")

    monkeypatch.setattr(serve, "load_engine", load_engine)
    args = build_parser().parse_args(["serve", "--model", "embedded", "--port", "0"])
    assert serve.run(args) == 1  # the load failure ends the command, as any load failure
    assert loaded_in and loaded_in[0] is not threading.main_thread()
    deadline = time.monotonic() + 5
    while loaded_in[0].is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not loaded_in[0].is_alive()
