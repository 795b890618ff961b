"""``carpool generate``: the answer apart from the prompt, TTFT/prefill/decode reported apart,
and the --chat hint for an instruct model that stops at once."""

from __future__ import annotations

import re
import subprocess
import sys
from types import SimpleNamespace

from carpool import LLM, SamplingParams
from carpool.entrypoints.generate import instruct_hint


def test_answer_printed_apart_with_separate_speeds():
    prompt = "def add(a, b):"
    proc = subprocess.run(
        [sys.executable, "-m", "carpool.cli", "generate", "--model", "embedded", "--dtype",
         "float32", "-p", prompt, "--max-tokens", "8", "--ignore-eos"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = (
        LLM("embedded", dtype="float32")
        .generate(
            [prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False
        )[0]
        .outputs[0]
        .text
    )
    assert proc.stdout == (
        f"=== [0] prompt: {prompt!r}\n{expected}\n=== [0] 8 tokens, finish: length\n"
    )
    line = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"ttft_median=\d+ms prefill=[\d.]+tok/s decode=[\d.]+tok/s", line), line


def _fake(template: str | None, reasons: list[tuple[str, int]]):
    llm = SimpleNamespace(tokenizer=SimpleNamespace(chat_template=template))
    outs = [
        SimpleNamespace(outputs=[SimpleNamespace(finish_reason=r, token_ids=[0] * n)])
        for r, n in reasons
    ]
    return llm, outs


def test_hint_only_for_a_chat_model_that_stopped_at_once_without_chat():
    llm, outs = _fake("{{ messages }}", [("stop", 1), ("stop", 0)])
    assert "--chat" in instruct_hint(llm, outs, chat=False)
    assert instruct_hint(llm, outs, chat=True) is None
    assert instruct_hint(*_fake(None, [("stop", 1)]), chat=False) is None  # base model
    assert instruct_hint(*_fake("t", [("stop", 1), ("length", 8)]), chat=False) is None
