"""Typed hand-off objects from a scheduling policy to the model runner."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScheduledChunk:
    """The tokens of one request to compute in this step.

    Attributes:
        request_id: which request (the runner looks it up for its sampling parameters).
        token_ids: tokens to feed: a chunk of the prompt (or of prompt + generated tokens when
            recomputing after a preemption), or the one last sampled token in decode.
        start_pos: position of ``token_ids[0]``; equals the request's ``num_computed_tokens``
            before the step, so the chunk covers positions ``[start_pos, end_pos)``.
        block_table: the request's block table, covering at least ``end_pos`` token slots.
        needs_sample: True iff after this chunk every known token of the request is computed:
            the runner samples one new token from the logits of the chunk's last position.
            False for a prefill chunk that ends before the last known token.
    """

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    needs_sample: bool

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_pos(self) -> int:
        """One past the position of the chunk's last token."""
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """What runs in the next forward pass.

    Attributes:
        chunks: one per scheduled request, in the order the policy chose.
        preempted_ids: requests preempted during this step (their KV is gone).
        num_batched_tokens: sum of ``len(chunk.token_ids)``.
        num_padded_tokens: padding slots a padded layout adds (0 for a ragged batch). Policies
            leave it 0: the layout is the runner's choice, so the engine records the runner's
            count (``ModelRunnerOutput.num_padded_tokens``).
        kv_blocks_in_use: KV blocks held after scheduling (for metrics).
        num_idle_seats: seats of a static batch whose request is already done but not yet
            released; a padded layout computes a row of pad tokens for each (ragged: nothing).
    """

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    num_batched_tokens: int = 0
    num_padded_tokens: int = 0
    kv_blocks_in_use: int = 0
    num_idle_seats: int = 0

    @property
    def is_empty(self) -> bool:
        """True when nothing runs this step."""
        return not self.chunks

    @property
    def num_seqs(self) -> int:
        return len(self.chunks)
