"""``CARPOOL_CPU_LEVEL``: this process as a CPU of a lower instruction set level (``make
test-avx2``: the suite as an AVX2 CPU without AVX-512 runs it). Here only the switch itself:
what it builds for and what it reports; the suite run under it is the real check."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from carpool.model import kernel_build


def test_unset_is_this_cpu(monkeypatch):
    monkeypatch.delenv(kernel_build.ENV_CPU_LEVEL, raising=False)
    assert kernel_build.cpu_level() is None
    monkeypatch.setenv(kernel_build.ENV_CPU_LEVEL, "")
    assert kernel_build.cpu_level() is None


def test_an_unknown_level_names_the_variable(monkeypatch):
    monkeypatch.setenv(kernel_build.ENV_CPU_LEVEL, "zen9")
    with pytest.raises(ValueError, match="CARPOOL_CPU_LEVEL='zen9'.*x86-64-v3"):
        kernel_build.cpu_level()


def test_the_avx2_level_hides_avx512_vnni_and_amx(monkeypatch):
    monkeypatch.delenv(kernel_build.ENV_CPU_LEVEL, raising=False)
    host = kernel_build.cpu_flags().split()
    monkeypatch.setenv(kernel_build.ENV_CPU_LEVEL, "x86-64-v3")
    assert kernel_build.cpu_level() == "x86-64-v3"
    flags = kernel_build.cpu_flags().split()
    hidden = ("avx512", "amx", "avx_vnni")
    assert not [f for f in flags if f.startswith(hidden)]
    assert flags == [f for f in host if not f.startswith(hidden)]  # the rest as the host has it
    assert not kernel_build.amx_tiles()


def test_the_kernels_are_built_for_the_level():
    # CFLAGS are fixed at import (the build's cache key hashes them): a fresh process.
    code = "from carpool.model import kernel_build as k; print(k.CFLAGS[1])"
    host = {k: v for k, v in os.environ.items() if k != kernel_build.ENV_CPU_LEVEL}
    for level, march in ((None, "-march=native"), ("x86-64-v3", "-march=x86-64-v3")):
        env = host if level is None else {**host, kernel_build.ENV_CPU_LEVEL: level}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == [march]
