"""The lower items of issue 15 (item 7) that the request path owns.

- ``""`` and ``["a", ""]`` were accepted as prompts though the engine API refuses ``""``.
- One request with 20,000 unknown keys appended 329 KB to the log (every key name logged).
- The latency histograms counted completions while the success counter counted prompts, so
  they disagreed for n > 1.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from helpers.hf_models import tiny_llama_dir
from helpers.inproc_server import InProcessServer
from helpers.metrics import scrape

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[InProcessServer]:
    s = InProcessServer(tiny_llama_dir(tmp_path_factory, "lower", MODEL))
    yield s
    s.stop()


def post(srv: InProcessServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{srv.base_url}{path}", json={"model": MODEL} | body, timeout=60)


# ---- empty prompts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "where"),
    [("", "prompt:"), (["a", ""], "prompt[1]:"), (["", "b"], "prompt[0]:")],
)
@pytest.mark.parametrize("stream", [False, True])
def test_empty_prompt_is_a_400_naming_prompt(server, prompt, where, stream) -> None:
    r = post(server, "/completions", {"prompt": prompt, "max_tokens": 2, "stream": stream})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "prompt" and err["type"] == "invalid_request_error", err
    assert err["message"].startswith(where) and "empty" in err["message"], err
    assert server.stats()["num_unfinished"] == 0


def test_empty_token_prompt_is_a_400_too(server) -> None:
    r = post(server, "/completions", {"prompt": [[1, 2], []], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[1]", r.text


def test_one_space_is_a_prompt(server) -> None:
    r = post(server, "/completions", {"prompt": [" ", "a"], "max_tokens": 2})
    assert r.status_code == 200, r.text


# ---- unknown keys in the log -----------------------------------------------------------------


def test_twenty_thousand_unknown_keys_log_a_count_and_a_few_names(server, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="carpool.server")
    junk = {f"junk_key_{i:05d}": i for i in range(20_000)}
    r = post(server, "/completions", {"prompt": "hi", "max_tokens": 2} | junk)
    assert r.status_code == 200, r.text
    lines = [rec.getMessage() for rec in caplog.records if "unknown" in rec.getMessage()]
    assert len(lines) == 1, lines[:3]
    line = lines[0]
    assert "20000 unknown fields" in line and "junk_key_00000" in line, line
    assert "junk_key_00005" not in line  # only the first few names
    assert len(line) < 500, f"{len(line)} chars logged"


def test_a_huge_unknown_key_is_cut(server, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="carpool.server")
    name = "k" * 100_000
    r = post(server, "/completions", {"prompt": "hi", "max_tokens": 2, name: 1})
    assert r.status_code == 200, r.text
    lines = [rec.getMessage() for rec in caplog.records if "unknown" in rec.getMessage()]
    assert len(lines) == 1 and "1 unknown field:" in lines[0], lines
    assert "(100000 chars)" in lines[0] and len(lines[0]) < 300, lines[0][:300]


def test_few_unknown_keys_are_all_named(server, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="carpool.server")
    r = post(server, "/completions", {"prompt": "hi", "max_tokens": 2, "frob": 1, "nicate": 2})
    assert r.status_code == 200, r.text
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "2 unknown fields: frob, nicate" in text, text


# ---- metrics for n > 1 -----------------------------------------------------------------------


def successes(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("carpool:request_success_total"))


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metric_counts_agree_for_n_above_one(server) -> None:
    server.wait_idle()
    m0 = scrape(server.url)
    prompt_tokens = completion_tokens = 0
    for body in (
        {"prompt": ["a b", "c d e"], "n": 3, "max_tokens": 4, "ignore_eos": True},
        {"prompt": "x", "n": 1, "max_tokens": 3, "ignore_eos": True},
    ):
        r = post(server, "/completions", body | {"temperature": 0.8, "seed": 1})
        assert r.status_code == 200, r.text
        prompt_tokens += r.json()["usage"]["prompt_tokens"]
        completion_tokens += r.json()["usage"]["completion_tokens"]
    server.wait_idle()
    m = scrape(server.url)
    completions = 2 * 3 + 1
    ok = successes(m) - successes(m0)
    assert ok == completions
    for hist in (
        "e2e_request_latency_seconds",
        "time_to_first_token_seconds",
        "request_queue_time_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
    ):
        got = delta(m, m0, f"carpool:{hist}_count")
        assert got == completions, f"{hist}: {got} observations for {completions} completions"
    assert delta(m, m0, "carpool:request_generation_tokens_sum") == completion_tokens
    # Tokens are counted as usage bills them: each prompt once, whatever its n.
    assert delta(m, m0, "carpool:prompt_tokens_total") == prompt_tokens
    assert delta(m, m0, "carpool:generation_tokens_total") == completion_tokens


def test_a_timed_out_n_request_counts_each_completion_as_timeout(server) -> None:
    server.wait_idle()
    m0 = scrape(server.url)
    body = {"prompt": "x y", "n": 2, "max_tokens": 900, "ignore_eos": True, "timeout": 0.05}
    r = post(server, "/completions", body)
    assert r.status_code == 504, r.text
    server.wait_idle()
    m = scrape(server.url)
    timeout_key = "carpool:request_success_total[('finished_reason', 'timeout')]"
    assert delta(m, m0, timeout_key) == 2
    assert delta(m, m0, "carpool:e2e_request_latency_seconds_count") == 2


def test_help_text_says_what_counts(server) -> None:
    text = httpx.get(f"{server.url}/metrics").text
    help_lines = {line.split()[2]: line for line in text.splitlines() if line.startswith("# HELP")}
    assert (
        "each of a prompt's n completions counts as one"
        in help_lines["carpool:request_success_total"]
    )
    assert "per completion" in help_lines["carpool:e2e_request_latency_seconds"]
    assert "each prompt once" in help_lines["carpool:prompt_tokens_total"]
