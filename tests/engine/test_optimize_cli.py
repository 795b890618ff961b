"""``carpool optimize``'s report: where it stopped, rounds per size, the serve flags to use."""

from __future__ import annotations

import json
import shlex

from carpool.capacity import activation_bytes, kv_cache_bytes_for, read_model_config, weight_bytes
from carpool.cli import build_parser, main
from carpool.engine.llm_engine import LLMEngine
from carpool.entrypoints.engine_args import engine_config_from_args

SEQ_LEN = 48


def _budget(model_dir, batch: int) -> int:
    c = read_model_config(model_dir)
    return (
        weight_bytes(c, 4)
        + activation_bytes(c, batch, SEQ_LEN, 4)
        + kv_cache_bytes_for(c, batch, SEQ_LEN, 4)
        + 100
    )


def test_stops_at_max_batch_size_says_so_and_prints_working_serve_flags(
    tiny_llama, tmp_path, capsys
):
    out = tmp_path / "opt.json"
    argv = ["optimize", "--model", str(tiny_llama.path), "--seq-len", str(SEQ_LEN)]
    argv += ["--memory-budget", str(_budget(tiny_llama.path, 6)), "--gen-len", "4"]
    argv += ["--max-batch-size", "2", "--rounds", "2", "--dtype", "float32", "--output", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "stopped at --max-batch-size 2: the memory estimate allows batch 6" in text
    assert "medians of 2 rounds per size" in text
    result = json.loads(out.read_text())
    assert result["largest_batch"] == 2

    # The printed command parses, and its engine serves the chosen batch within the budget.
    line = next(s for s in text.splitlines() if s.startswith("to serve it: "))
    words = shlex.split(line.removeprefix("to serve it: "))
    assert words[:2] == ["carpool", "serve"] and words == shlex.split(result["serve_command"])
    args = build_parser().parse_args(words[1:])
    config = engine_config_from_args(args)
    assert config.max_num_seqs == result["sweet_spot"] and config.max_model_len == SEQ_LEN
    engine = LLMEngine(config)
    assert engine.num_blocks >= config.max_num_seqs * -(-SEQ_LEN // 16)


def test_rounds_must_be_positive(tiny_llama, capsys):
    assert main(["optimize", "--model", str(tiny_llama.path), "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err
