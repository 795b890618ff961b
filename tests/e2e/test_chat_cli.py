"""``carpool chat`` driven through standard input: streaming, multi-turn, commands."""

from __future__ import annotations

import json
import subprocess
import sys

from carpool import LLM, SamplingParams

TURNS = ["def add(a, b):", "now a class please"]


def _chat(stdin: str, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "carpool.cli", "chat", "--model", "embedded"]
    cmd += ["--temperature", "0", "--max-tokens", "24", "--dtype", "float32", *flags]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300)


def test_multi_turn_answers_equal_the_offline_api():
    proc = _chat("\n".join(TURNS) + "\n/exit\n", "--stats")
    assert proc.returncode == 0, proc.stderr[-3000:]

    # The same conversation through LLM.chat: each turn sees the previous answers.
    llm = LLM("embedded", dtype="float32")
    params = SamplingParams(max_tokens=24, temperature=0)
    messages: list[dict[str, str]] = []
    expected = ""
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        text = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
        messages.append({"role": "assistant", "content": text})
        expected += text + "\n"
    assert proc.stdout == expected
    # One stats line per answer; the second prompt holds the first exchange.
    stats = [line for line in proc.stderr.splitlines() if "prompt tokens" in line]
    assert len(stats) == 2, proc.stderr[-3000:]
    first, second = (int(s.split()[0].lstrip("[")) for s in stats)
    assert second > first


def test_clear_forgets_the_conversation():
    once = _chat(TURNS[1] + "\n")
    cleared = _chat(f"{TURNS[0]}\n/clear\n{TURNS[1]}\n")
    assert once.returncode == 0 and cleared.returncode == 0, cleared.stderr[-3000:]
    # After /clear the second answer is what the message alone gets.
    assert cleared.stdout.endswith(once.stdout)


def test_model_without_chat_template_is_a_clear_error(tmp_path):
    from helpers.hf_models import save_tiny_model_dir

    save_tiny_model_dir("llama", tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    proc = subprocess.run(
        [sys.executable, "-m", "carpool.cli", "chat", "--model", str(tmp_path)],
        input="hello\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "no chat template" in proc.stderr
