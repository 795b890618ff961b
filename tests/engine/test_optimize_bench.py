"""``carpool optimize`` and the batch-size sweep ``carpool bench`` on a tiny model."""

from __future__ import annotations

import json
import math

import torch

from carpool.bench.optimize import engine_trial, is_out_of_memory
from carpool.bench.sweep import SweepRow
from carpool.bench.sweep_report import COLUMNS
from carpool.capacity import activation_bytes, kv_cache_bytes_for, read_model_config, weight_bytes
from carpool.capacity.fit import BatchFitter, Probe, largest_fitting_batch, sweep_sizes, sweet_spot
from carpool.cli import main
from carpool.config import EngineConfig
from carpool.engine.llm_engine import LLMEngine

SEQ_LEN = 48


def _budget_for(model_dir, batch: int) -> int:
    """A budget that holds exactly ``batch`` sequences of SEQ_LEN tokens by estimate (fp32)."""
    c = read_model_config(model_dir)
    return (
        weight_bytes(c, 4)
        + activation_bytes(c, batch, SEQ_LEN, 4)
        + kv_cache_bytes_for(c, batch, SEQ_LEN, 4)
        + 100  # less than one block more
    )


def test_optimize_finds_a_batch_that_runs_and_one_more_does_not_fit(tiny_llama, tmp_path):
    budget = _budget_for(tiny_llama.path, 3)
    out = tmp_path / "opt.json"
    argv = ["optimize", "--model", str(tiny_llama.path), "--seq-len", str(SEQ_LEN)]
    argv += ["--memory-budget", str(budget), "--gen-len", "4", "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    best = result["largest_batch"]
    assert best == 3 == result["estimated_batch"]
    assert result["memory_at_largest"]["total"] <= budget
    assert [p for p in result["probes"] if p["batch_size"] == best][0]["fits"]
    assert result["next_batch_check"]["fits"] is False
    assert "KV blocks" in result["next_batch_check"]["reason"]
    assert result["sweet_spot"] in (1, 2, 3)
    assert [s["batch_size"] for s in result["sweep"]] == [1, 2, 3]

    # Independently: an engine with the budget's KV cache runs 3 sequences of SEQ_LEN tokens
    # at once, and its blocks cannot hold a fourth.
    c = read_model_config(tiny_llama.path)
    fitter = BatchFitter(
        EngineConfig(model=str(tiny_llama.path)), c, 4, SEQ_LEN, budget, engine_trial
    )
    engine = LLMEngine(fitter.engine_config(best))
    per_seq = math.ceil(SEQ_LEN / 16)
    assert best * per_seq <= engine.num_blocks < (best + 1) * per_seq
    assert not fitter.budget_check(best + 1).fits


def test_largest_fitting_batch_searches_below_a_failing_estimate():
    class Fake(BatchFitter):
        def __init__(self, limit: int) -> None:
            self.limit, self.probes = limit, []

        def fits(self, batch: int) -> Probe:
            p = Probe(batch, batch <= self.limit, 0, 0, "" if batch <= self.limit else "oom")
            self.probes.append(p)
            return p

    assert largest_fitting_batch(Fake(5), 16) == 5
    assert largest_fitting_batch(Fake(16), 16) == 16
    assert largest_fitting_batch(Fake(0), 16) == 0


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_sweet_spot_and_sizes():
    assert sweep_sizes(12) == (1, 2, 4, 8, 12)
    assert sweep_sizes(1) == (1,)
    assert sweet_spot([(1, 100.0), (2, 190.0), (4, 300.0), (8, 320.0), (16, 330.0)]) == 4
    assert sweet_spot([(1, 100.0), (2, 200.0)]) == 2


def test_bench_sweep_writes_json_with_every_column_and_png(tiny_llama, tmp_path, capsys):
    out, png = tmp_path / "batch_analysis.json", tmp_path / "batch_analysis.png"
    argv = ["bench", "--model", str(tiny_llama.path), "--batch-sizes", "1,2,4"]
    argv += ["--requests", "4", "--prompt-len", "8", "--gen-len", "4"]
    argv += ["--output", str(out), "--plot", "--profile", str(tmp_path / "prof")]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    rows = data["results"]
    assert [r["b"] for r in rows] == [1, 2, 4]
    fields = {f.name for f in SweepRow.__dataclass_fields__.values()}
    assert {a for _, a, _ in COLUMNS} <= fields
    for r in rows:
        assert set(r) == fields
        assert r["pp"] == 8 and r["tg"] == 4
        assert r["n_kv"] == r["b"] * 12
        assert r["rounds"] == math.ceil(4 / r["b"])
        assert r["s_tg"] > 0 and r["s_pp"] > 0 and r["gen_tok_s"] > 0
        assert 0 < r["latency_mean_ms"] <= r["latency_p95_ms"] + 1e-9
        assert r["tg_flops_frac"] > 0 and r["tg_bw_frac"] > 0
        assert r["bound"] in ("memory", "compute")
    assert rows[0]["speedup_vs_b1"] == 1.0
    assert data["roofline"]["peak_flops"] > 0 and data["roofline"]["bandwidth"] > 0
    assert png.stat().st_size > 1000
    assert (tmp_path / "prof" / "trace.json").stat().st_size > 0
    table = capsys.readouterr().out
    assert "| PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |" in table


def test_out_of_memory_in_a_real_run_means_does_not_fit(tiny_llama, monkeypatch):
    """A step that runs out of memory above 2 sequences: the search settles on 2 and lives."""
    from carpool.worker.model_runner import ModelRunner

    real_execute = ModelRunner.execute

    def execute(self, output, requests):  # noqa: ANN001, ANN202
        if output.num_seqs > 2:
            raise torch.OutOfMemoryError("CPU out of memory (simulated)")
        return real_execute(self, output, requests)

    monkeypatch.setattr(ModelRunner, "execute", execute)
    c = read_model_config(tiny_llama.path)
    budget = _budget_for(tiny_llama.path, 6)
    fitter = BatchFitter(
        EngineConfig(model=str(tiny_llama.path)), c, 4, SEQ_LEN, budget, engine_trial
    )
    assert largest_fitting_batch(fitter, 6) == 2
    failed = [p for p in fitter.probes if not p.fits]
    assert failed and all("out of memory" in p.reason for p in failed)
