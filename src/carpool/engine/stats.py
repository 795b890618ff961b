"""What the engine measures: one ``StepRecord`` per forward pass, running totals, and the
``EngineSnapshot`` a client reads (safe to hand to any thread or process)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepRecord:
    """What one engine step did (for benchmarks and metrics).

    Attributes:
        start: engine-clock time the step began.
        duration: seconds from schedule to update.
        num_seqs: requests that computed real tokens (the batch size of the step).
        num_tokens: real tokens computed.
        num_padded_tokens: pad token slots the layout computed as well (0 when ragged).
        num_sampled: tokens sampled.
        kv_blocks_in_use: KV blocks held after scheduling.
        num_idle_seats: seats held by done-but-unreleased requests of a static batch.
        num_prefill_tokens: of ``num_tokens``, those in prompt (or recompute) chunks; the
            rest are decode tokens, one per generating request.
        num_preempted: running requests that lost their KV in this step.
    """

    start: float
    duration: float
    num_seqs: int
    num_tokens: int
    num_padded_tokens: int
    num_sampled: int
    kv_blocks_in_use: int
    num_idle_seats: int = 0
    num_prefill_tokens: int = 0
    num_preempted: int = 0


@dataclass
class EngineStats:
    """Totals since the engine started."""

    steps: int = 0
    scheduled_seqs: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    records: deque[StepRecord] = field(default_factory=lambda: deque(maxlen=100_000))

    @property
    def mean_batch_size(self) -> float:
        """Mean number of sequences per forward pass."""
        return self.scheduled_seqs / self.steps if self.steps else 0.0

    def add(self, record: StepRecord, prompt_tokens: int) -> None:
        """Count one forward pass."""
        self.steps += 1
        self.scheduled_seqs += record.num_seqs
        self.generated_tokens += record.num_sampled
        self.prompt_tokens += prompt_tokens
        self.records.append(record)


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state after the latest loop iteration (safe to read from any thread).

    Attributes:
        num_running: requests holding a seat in the batch.
        num_waiting: requests queued in the scheduler plus those still in the inbox.
        num_free_blocks, num_blocks: KV cache blocks free and in total.
        kv_cache_usage: fraction of KV blocks in use, in [0, 1].
        num_unfinished: requests the engine still holds (any state).
        steps: forward passes so far.
        mean_batch_size: mean sequences per forward pass.
        num_preemptions: running requests that lost their KV so far.
        prompt_tokens, generation_tokens: tokens computed / generated so far.
        prefix_cache_queries, prefix_cache_hits: prompt tokens looked up in the prefix cache at
            admission, and of those the tokens found cached (their prefill skipped).
        num_preemptions_kv_cache, num_preemptions_priority: ``num_preemptions`` by cause.
    """

    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    kv_cache_usage: float = 0.0
    num_unfinished: int = 0
    steps: int = 0
    mean_batch_size: float = 0.0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions_kv_cache: int = 0
    num_preemptions_priority: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """prefix_cache_hits / prefix_cache_queries (0.0 before any query)."""
        q = self.prefix_cache_queries
        return self.prefix_cache_hits / q if q else 0.0

    @classmethod
    def total(cls, parts: list[EngineSnapshot]) -> EngineSnapshot:
        """Several engines' snapshots added up (a replica pool's view)."""
        blocks = sum(x.num_blocks for x in parts)
        free = sum(x.num_free_blocks for x in parts)
        steps = sum(x.steps for x in parts)
        return cls(
            num_running=sum(x.num_running for x in parts),
            num_waiting=sum(x.num_waiting for x in parts),
            num_free_blocks=free,
            num_blocks=blocks,
            kv_cache_usage=(blocks - free) / blocks if blocks else 0.0,
            num_unfinished=sum(x.num_unfinished for x in parts),
            steps=steps,
            mean_batch_size=(
                sum(x.mean_batch_size * x.steps for x in parts) / steps if steps else 0.0
            ),
            num_preemptions=sum(x.num_preemptions for x in parts),
            prompt_tokens=sum(x.prompt_tokens for x in parts),
            generation_tokens=sum(x.generation_tokens for x in parts),
            prefix_cache_queries=sum(x.prefix_cache_queries for x in parts),
            prefix_cache_hits=sum(x.prefix_cache_hits for x in parts),
            num_preemptions_kv_cache=sum(x.num_preemptions_kv_cache for x in parts),
            num_preemptions_priority=sum(x.num_preemptions_priority for x in parts),
        )
