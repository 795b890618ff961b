"""Ray Serve: 2 carpool replicas on a local Ray instance, through the official OpenAI client.

Needs the ``ray`` extra (``make install`` installs it); without Ray the test is skipped with
the reason shown by ``pytest -ra``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import openai
import pytest

from carpool import SamplingParams
from carpool.config import EngineConfig
from carpool.server import ServerConfig

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'carpool[ray]'")
serve = pytest.importorskip("ray.serve")

MODEL = "tiny-llama"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(tiny_dir) -> Iterator[str]:
    from carpool.integrations.ray_serve import build_ray_app

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_ray_app(
            EngineConfig(model=str(tiny_dir), dtype="float32", kv_cache_memory=8 << 20),
            ServerConfig(served_model_name=MODEL),
            num_replicas=2,
            num_cpus=1,
            max_ongoing_requests=16,
            max_queued_requests=64,
        )
        serve.run(app, name="carpool", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
    assert not ray.is_initialized()


@pytest.mark.slow
def test_ray_serve_completions_and_chat(ray_url, reference):
    status = serve.status().applications["carpool"]
    assert status.status == "RUNNING", status
    replicas = status.deployments["carpool"].replica_states
    assert replicas.get("RUNNING") == 2, replicas
    assert httpx.get(f"{ray_url}/health", timeout=30).json() == {"status": "ok"}

    client = openai.OpenAI(base_url=f"{ray_url}/v1", api_key="x", max_retries=0, timeout=120)
    prompts = ["Hello there", "The capital of", "def f(x):", "1 2 3"]
    expected = reference.generate(
        prompts, SamplingParams(max_tokens=10, temperature=0), use_tqdm=False
    )
    for prompt, exp in zip(prompts, expected, strict=True):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
        assert r.choices[0].text == exp.outputs[0].text
        assert r.usage.completion_tokens == len(exp.outputs[0].token_ids)

    stream = client.completions.create(
        model=MODEL, prompt=prompts[0], max_tokens=10, temperature=0, stream=True
    )
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text == expected[0].outputs[0].text

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")

    # the same validation and error shape as carpool serve
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=10**6)
