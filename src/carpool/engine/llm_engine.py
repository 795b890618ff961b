"""``LLMEngine``: add requests, step, abort. One step = schedule, execute, update.

The engine glues the stages of ``DESIGN.md`` together and owns what is per request but not the
scheduler's business: the detokenizer (stop strings) and the grouping of ``n`` completions.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch

from carpool.config import EngineConfig, ModelConfig
from carpool.engine.detokenizer import IncrementalDetokenizer
from carpool.errors import InvalidRequestError
from carpool.kv_cache.block_manager import BlockManager
from carpool.kv_cache.sizing import num_blocks_for_budget
from carpool.memory import available_memory_bytes, kv_cache_bytes_for
from carpool.model.loader import load_model
from carpool.outputs import CompletionOutput, RequestOutput
from carpool.request import FinishReason, Request
from carpool.sampling_params import SamplingParams
from carpool.scheduling.base import SchedulingPolicy
from carpool.scheduling.factory import make_policy
from carpool.scheduling.output import SchedulerOutput
from carpool.tokenizer import Tokenizer
from carpool.worker.model_runner import ModelRunner
from carpool.worker.sampler import TokenLogprobs

logger = logging.getLogger("carpool.engine")


def default_model_path() -> Path:
    """The small model shipped inside the package (see docs/default-model.md)."""
    return Path(str(resources.files("carpool") / "data" / "default_model"))


def resolve_model_path(model: str | None) -> Path:
    """``None`` or ``"default"`` mean the embedded model; anything else is a path."""
    if model in (None, "", "default"):
        return default_model_path()
    return Path(model)


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a model directory or GGUF file."""
    if path.is_file():
        return Tokenizer.from_gguf(path)
    return Tokenizer.from_pretrained_dir(path)


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
    """

    start: float
    duration: float
    num_seqs: int
    num_tokens: int
    num_padded_tokens: int
    num_sampled: int
    kv_blocks_in_use: int
    num_idle_seats: int = 0


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


@dataclass
class _Completion:
    """Engine-side state of one of a request's ``n`` completions."""

    request: Request
    detok: IncrementalDetokenizer
    logprobs: list[TokenLogprobs] | None
    sent_tokens: int = 0
    stop_reason: str | int | None = None


@dataclass
class _Group:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    completions: list[_Completion]


class LLMEngine:
    """Serves many requests at once over one model.

    Drive it with ``add_request`` and ``step`` until ``has_unfinished()`` is False; ``abort``
    removes a request at any time. Not thread-safe: one thread calls it (see the async engine
    for concurrent callers).
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.clock = clock
        path = resolve_model_path(config.model)
        torch.manual_seed(config.seed)
        self.model, self.model_config = load_model(path, config.dtype, config.device)
        self.tokenizer = load_tokenizer(path)
        self.model_path = path
        self.eos_token_ids = tuple(
            dict.fromkeys((*self.tokenizer.eos_token_ids, *self.model_config.eos_token_ids))
        )
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_model_len,
            self.model_config.max_model_len,
        )
        self.num_blocks = self._num_kv_blocks(self.model_config)
        self.block_manager = BlockManager(
            self.num_blocks, config.block_size, enable_caching=config.enable_prefix_caching
        )
        self.policy: SchedulingPolicy = self._make_policy()
        self.runner = ModelRunner(
            self.model, self.num_blocks, config.block_size, config.device, layout=config.layout
        )
        self.stats = EngineStats()
        self._groups: dict[str, _Group] = {}
        self._child_to_group: dict[str, tuple[_Group, int]] = {}
        self._ids = itertools.count()
        logger.info(
            "engine ready: model=%s params=%.1fM dtype=%s kv_blocks=%d x %d tokens (%.1f MiB)",
            path,
            self.model_config.num_parameters / 1e6,
            next(self.model.parameters()).dtype,
            self.num_blocks,
            config.block_size,
            self.runner.kv_cache_bytes / 2**20,
        )

    # ---- construction ----------------------------------------------------------------------

    def _kv_dtype_bytes(self) -> int:
        return next(self.model.parameters()).element_size()

    def _num_kv_blocks(self, mc: ModelConfig) -> int:
        c = self.config
        per_token = mc.kv_bytes_per_token_for(self._kv_dtype_bytes())
        if c.kv_cache_memory is not None:
            budget = c.kv_cache_memory
        else:
            # No point holding more than every seat filled to the longest context.
            useful = kv_cache_bytes_for(
                mc, c.max_num_seqs, self.max_model_len, self._kv_dtype_bytes(), c.block_size
            )
            budget = min(int(available_memory_bytes(c.device) * c.kv_cache_memory_fraction), useful)
        return num_blocks_for_budget(budget, per_token, c.block_size)

    def _make_policy(self) -> SchedulingPolicy:
        return make_policy(self.config, self.block_manager, self.max_model_len)

    # ---- requests ---------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
        priority: int | None = None,
    ) -> str:
        """Queue a prompt (text or token ids) for generation.

        ``priority``: lower is served first under ``scheduling_policy="priority"`` (ignored
        under ``fcfs``); overrides ``params.priority`` when given.

        Returns:
            The request id (``request_id`` or a new one).

        Raises:
            InvalidRequestError: empty prompt, token ids out of the vocabulary, prompt +
                max_tokens over the context or the cache, duplicate id. Nothing is queued.
        """
        params = params or SamplingParams()
        if priority is not None:
            params = replace(params, priority=priority)  # validated there
        if isinstance(prompt, str):
            if not prompt:  # "" would still tokenize to a lone BOS on many models
                raise InvalidRequestError("prompt is empty: it must have at least one character")
            text: str | None = prompt
            ids = self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
            vocab = self.model_config.vocab_size
            bad = [
                t
                for t in ids
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab
            ]
            if bad:
                raise InvalidRequestError(
                    f"prompt token ids must be ints in [0, {vocab}), got {bad[:5]}"
                )
        if not ids:
            raise InvalidRequestError("prompt is empty: it must have at least one token")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._groups:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        now = self.clock() if arrival_time is None else arrival_time
        completions: list[_Completion] = []
        try:
            for i in range(params.n):
                child_params = params
                if params.n > 1:
                    seed = None if params.seed is None else params.seed + i
                    child_params = replace(params, n=1, seed=seed)
                child_id = rid if params.n == 1 else f"{rid}#{i}"
                req = Request(child_id, ids, child_params, now, self.eos_token_ids)
                self.policy.add_request(req)
                detok = IncrementalDetokenizer(self.tokenizer, child_params.stop, ids)
                completions.append(
                    _Completion(req, detok, [] if params.logprobs is not None else None)
                )
        except InvalidRequestError:
            for c in completions:  # keep the engine unchanged: all n completions or none
                self.policy.finish_request(c.request.request_id, FinishReason.ABORT, now)
            raise
        group = _Group(rid, text, ids, completions)
        self._groups[rid] = group
        for i, c in enumerate(completions):
            self._child_to_group[c.request.request_id] = (group, i)
        return rid

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now (all its completions) and free its KV blocks.

        Returns:
            Its final output, or None if the id is unknown or already finished.
        """
        group = self._groups.get(request_id)
        if group is None:
            return None
        now = self.clock()
        for c in group.completions:
            if not c.request.is_finished:
                self.policy.finish_request(c.request.request_id, FinishReason.ABORT, now)
            self.runner.release(c.request.request_id)
        return self._collect(group)

    def next_wake_time(self) -> float | None:
        """Engine-clock time at which ``step`` may have work with no new arrival (see
        ``SchedulingPolicy.wake_time``); None when only new requests can create work."""
        return self.policy.wake_time()

    def has_unfinished(self) -> bool:
        """True while any request is waiting or running."""
        return bool(self._groups)

    @property
    def num_requests(self) -> int:
        return len(self._groups)

    # ---- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one forward pass and return the outputs of every request that progressed."""
        start = self.clock()
        sched = self.policy.schedule(start)
        if sched.is_empty:  # an abort may have completed a static batch: report its release
            return self._report_released(self.policy.take_released(start), {})
        touched: dict[str, _Group] = {}
        try:
            requests = {c.request_id: self.policy.get_request(c.request_id) for c in sched.chunks}
            result = self.runner.execute(sched, requests)
        except Exception as e:  # the model failed: fail this batch's requests, keep serving
            logger.exception(
                "engine step failed; failing the %d requests of the batch", len(sched.chunks)
            )
            now = self.clock()
            for chunk in sched.chunks:
                self.policy.finish_request(
                    chunk.request_id, FinishReason.ERROR, now, error=f"engine step failed: {e}"
                )
                group, _ = self._child_to_group[chunk.request_id]
                touched[group.request_id] = group
            return [self._collect(g) for g in touched.values()]
        now = self.clock()
        finished = self.policy.update_from_output(sched, result.sampled, now)
        for rid, token in result.sampled.items():
            group, index = self._child_to_group[rid]
            comp = group.completions[index]
            touched[group.request_id] = group
            comp.detok.add_token(token)
            if comp.logprobs is not None and rid in result.logprobs:
                comp.logprobs.append(result.logprobs[rid])
            sp = comp.request.sampling_params
            if token in sp.stop_token_ids and comp.request.num_output_tokens >= sp.min_tokens:
                comp.stop_reason = token  # it stopped here (a static batch may hold it a while)
            elif not comp.request.is_finished and comp.detok.stopped_by is not None:
                comp.stop_reason = comp.detok.stopped_by
                self.policy.finish_request(rid, FinishReason.STOP, now)
        # Held results (a static batch) may be released now, though they sampled nothing now.
        finished += self.policy.take_released(now)
        self._record(sched, start, now, len(result.sampled), result.num_padded_tokens)
        return self._report_released(finished, touched)

    def _report_released(
        self, finished: list[Request], touched: dict[str, _Group]
    ) -> list[RequestOutput]:
        """Outputs of the ``touched`` groups plus those of the requests the policy released."""
        for req in finished:
            self.runner.release(req.request_id)
            entry = self._child_to_group.get(req.request_id)
            if entry is not None:
                touched[entry[0].request_id] = entry[0]
        return [self._collect(g) for g in touched.values()]

    def _record(
        self,
        sched: SchedulerOutput,
        start: float,
        now: float,
        num_sampled: int,
        num_padded: int = 0,
    ) -> None:
        s = self.stats
        s.steps += 1
        s.scheduled_seqs += sched.num_seqs
        s.generated_tokens += num_sampled
        # Prompt tokens computed this step (recomputation after preemption included).
        s.prompt_tokens += sum(
            max(0, min(c.end_pos, len(self._prompt_of(c.request_id))) - c.start_pos)
            for c in sched.chunks
        )
        s.records.append(
            StepRecord(
                start,
                now - start,
                sched.num_seqs,
                sched.num_batched_tokens,
                num_padded,
                num_sampled,
                sched.kv_blocks_in_use,
                sched.num_idle_seats,
            )
        )

    def _prompt_of(self, child_id: str) -> list[int]:
        group, _ = self._child_to_group[child_id]
        return group.prompt_token_ids

    def _collect(self, group: _Group) -> RequestOutput:
        """Build the group's output; forget the group once every completion is finished."""
        outs = []
        for i, c in enumerate(group.completions):
            req = c.request
            if req.is_finished:
                c.detok.flush()
            ids = req.output_token_ids
            outs.append(
                CompletionOutput(
                    index=i,
                    text=c.detok.text,
                    token_ids=list(ids),
                    finish_reason=req.finish_reason.value if req.finish_reason else None,
                    stop_reason=c.stop_reason,
                    logprobs=list(c.logprobs) if c.logprobs is not None else None,
                    delta_text=c.detok.delta(final=req.is_finished),
                    delta_token_ids=list(ids[c.sent_tokens :]),
                    error=req.error,
                )
            )
            c.sent_tokens = len(ids)
        done = all(c.request.is_finished for c in group.completions)
        if done:
            del self._groups[group.request_id]
            for c in group.completions:
                self._child_to_group.pop(c.request.request_id, None)
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=outs,
            finished=done,
            timings=[c.request.timings() for c in group.completions],
            num_cached_tokens=min(c.request.num_cached_tokens or 0 for c in group.completions),
        )
