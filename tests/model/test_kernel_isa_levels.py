"""The C++ kernels compile for every x86 instruction-set level they have code for.

They are built with ``-march=native`` on the machine that runs them, so each machine only ever
compiles its own ``#if`` branches: an AVX-512 or AMX host would never notice that the AVX2 or
plain-loop branch does not compile (it happened: a ``using`` of an AVX-512-only helper broke the
build on an AVX2-only AMD EPYC). Here every source is compiled (syntax and templates only, no
code generation) for each level, whatever the host.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch.utils import cpp_extension

from carpool.model import kernel_build

# Plain loops (SSE4.2), AVX2 + FMA (Zen 3), AVX-512 without BF16, AVX-512 BF16 without AMX
# (Zen 4; gcc 12 has no -march=znver4), AMX (Sapphire Rapids).
LEVELS = [
    ["-march=x86-64-v2"],
    ["-march=x86-64-v3"],
    ["-march=x86-64-v4"],
    ["-march=x86-64-v4", "-mavx512bf16"],
    ["-march=sapphirerapids"],
]
SOURCES = sorted(p.name for p in kernel_build.CSRC.glob("*.cpp"))

pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="the levels are x86 ones"
)


def _compile(source: str, level: list[str]) -> subprocess.CompletedProcess[str]:
    dirs = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    includes = [f"-I{p}" for p in dirs]
    flags = [f for f in kernel_build.CFLAGS if f != "-march=native"]
    cmd = [
        shutil.which("c++") or "c++",
        "-std=c++17",
        "-fsyntax-only",
        *level,
        *flags,
        *includes,
        str(kernel_build.CSRC / source),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_every_kernel_source_compiles_at_every_isa_level():
    assert SOURCES, f"no kernel sources under {kernel_build.CSRC}"
    jobs = [(s, lv) for s in SOURCES for lv in LEVELS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _compile(*job), jobs))
    failures = [
        f"{source} with {' '.join(level)}:\n{result.stderr[-2000:]}"
        for (source, level), result in zip(jobs, results, strict=True)
        if result.returncode != 0
    ]
    assert not failures, "\n\n".join(failures)
