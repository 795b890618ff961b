"""The pure parts of ``benchmarks/peers``: reading llama-batched-bench output, the command
line it is run with, and the side-by-side table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

PEERS = Path(__file__).resolve().parents[2] / "benchmarks" / "peers"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"peers_{name}", PEERS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bb = _load("batched_bench")
report = _load("report")

# PENDING-RECORD `llama-batched-bench ... -npp 32 -ntg 64 -npl 1,1,8 --output-format jsonl`
# (llama.cpp of llama-cpp-python 0.3.36, 2 threads), log lines included as it prints them.
SAMPLE = """\
llama_model_loader: loaded meta data with 24 key-value pairs and 75 tensors from small-Q8_0.gguf
load_tensors:          CPU model buffer size =    59.93 MiB
llama_context: n_ctx         = 768
{"n_kv_max": 768, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, \
"n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 32, "tg": 64, "pl": 1, \
"n_kv": 96, "t_pp": 0.021370, "speed_pp": 1497.425415, "t_tg": 0.290310, \
"speed_tg": 220.454681, "t": 0.311680, "speed": 308.008209}
{"n_kv_max": 768, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, \
"n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 32, "tg": 64, "pl": 1, \
"n_kv": 96, "t_pp": 0.019872, "speed_pp": 1610.306030, "t_tg": 0.250118, \
"speed_tg": 255.879227, "t": 0.269990, "speed": 355.568726}
{"n_kv_max": 768, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, \
"n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 32, "tg": 64, "pl": 8, \
"n_kv": 768, "t_pp": 0.120547, "speed_pp": 2123.653076, "t_tg": 0.800336, \
"speed_tg": 639.731262, "t": 0.920883, "speed": 833.980469}

llama_perf_context_print:        load time =      45.16 ms
"""


def test_parse_reads_every_result_row_and_skips_logs() -> None:
    rows = bb.parse_batched_bench(SAMPLE)
    assert [r.pl for r in rows] == [1, 1, 8]
    assert [(r.pp, r.tg) for r in rows] == [(32, 64)] * 3
    assert rows[2].speed_tg == pytest.approx(639.731262)
    assert rows[2].t_tg == pytest.approx(0.800336)
    assert rows[0].speed_pp == pytest.approx(1497.425415)
    assert (rows[0].n_threads, rows[0].n_threads_batch, rows[0].flash_attn) == (2, 2, -1)


def test_parse_without_result_rows_is_an_error() -> None:
    log_only = "\n".join(ln for ln in SAMPLE.splitlines() if not ln.startswith(("{", '"')))
    with pytest.raises(ValueError, match="no llama-batched-bench result rows"):
        bb.parse_batched_bench(log_only)


def test_decode_speeds_drop_the_warm_up_shape() -> None:
    speeds = bb.decode_speeds(bb.parse_batched_bench(SAMPLE), [1, 8])
    assert speeds == {1: pytest.approx(255.879227), 8: pytest.approx(639.731262)}
    with pytest.raises(ValueError, match="expected"):
        bb.decode_speeds(bb.parse_batched_bench(SAMPLE), [1, 4])


def test_command_pins_threads_and_holds_every_sequence() -> None:
    cmd = bb.batched_bench_command(
        Path("/b/llama-batched-bench"), Path("m.gguf"), [1, 8, 32], 32, 64, 2
    )
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert cmd[0] == "/b/llama-batched-bench"
    assert flags["-t"] == flags["-tb"] == "2"
    assert flags["-c"] == str(32 * (32 + 64))
    assert flags["-npl"] == "1,1,8,32"
    assert (flags["-npp"], flags["-ntg"], flags["--output-format"]) == ("32", "64", "jsonl")
    assert "-pps" not in cmd


def test_pinned_version_is_read_from_the_build_script() -> None:
    assert bb.llama_cpp_version() == "0.3.36"


def test_report_ratios_are_medians_over_medians() -> None:
    meta = {
        "machine": {"model_name": "CPU X", "amx": ["amx_bf16"], "cpus": 2},
        "threads": 2,
        "prompt_len": 32,
        "gen_len": 64,
        "repeats": 3,
        "load_avg_start": [1.0, 1.0, 1.0],
        "load_avg_end": [2.0, 2.0, 2.0],
        "batch_sizes": [1, 8],
    }
    results = [
        {
            "model": "small",
            "file": "Q8_0",
            "carpool": {
                "dtype": "bfloat16",
                "runs": [{1: 90.0, 8: 400.0}, {1: 100.0, 8: 1.0}, {1: 500.0, 8: 410.0}],
                "rss_mib": 600.0,
            },
            "llama.cpp": {
                "runs": [{"1": 50.0, "8": 800.0}, {"1": 40.0, "8": 820.0}, {"1": 60.0, "8": 1.0}],
                "rss_mib": 200.0,
            },
        },
        {
            "model": "small",
            "file": "hf",
            "transformers": {"runs": [{1: 25.0, 8: 205.0}], "rss_mib": 900.0},
        },
    ]
    text = report.render(meta, results)
    assert "CPU X (amx_bf16), 2 CPUs, 2 threads" in text
    # medians: carpool 100 / 400, llama.cpp 50 / 800, transformers 25 / 205
    assert "| small | Q8_0 (carpool bfloat16) | 1 | 100 | 50.0 | 2.00 | 25.0 | 4.00 |" in text
    assert "| small | Q8_0 (carpool bfloat16) | 8 | 400 | 800 | 0.50 | 205 | 1.95 |" in text
    assert "| small | Q8_0 | 600 | 200 | 3.00 | 900 |" in text
