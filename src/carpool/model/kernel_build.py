"""Build and load the C++ CPU operators of ``carpool/model/csrc`` at first use.

``torch.utils.cpp_extension`` compiles a source file into a library that registers
``torch.ops.carpool.*`` operators (no pybind11: a much shorter build). The build is cached under
``~/.cache/carpool/kernels`` (or ``$CARPOOL_KERNEL_CACHE``), keyed on the source, torch's version
and this CPU's instruction set flags (it is built for the host CPU with ``-march=native``, or
for the level ``$CARPOOL_CPU_LEVEL`` names: ``cpu_level``).
Callers (``paged_attention``, ``fused_ops``, ``vnni_linear``) catch a failed build and fall back to
torch ops; ``Library`` holds that build-once-and-warn state for one source.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# CARPOOL_CPU_LEVEL=x86-64-v3 makes this process an AVX2 CPU without AVX-512 (an AMD Zen 2 /
# Zen 3, Intel Haswell to Alder Lake) as far as carpool can tell: the kernels built for that level
# (their AVX2 loops), and cpu_flags / amx_tiles without AVX-512, AVX-VNNI and AMX, so every choice
# of a path follows. With torch's and oneDNN's own switches (ATEN_CPU_CAPABILITY=avx2,
# ONEDNN_MAX_CPU_ISA=AVX2: `make test-avx2` sets all three) the whole suite runs on an AVX-512
# host as it would on such a CPU. Why: the AVX2 loops had no whole-suite run since the Zen 2 of
# issue 11's twenty-ninth pass, while later passes changed code they share (fifty-first pass).
# Unset: the host's own level. CPU_LEVELS: each level and the flags it lacks (prefixes).
ENV_CPU_LEVEL = "CARPOOL_CPU_LEVEL"
CPU_LEVELS = {"x86-64-v3": ("avx512", "amx", "avx_vnni")}


def cpu_level() -> str | None:
    """The instruction set level ``$CARPOOL_CPU_LEVEL`` names (``CPU_LEVELS``), or None: the
    host's own (``-march=native``). Anything else is a ``ValueError`` naming the variable."""
    level = os.environ.get(ENV_CPU_LEVEL) or None
    if level is not None and level not in CPU_LEVELS:
        raise ValueError(
            f"{ENV_CPU_LEVEL}={level!r}: expected one of {sorted(CPU_LEVELS)} or unset (this CPU)"
        )
    return level


# -O3 with the host's instruction set (AVX-512 intrinsics where it has them, else plain loops),
# or cpu_level's.
# -fopenmp: at::parallel_for is inline OpenMP code in torch's headers (without the flag it runs
# on one thread); the library links the libgomp torch already loaded. `omp simd` reductions
# vectorize without -ffast-math.
# Tuples, and lists copied for each build: torch's cpp_extension.load appends its own -L/-l
# flags to the list it is given, which changed every later build's name in that process (a
# fresh process then missed those cached builds and compiled again).
CFLAGS = ("-O3", f"-march={cpu_level() or 'native'}", "-fopenmp", "-fno-math-errno")
LDFLAGS = ("-fopenmp",)


def cpu_flags() -> str:
    """This CPU's feature flags (the binary is built with -march=native for them), less those
    the level ``cpu_level`` names lacks."""
    line = platform.machine() + platform.processor()
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith(("flags", "Features")):
                line = text
                break
    except OSError:
        pass
    level = cpu_level()
    if level is None:
        return line
    return " ".join(f for f in line.split() if not f.startswith(CPU_LEVELS[level]))


def amx_tiles() -> bool:
    """Whether this CPU multiplies on AMX tiles (torch's probe), and no ``cpu_level`` without
    them is asked for."""
    return bool(torch.cpu._is_amx_tile_supported()) and cpu_level() is None


def _build_name(prefix: str, source: Path) -> str:
    """Extension name keyed on source (and the headers beside it, which it may include),
    flags, torch and the CPU: a new key is a new build."""
    key = hashlib.sha256()
    key.update(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):
        key.update(header.read_bytes())
    key.update(" ".join([*CFLAGS, *LDFLAGS, torch.__version__, cpu_flags()]).encode())
    return f"{prefix}_{key.hexdigest()[:16]}"


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


def drop_stale_lock(lock: Path, max_age_s: float = 600.0) -> None:
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


def load_library(prefix: str, source: Path) -> float:
    """Build ``source`` (first time on this machine) and load it into this process, which
    registers its ``torch.ops.carpool.*`` operators. Returns the seconds it took (compile and
    load, or load of the cached build). Raises whatever the build raised: see ``why``."""
    name = _build_name(prefix, source)
    build_dir = _cache_dir() / name
    start = time.perf_counter()
    built = build_dir / f"{name}.so"
    # A finished build of this very source (the name hashes it, the flags, torch and the CPU):
    # loaded as it is. torch.utils.cpp_extension, which would only find it up to date, imports
    # setuptools (4 MiB of resident memory and ~0.2 s per process, measured).
    if built.is_file() and not (build_dir / "lock").exists():
        try:
            torch.ops.load_library(str(built))
        except OSError as e:  # e.g. a file cut short by a killed build: build it again below
            log.warning("cached kernel build %s did not load (%s): rebuilding", built, e)
        else:
            return time.perf_counter() - start
    build_dir.mkdir(parents=True, exist_ok=True)
    drop_stale_lock(build_dir / "lock")
    _compile_and_load(name, source, build_dir, CFLAGS)
    seconds = time.perf_counter() - start
    log.debug("%s ready in %.1f s (%s)", source.name, seconds, build_dir)
    return seconds


def why(e: Exception) -> str:
    """One line on why the build failed: the compiler's first error when there is one."""
    text = str(e)
    if isinstance(e, subprocess.CalledProcessError) and e.output:
        text = e.output.decode(errors="replace") if isinstance(e.output, bytes) else e.output
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # A compiler diagnostic ("file.cpp:3:5: error: ...") says more than torch's wrapper line.
    errors = [ln for ln in lines if "error:" in ln.lower()]
    return f"{type(e).__name__}: {(errors or lines or ['no message'])[0][:300]}"


class Library:
    """One C++ operator library of ``csrc``, built and loaded at most once per process.

    ``load()`` builds (first time on this machine) and loads it; a failure is logged once and
    remembered (callers then keep their torch ops). ``env``: an environment variable that
    turns it off when set to ``0`` (to compare); ``enabled`` can also be flipped in-process.
    """

    def __init__(self, prefix: str, source: Path, what: str, env: str | None = None) -> None:
        self.prefix, self.source, self.what = prefix, source, what
        self.lock = threading.Lock()
        self.loaded = False
        self.failed: str | None = None
        self.enabled = env is None or os.environ.get(env, "1").strip() != "0"

    def active(self) -> bool:
        """True when the operators are loaded and turned on (no build attempted)."""
        return self.enabled and self.loaded

    def load(self) -> bool:
        """True once the library's operators are registered; False when off or unbuildable."""
        if not self.enabled:
            return False
        if self.loaded or self.failed is not None:
            return self.loaded
        with self.lock:
            if not self.loaded and self.failed is None:
                try:
                    load_library(self.prefix, self.source)
                    self.loaded = True
                except Exception as e:  # no compiler, no ninja, a build error
                    self.failed = why(e)
                    log.warning("%s unavailable, using torch ops (%s)", self.what, self.failed)
        return self.loaded


def build_as(csrc: Path, source: str, namespace: str, cflags: Sequence[str] = CFLAGS) -> None:
    """Build a copy of ``csrc / source`` (headers beside it) whose operators register as
    ``torch.ops.<namespace>`` instead of ``torch.ops.carpool``, compiled with ``cflags``, and
    load it into this process. Not cached: for side-by-side runs in one process, such as two
    checkouts' kernels (``benchmarks/ab_paged_kernel.py``) or one kernel at another instruction
    set level than the host's (``tests/model/test_kernel_isa_runtime.py``)."""
    work = Path(tempfile.mkdtemp(prefix=f"{namespace}-"))
    for f in csrc.iterdir():
        if f.is_file():
            shutil.copy(f, work)
    cpp = work / source
    text = cpp.read_text()
    for macro in ("TORCH_LIBRARY", "TORCH_LIBRARY_FRAGMENT", "TORCH_LIBRARY_IMPL"):
        text = text.replace(f"{macro}(carpool,", f"{macro}({namespace},")
    cpp.write_text(text)
    _compile_and_load(namespace, cpp, work, cflags)


def _compile_and_load(name: str, source: Path, build_dir: Path, cflags: Sequence[str]) -> None:
    """torch's cpp_extension build of one source into ``build_dir``, loaded into this process."""
    from torch.utils import cpp_extension

    with _ninja_on_path():
        cpp_extension.load(
            name=name,
            sources=[str(source)],
            extra_cflags=list(cflags),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(build_dir),
            is_python_module=False,  # registers torch.ops.<namespace>.*; no pybind11 to compile
            verbose=False,
        )
