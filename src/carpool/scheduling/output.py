"""Typed hand-off objects from a scheduling policy to the model runner.

Block tables travel as deltas: a chunk carries only the blocks its request's table gained in
this step (the whole table when the request is admitted or re-admitted), and the receiver keeps
each table (``BlockTables``). So the hand-off costs O(new blocks) per step, not O(context / 16),
and a long stream's steps cost the same as a short one's.
"""

from __future__ import annotations

from collections.abc import Iterable
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
        new_block_ids: the blocks the request's table gained in this step, in table order.
        num_kept_blocks: leading blocks of the table the receiver already holds from earlier
            steps; ``new_block_ids`` follow them. 0 when the table starts over (admission,
            re-admission after a preemption): ``new_block_ids`` is then the whole table.
        needs_sample: True iff after this chunk every known token of the request is computed:
            the runner samples one new token from the logits of the chunk's last position.
            False for a prefill chunk that ends before the last known token.
    """

    request_id: str
    token_ids: list[int]
    start_pos: int
    new_block_ids: list[int]
    num_kept_blocks: int
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
        num_batched_tokens: sum of ``len(chunk.token_ids)`` (padding is the runner's layout
            choice: the engine records the runner's count, ``ModelRunnerOutput``).
        kv_blocks_in_use: KV blocks held after scheduling (for metrics).
        num_idle_seats: seats of a static batch whose request is already done but not yet
            released; a padded layout computes a row of pad tokens for each (ragged: nothing).
    """

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    num_batched_tokens: int = 0
    kv_blocks_in_use: int = 0
    num_idle_seats: int = 0

    @property
    def is_empty(self) -> bool:
        """True when nothing runs this step."""
        return not self.chunks

    @property
    def num_seqs(self) -> int:
        return len(self.chunks)


class BlockTables:
    """The receiving side of the block-table deltas: every scheduled request's whole table.

    The model runner keeps one (and so do the schedulers' test runners). ``apply`` each step's
    output before reading a table; ``drop`` a request once it finished.
    """

    def __init__(self) -> None:
        self._tables: dict[str, list[int]] = {}

    def apply(self, output: SchedulerOutput) -> None:
        """Bring the tables of ``output``'s requests up to date (O(new blocks))."""
        for rid in output.preempted_ids:
            self._tables.pop(rid, None)  # its blocks are gone; re-admission starts over
        for c in output.chunks:
            table = self._tables.setdefault(c.request_id, [])
            kept = c.num_kept_blocks
            # Fewer blocks than the chunk keeps means a step's delta was missed. Applying the
            # same output twice is harmless (the chunk's blocks replace what follows ``kept``),
            # so a batch may be split and its parts run again.
            assert len(table) >= kept, (
                f"request {c.request_id!r}: the receiver holds {len(table)} blocks, the "
                f"chunk keeps {kept}"
            )
            del table[kept:]
            table.extend(c.new_block_ids)

    def __getitem__(self, request_id: str) -> list[int]:
        """The request's current table (the receiver's own list: do not change it)."""
        return self._tables[request_id]

    def tables_of(self, chunks: Iterable[ScheduledChunk]) -> list[list[int]]:
        """The tables of ``chunks``' requests, in chunk order."""
        return [self._tables[c.request_id] for c in chunks]

    def drop(self, request_id: str) -> None:
        """Forget a finished request's table (unknown ids are ignored)."""
        self._tables.pop(request_id, None)
