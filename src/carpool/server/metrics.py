"""Prometheus metrics of one server, named like vLLM's with a ``carpool:`` prefix.

Each app owns a ``CollectorRegistry`` (never the global one), so several servers can live in one
process (tests). The engine thread feeds the metrics through the ``EngineObserver`` hooks;
prometheus-client's metric objects are thread-safe.

What counts as one "request": each *completion* (sequence). A prompt sent with ``n=4`` is four
requests to ``request_success`` and four observations in every per-request histogram (e2e,
queue time, TTFT, prompt and generation tokens), as in vLLM, which runs the ``n`` samples as
child requests; so ``e2e_request_latency_seconds_count`` equals the sum of
``request_success_total``. Token counters are the exception: ``prompt_tokens`` counts each
prompt's tokens once (what ``usage.prompt_tokens`` bills), ``generation_tokens`` every
generated token.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from carpool.engine.stats import EngineSnapshot, StepRecord
from carpool.outputs import RequestOutput

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_REQUEST_BUCKETS = (
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FINISH_REASONS = ("stop", "length", "abort", "error", "timeout")


class ServerMetrics:
    """The server's Prometheus metrics; also an ``EngineObserver`` for the engine thread.

    Args:
        model_name: the served model name (the ``model_name`` label, as vLLM does).
    """

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, ["model_name"]
        self.model_name = model_name

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.num_requests_running = gauge(
            "carpool:num_requests_running", "Requests in the running batch."
        )
        self.num_requests_waiting = gauge(
            "carpool:num_requests_waiting", "Requests waiting to be scheduled."
        )
        self.kv_cache_usage_perc = gauge(
            "carpool:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full)."
        )
        self.num_free_kv_blocks = gauge("carpool:num_free_kv_blocks", "Free KV cache blocks.")
        self.prompt_tokens = counter(
            "carpool:prompt_tokens",
            "Prompt tokens of finished requests, each prompt once whatever its n (= usage).",
        )
        self.generation_tokens = counter("carpool:generation_tokens", "Generated tokens.")
        self.num_preemptions = counter(
            "carpool:num_preemptions", "Running requests that lost their KV (recomputed later)."
        )
        self._preemptions_by_cause = Counter(
            "carpool:num_preemptions_by_cause",
            "Preemptions by cause: kv_cache (out of blocks) or priority (a better request).",
            ["model_name", "cause"],
            registry=r,
        )
        self.prefix_cache_queries = counter(
            "carpool:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (at each admission).",
        )
        self.prefix_cache_hits = counter(
            "carpool:prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed)."
        )
        self._success = Counter(
            "carpool:request_success",
            "Finished requests by reason; each of a prompt's n completions counts as one.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.request_success = {
            reason: self._success.labels(model_name, reason) for reason in FINISH_REASONS
        }
        self.rejected = counter(
            "carpool:num_requests_rejected", "Requests refused with 429 because the queue was full."
        )
        self.ttft = histogram(
            "carpool:time_to_first_token_seconds",
            "Time to first token, per completion that produced one.",
            _LATENCY_BUCKETS,
        )
        self.itl = histogram(
            "carpool:inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            _LATENCY_BUCKETS,
        )
        self.e2e = histogram(
            "carpool:e2e_request_latency_seconds",
            "Arrival to finish, per completion (count = sum of request_success).",
            _REQUEST_BUCKETS,
        )
        self.queue_time = histogram(
            "carpool:request_queue_time_seconds",
            "Arrival to first scheduled, per completion that was scheduled.",
            _REQUEST_BUCKETS,
        )
        self.prompt_tokens_per_request = histogram(
            "carpool:request_prompt_tokens",
            "Prompt tokens, per completion (count = sum of request_success).",
            _TOKEN_BUCKETS,
        )
        self.generation_tokens_per_request = histogram(
            "carpool:request_generation_tokens",
            "Generated tokens, per completion (count = sum of request_success).",
            _TOKEN_BUCKETS,
        )
        self.iteration_tokens = histogram(
            "carpool:iteration_tokens_total", "Tokens per engine step.", _TOKEN_BUCKETS
        )
        self.iteration_batch_size = histogram(
            "carpool:iteration_batch_size", "Sequences per engine step.", _BATCH_BUCKETS
        )
        self._preemptions_seen = 0
        # Counters fed from the snapshot's running totals: the totals already published.
        self._totals_seen: dict[str, int] = {}

    # ---- EngineObserver ---------------------------------------------------------------------

    def on_step(
        self, record: StepRecord | None, snapshot: EngineSnapshot, outputs: Sequence[RequestOutput]
    ) -> None:
        """Gauges from the snapshot; per-step histograms and token counters."""
        self.num_requests_running.set(snapshot.num_running)
        self.num_requests_waiting.set(snapshot.num_waiting)
        self.kv_cache_usage_perc.set(snapshot.kv_cache_usage)
        self.num_free_kv_blocks.set(snapshot.num_free_blocks)
        if snapshot.num_preemptions > self._preemptions_seen:
            self.num_preemptions.inc(snapshot.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = snapshot.num_preemptions
        for name, total, counter_ in (
            ("queries", snapshot.prefix_cache_queries, self.prefix_cache_queries),
            ("hits", snapshot.prefix_cache_hits, self.prefix_cache_hits),
            (
                "kv_cache",
                snapshot.num_preemptions_kv_cache,
                self._preemptions_by_cause.labels(self.model_name, "kv_cache"),
            ),
            (
                "priority",
                snapshot.num_preemptions_priority,
                self._preemptions_by_cause.labels(self.model_name, "priority"),
            ),
        ):
            seen = self._totals_seen.get(name, 0)
            if total > seen:
                counter_.inc(total - seen)
                self._totals_seen[name] = total
        if record is not None:
            self.iteration_tokens.observe(record.num_tokens)
            self.iteration_batch_size.observe(record.num_seqs)
        new_tokens = sum(len(c.delta_token_ids) for out in outputs for c in out.outputs)
        if new_tokens:
            self.generation_tokens.inc(new_tokens)

    def on_request_finished(self, output: RequestOutput, reason: str) -> None:
        """Per-completion counters and histograms; the prompt's tokens once.

        ``reason`` is the request's (its completions' worst, or ``timeout``); each completion
        is counted with its own finish reason, except that a completion the deadline aborted
        counts as ``timeout``.
        """
        prompt_len = len(output.prompt_token_ids)
        self.prompt_tokens.inc(prompt_len)
        for i, c in enumerate(output.outputs):
            own = c.finish_reason or "abort"
            if reason == "timeout" and own == "abort":
                own = "timeout"
            self.request_success[own if own in self.request_success else "error"].inc()
            self.prompt_tokens_per_request.observe(prompt_len)
            self.generation_tokens_per_request.observe(c.num_tokens or len(c.token_ids))
            t = output.timings[i] if i < len(output.timings) else None
            if t is None:
                continue
            if t.ttft is not None:
                self.ttft.observe(t.ttft)
            for gap in t.inter_token_gaps:
                self.itl.observe(gap)
            if t.e2e is not None:
                self.e2e.observe(t.e2e)
            if t.queue_wait is not None:
                self.queue_time.observe(t.queue_wait)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
