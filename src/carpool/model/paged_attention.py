"""Decode attention that reads the paged KV cache in place: a C++ CPU kernel built at first use.

The gather path of ``carpool.model.attention`` copies every sequence's K/V blocks into one
rectangle per layer per step, then runs SDPA over it: at batch 8, context 8k the copy is
larger than the attention itself. For decode steps (every sequence has one query token) on
the CPU this module runs ``carpool::paged_decode_attention`` instead
(``csrc/paged_attention.cpp``): per sequence (and run of kv heads) it walks the block table,
with an online softmax over the blocks, and reads each K/V row once, in place.

The kernel is compiled by ``torch.utils.cpp_extension`` the first time it is needed and cached
under ``~/.cache/carpool/kernels`` (or ``$CARPOOL_KERNEL_CACHE``), keyed on the source, torch's
version and this CPU's instruction set flags (it is built for the host CPU). When it cannot
be built (no compiler, no ninja) one warning says why and decode keeps the gather path, as it
does on every non-CPU device and for prefill steps.

``CARPOOL_DECODE_ATTENTION=gather`` forces the gather path (to compare); ``use_kernel(False)``
does the same in-process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
# -O3 with the host's instruction set (AVX-512 intrinsics where it has them, else plain loops).
# -fopenmp: at::parallel_for is inline OpenMP code in torch's headers (without the flag it runs
# on one thread); the library links the libgomp torch already loaded. `omp simd` reductions
# vectorize without -ffast-math.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
_LDFLAGS = ["-fopenmp"]
ENV_MODE = "CARPOOL_DECODE_ATTENTION"


class _State:
    """Whether the kernel is loaded, failed, or disabled; how often it ran (for tests)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.op: object | None = None  # torch.ops.carpool.paged_decode_attention once loaded
        self.failed: str | None = None
        self.enabled = os.environ.get(ENV_MODE, "kernel").strip().lower() != "gather"
        self.build_seconds: float | None = None
        self.calls = 0


_state = _State()


def _cpu_flags() -> str:
    """This CPU's feature flags (the binary is built with -march=native for them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _build_name() -> str:
    """Extension name keyed on source, flags, torch and the CPU: a new key is a new build."""
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(" ".join([*_CFLAGS, *_LDFLAGS, torch.__version__, _cpu_flags()]).encode())
    return f"carpool_paged_attention_{key.hexdigest()[:16]}"


def _cache_dir() -> Path:
    root = os.environ.get("CARPOOL_KERNEL_CACHE") or Path.home() / ".cache" / "carpool" / "kernels"
    return Path(root)


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """Put the venv's bin (where the ``ninja`` wheel's launcher lives) on PATH for the build:
    torch runs ``ninja`` by name, and a venv used without activation is not on PATH."""
    old = os.environ.get("PATH", "")
    extra = [str(Path(sys.executable).parent)]
    try:
        import ninja  # type: ignore[import-not-found]

        extra.append(str(ninja.BIN_DIR))
    except ImportError:
        pass
    os.environ["PATH"] = os.pathsep.join([*extra, old])
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _drop_stale_lock(lock: Path, max_age_s: float = 600.0) -> None:
    """Remove torch's build lock left by a build that was killed: torch waits on it forever.

    A live build of this small file takes well under a minute, so a lock older than
    ``max_age_s`` has no owner.
    """
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > max_age_s:
        log.warning("removing a stale kernel build lock (%.0f s old): %s", age, lock)
        lock.unlink(missing_ok=True)


def _load() -> object | None:
    """Build (first time on this machine) and load the kernel; None and one warning if not."""
    from torch.utils import cpp_extension

    name = _build_name()
    build_dir = _cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    _drop_stale_lock(build_dir / "lock")
    start = time.perf_counter()
    with _ninja_on_path():
        cpp_extension.load(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            build_directory=str(build_dir),
            is_python_module=False,  # registers torch.ops.carpool.*; no pybind11 to compile
            verbose=False,
        )
    _state.build_seconds = time.perf_counter() - start
    log.debug("paged decode kernel ready in %.1f s (%s)", _state.build_seconds, build_dir)
    return torch.ops.carpool.paged_decode_attention


def _why(e: Exception) -> str:
    """One line on why the build failed: the compiler's first error when there is one."""
    text = str(e)
    if isinstance(e, subprocess.CalledProcessError) and e.output:
        text = e.output.decode(errors="replace") if isinstance(e.output, bytes) else e.output
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # A compiler diagnostic ("file.cpp:3:5: error: ...") says more than torch's wrapper line.
    errors = [ln for ln in lines if "error:" in ln.lower()]
    return f"{type(e).__name__}: {(errors or lines or ['no message'])[0][:300]}"


def kernel() -> object | None:
    """The loaded operator, building it on first call; None when it is unavailable."""
    if _state.op is not None or _state.failed is not None:
        return _state.op
    with _state.lock:
        if _state.op is None and _state.failed is None:
            try:
                _state.op = _load()
            except Exception as e:  # no compiler, no ninja, a build error: all mean fall back
                _state.failed = _why(e)
                log.warning(
                    "paged decode attention kernel unavailable, decode uses the gather path (%s)",
                    _state.failed,
                )
    return _state.op


def warm_up() -> None:
    """Build or load the kernel now (unless the gather path is forced), not mid-step."""
    if _state.enabled:
        kernel()


def applies(kv_cache: torch.Tensor) -> bool:
    """True when a decode step on ``kv_cache`` should run the in-place kernel."""
    return (
        _state.enabled
        and kv_cache.device.type == "cpu"
        and kv_cache.dtype in (torch.float32, torch.bfloat16)
        and kernel() is not None
    )


def use_kernel(enabled: bool) -> None:
    """Turn the kernel on or off in this process (off: the gather path, for comparisons)."""
    _state.enabled = enabled


def kernel_calls() -> int:
    """How many times the kernel ran in this process (tests check it was really taken)."""
    return _state.calls


def build_seconds() -> float | None:
    """Seconds the first ``kernel()`` took (compile + load, or load of the cached build)."""
    return _state.build_seconds


def paged_decode_attention(
    query: torch.Tensor,  # [B, H, D], one query token per sequence
    kv_cache: torch.Tensor,  # [num_blocks, block_size, 2, kv_heads, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    context_lens: torch.Tensor,  # [B] int64: keys each query attends to (itself included)
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    """Attention of one query per sequence over its first ``context_lens[b]`` cached tokens."""
    op = kernel()
    assert op is not None, "paged decode kernel unavailable: check applies() first"
    _state.calls += 1
    return op(query, kv_cache, block_tables, context_lens, scale)  # type: ignore[operator]
