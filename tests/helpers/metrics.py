"""Reading a server's Prometheus ``/metrics`` in tests."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str, model_name: str | None = None) -> dict[str, float]:
    """Sample name (+ labels other than model_name, sorted) -> value, from ``{url}/metrics``.

    With ``model_name``, also asserts every sample that carries the label names that model.
    """
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k != "model_name"}
            if model_name is not None and "model_name" in s.labels:
                assert s.labels["model_name"] == model_name
            out[s.name + ("" if not labels else str(sorted(labels.items())))] = s.value
    return out
