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

# Recorded output of `llama-batched-bench -m small-Q8_0.gguf -nr -t 1 -tb 1 -c 768 -b 2048
# -ub 512 -npp 32 -ntg 64 -npl 1,1,8 --output-format jsonl` (llama.cpp of llama-cpp-python
# 0.3.36 on this machine), stdout and stderr together as run.py reads them.
SAMPLE = """\
0.00.101.722 W load: control-looking token:      2 '</s>' was not control-type; this is \
probably a bug in the model. its type will be overridden
0.00.124.068 W llama_context: n_ctx is not divisible by n_seq_max - rounding down to 2048
{"n_kv_max": 2048, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, \
"n_gpu_layers": -1, "n_threads": 1, "n_threads_batch": 1, "pp": 32, "tg": 64, "pl": 1, \
"n_kv": 96, "t_pp": 0.123787, "speed_pp": 258.508575, "t_tg": 0.886057, \
"speed_tg": 72.230118, "t": 1.009844, "speed": 95.064178}
{"n_kv_max": 2048, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, \
"n_gpu_layers": -1, "n_threads": 1, "n_threads_batch": 1, "pp": 32, "tg": 64, "pl": 1, \
"n_kv": 96, "t_pp": 0.115384, "speed_pp": 277.334808, "t_tg": 0.762932, \
"speed_tg": 83.886902, "t": 0.878316, "speed": 109.300072}
{"n_kv_max": 2048, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, \
"n_gpu_layers": -1, "n_threads": 1, "n_threads_batch": 1, "pp": 32, "tg": 64, "pl": 8, \
"n_kv": 768, "t_pp": 0.717424, "speed_pp": 356.832245, "t_tg": 3.577467, \
"speed_tg": 143.118027, "t": 4.294891, "speed": 178.817123}
"""


def test_parse_reads_every_result_row_and_skips_logs() -> None:
    rows = bb.parse_batched_bench(SAMPLE)
    assert [r.pl for r in rows] == [1, 1, 8]
    assert [(r.pp, r.tg) for r in rows] == [(32, 64)] * 3
    assert rows[2].speed_tg == pytest.approx(143.118027)
    assert rows[2].t_tg == pytest.approx(3.577467)
    assert rows[0].speed_pp == pytest.approx(258.508575)
    assert (rows[0].n_threads, rows[0].n_threads_batch, rows[0].flash_attn) == (1, 1, -1)


def test_parse_without_result_rows_is_an_error() -> None:
    log_only = "\n".join(ln for ln in SAMPLE.splitlines() if not ln.startswith(("{", '"')))
    with pytest.raises(ValueError, match="no llama-batched-bench result rows"):
        bb.parse_batched_bench(log_only)


def test_decode_speeds_drop_the_warm_up_shape() -> None:
    speeds = bb.decode_speeds(bb.parse_batched_bench(SAMPLE), [1, 8])
    assert speeds == {1: pytest.approx(83.886902), 8: pytest.approx(143.118027)}
    with pytest.raises(ValueError, match="expected"):
        bb.decode_speeds(bb.parse_batched_bench(SAMPLE), [1, 4])


def test_prefill_speeds_are_speed_pp_without_the_warm_up_shape() -> None:
    speeds = bb.prefill_speeds(bb.parse_batched_bench(SAMPLE), [1, 8])
    assert speeds == {1: pytest.approx(277.334808), 8: pytest.approx(356.832245)}
    with pytest.raises(ValueError, match="expected"):
        bb.prefill_speeds(bb.parse_batched_bench(SAMPLE), [8])


def test_carpool_speeds_split_a_rounds_steps_into_prefill_and_decode() -> None:
    from carpool.engine.stats import StepRecord

    py_peer = _load("py_peer")

    def step(duration: float, seqs: int, tokens: int, prefill: int) -> StepRecord:
        return StepRecord(0.0, duration, seqs, tokens, 0, seqs, 0, num_prefill_tokens=prefill)

    # 32 prompts of 32 tokens, 3 new tokens each: two 512-token prefill steps (the first 16
    # sequences' first decode tokens riding in the second), then two pure decode steps.
    records = [
        step(0.25, 16, 512, 512),
        step(0.30, 32, 528, 512),
        step(0.04, 32, 32, 0),
        step(0.06, 32, 32, 0),
    ]
    decode, prefill = py_peer.carpool_speeds(records, 1024, 3)
    assert decode == pytest.approx(64 / 0.10)
    assert prefill == pytest.approx(1024 / 0.55)
    with pytest.raises(AssertionError):  # a prompt token missing from the prefill steps
        py_peer.carpool_speeds(records, 1056, 3)
    with pytest.raises(AssertionError):  # a decode step missing
        py_peer.carpool_speeds(records, 1024, 4)


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
    assert "-pps" not in cmd and "-nr" not in cmd
    assert (
        bb.batched_bench_command(Path("b"), Path("m"), [1], 32, 64, 2, no_repack=True)[-1] == "-nr"
    )


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
    assert "Prefill" not in text  # runs before prefill was recorded: no such table

    results[0]["carpool"]["prefill_runs"] = [{1: 1200.0, 8: 1500.0}, {1: 1000.0, 8: 1700.0}]
    results[0]["llama.cpp"]["prefill_runs"] = [{"1": 500.0, "8": 2000.0}]
    text = report.render(meta, results)
    prefill = text[text.index("Prefill tokens/s") :]
    # medians: carpool 1,100 / 1,600, llama.cpp 500 / 2,000; transformers recorded none
    assert "| small | Q8_0 (carpool bfloat16) | 1 | 1,100 | 500 | 2.20 | - | - |" in prefill
    assert "| small | Q8_0 (carpool bfloat16) | 8 | 1,600 | 2,000 | 0.80 | - | - |" in prefill
    assert "| small | Q8_0 (carpool bfloat16) | 8 | 400 | 800 | 0.50 | 205 | 1.95 |" not in prefill


def test_repeats_are_interleaved_across_systems() -> None:
    run = _load("run")
    order: list[str] = []

    class Fake:
        def __init__(self, name: str, speed: float) -> None:
            self.name, self.speed, self.runs = name, speed, []

        def run(self) -> None:
            order.append(self.name)
            self.runs.append({1: self.speed + len(self.runs)})

        def result(self) -> dict[str, object]:
            return {"runs": self.runs}

    out = run.interleaved({"llama.cpp": Fake("l", 10.0), "carpool": Fake("c", 20.0)}, 3)
    # each repeat of one system is followed by one of the other: a slow minute hits both
    assert order == ["l", "c", "l", "c", "l", "c"]
    assert out["carpool"]["runs"] == [{1: 20.0}, {1: 21.0}, {1: 22.0}]
    assert out["llama.cpp"]["runs"] == [{1: 10.0}, {1: 11.0}, {1: 12.0}]


def test_serving_peers_commands_share_the_file_and_the_threads() -> None:
    sp = _load("serve_peers")
    gguf = Path("/m/SmolLM2.Q4_1.gguf")
    ll = sp.llama_server_command(Path("/b/llama-server"), gguf, 8123, 2, 16, 16384, False)
    assert ll == ["/b/llama-server", "-m", str(gguf), "--host", "127.0.0.1", "--port", "8123",
                  "-t", "2", "-tb", "2", "-np", "16", "-c", "16384"]  # fmt: skip
    assert sp.llama_server_command(Path("/b/s"), gguf, 1, 2, 16, 64, True)[-1] == "-nr"
    cp = sp.carpool_server_command(gguf, 8124, 2)
    assert cp[1:] == ["-m", "carpool.cli", "serve", "--model", str(gguf), "--port", "8124",
                      "--threads", "2"]  # fmt: skip


def test_serving_peers_table_takes_medians_and_ratios_in_carpools_favour() -> None:
    sp = _load("serve_peers")

    def run(duration: float, tps: float, tpot: float, rss: float) -> dict:
        ms = {"p50": tpot}
        return {"duration_s": duration, "output_throughput": tps, "ttft_ms": ms, "tpot_ms": ms,
                "itl_ms": ms, "e2el_ms": ms, "peak_rss_mib": rss}  # fmt: skip

    table = sp.table(
        {
            "carpool": [run(10, 500, 20, 600), run(12, 400, 30, 600), run(11, 450, 25, 600)],
            "llama.cpp": [run(44, 100, 100, 300), run(40, 110, 90, 300)],
        }
    )
    assert "| duration s | 11.0 | 42.0 | 3.82x |" in table
    assert "| output tokens/s | 450.0 | 105.0 | 4.29x |" in table
    assert "| TPOT p50 ms | 25.0 | 95.0 | 3.80x |" in table
    assert "| peak RSS MiB | 600.0 | 300.0 | 0.50x |" in table
