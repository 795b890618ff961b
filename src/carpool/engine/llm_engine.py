"""``LLMEngine``: add requests, step, abort. One step = schedule, execute, update.

The engine glues the stages of ``DESIGN.md`` together; what happens to the sampled tokens
afterwards (detokenizer, stop strings, the ``n`` completions, what an output carries) belongs to
the ``OutputProcessor``. ``run_step`` says what the step did (its outputs, and its ``StepRecord``
or None when the model did not run), so no caller counts steps or reads "the last record".
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from carpool.capacity import plan_num_blocks
from carpool.config import EngineConfig
from carpool.engine.limits import ModelLimits
from carpool.engine.loading import LoadStages, resolve_max_model_len, size_rotary_tables
from carpool.engine.model_path import load_tokenizer, resolve_model_path
from carpool.engine.output_processor import OutputProcessor, RequestGroup
from carpool.engine.stats import EngineSnapshot, EngineStats, StepRecord
from carpool.engine.threads import apply_threads, physical_cores
from carpool.errors import InvalidRequestError
from carpool.kv_cache.block_manager import BlockManager
from carpool.model.kv_quant import effective_kv_cache_dtype
from carpool.model.loader import load_model
from carpool.model.quant import QuantizedLinear
from carpool.outputs import RequestOutput
from carpool.request import FinishReason, Request
from carpool.sampling_params import SamplingParams
from carpool.scheduling.base import SchedulingPolicy
from carpool.scheduling.factory import make_policy
from carpool.scheduling.output import SchedulerOutput
from carpool.structured.compiler import compiler_for
from carpool.structured.processor import LogitsProcessor
from carpool.worker.model_runner import ModelRunner

logger = logging.getLogger("carpool.engine")


@dataclass(frozen=True)
class EngineStep:
    """What one ``run_step`` did.

    Attributes:
        outputs: per request that progressed (or was released), its output.
        record: the forward pass's figures; None when the model did not run.
    """

    outputs: list[RequestOutput]
    record: StepRecord | None


class LLMEngine:
    """Serves many requests at once over one model.

    Drive it with ``add_request`` and ``step`` until ``has_unfinished()`` is False; ``abort``
    removes a request at any time. Not thread-safe: one thread calls it (``EngineCore`` and its
    transports serve concurrent callers).
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.clock = clock
        self.threads = apply_threads(config.threads)
        stage = LoadStages(logger)
        path = resolve_model_path(config.model, config.revision, config.gguf_file)
        stage.done("resolve", str(path))
        torch.manual_seed(config.seed)
        self.model, self.model_config = load_model(
            path, config.dtype, config.device, config.quantization
        )
        stage.done(
            "weights",
            f"{self.model_config.num_parameters / 1e6:.1f}M parameters, "
            f"{next(self.model.parameters()).dtype}, {config.device}",
        )
        # "auto" names the cache dtype from here on (capacity, runner, logs): see
        # effective_kv_cache_dtype for why a quantized float32 model stores bfloat16.
        kv_cache_dtype = effective_kv_cache_dtype(
            config.kv_cache_dtype,
            next(self.model.parameters()).dtype,
            any(isinstance(m, QuantizedLinear) for m in self.model.modules()),
        )
        if kv_cache_dtype != config.kv_cache_dtype:
            self.config = config = replace(config, kv_cache_dtype=kv_cache_dtype)
        self.tokenizer = load_tokenizer(path)
        stage.done("tokenizer", f"{self.tokenizer.vocab_size} tokens")
        self.model_path = path
        self.eos_token_ids = tuple(
            dict.fromkeys((*self.tokenizer.eos_token_ids, *self.model_config.eos_token_ids))
        )
        self.max_model_len = resolve_max_model_len(
            config.max_model_len, self.model_config.max_model_len, config.allow_long_max_model_len
        )
        size_rotary_tables(self.model, self.max_model_len)
        dtype_bytes = next(self.model.parameters()).element_size()
        self.num_blocks = plan_num_blocks(
            config, self.model_config, self.max_model_len, dtype_bytes
        )
        self.block_manager = BlockManager(
            self.num_blocks, config.block_size, enable_caching=config.enable_prefix_caching
        )
        self.policy: SchedulingPolicy = make_policy(config, self.block_manager, self.max_model_len)
        vocab = self.model_config.vocab_size
        self.logits_processor = LogitsProcessor(
            lambda: compiler_for(self.tokenizer, vocab), self.eos_token_ids
        )
        self.runner = ModelRunner(
            self.model,
            self.num_blocks,
            config.block_size,
            config.device,
            kv_dtype=config.kv_cache_dtype,
            layout=config.layout,
            logits_processor=self.logits_processor,
        )
        self.limits = ModelLimits(
            model=str(path),
            max_model_len=self.max_model_len,
            vocab_size=self.model_config.vocab_size,
            num_blocks=self.num_blocks,
            block_size=config.block_size,
        )
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids)
        self.stats = EngineStats()
        self._ids = itertools.count()
        stage.done("KV cache", f"{self.num_blocks} blocks of {config.block_size} tokens")
        logger.info(
            "engine ready in %.1fs: model=%s params=%.1fM dtype=%s kv_blocks=%d x %d tokens "
            "(%.1f MiB, %s) max_model_len=%d threads=%d",
            stage.total,
            path,
            self.model_config.num_parameters / 1e6,
            next(self.model.parameters()).dtype,
            self.num_blocks,
            config.block_size,
            self.runner.kv_cache_bytes / 2**20,
            self.runner.kv_caches[0].dtype,
            self.max_model_len,
            self.threads,
        )
        cores = physical_cores()
        if config.threads is None and cores > self.threads:
            logger.info(
                "threads=%d is the default, safe on a shared machine; on a machine of your own"
                " --threads auto (its %d cores) serves faster (BENCHMARKS.md, Threads)",
                self.threads,
                cores,
            )

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
                raise InvalidRequestError(
                    "prompt is empty: it must have at least one character", param="prompt"
                )
            text: str | None = prompt
            ids = self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
        self.limits.check_prompt_ids(ids)
        self.limits.check_length(len(ids), params.max_tokens)
        self.logits_processor.check(params, self.limits.vocab_size)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.output_processor:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        now = self.clock() if arrival_time is None else arrival_time
        group = self.output_processor.new_group(rid, text, ids, params, now)
        added: list[Request] = []
        try:
            for req in group.requests:
                self.policy.add_request(req)
                added.append(req)
        except InvalidRequestError:
            for req in added:  # keep the engine unchanged: all n completions or none
                self.policy.finish_request(req.request_id, FinishReason.ABORT, now)
            raise
        self.output_processor.register(group)
        return rid

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now (all its completions) and free its KV blocks.

        Returns:
            Its final output, or None if the id is unknown or already finished.
        """
        group = self.output_processor.group(request_id)
        if group is None:
            return None
        now = self.clock()
        for req in group.requests:
            if not req.is_finished:
                self.policy.finish_request(req.request_id, FinishReason.ABORT, now)
            self.runner.release(req.request_id)
        return self.output_processor.outputs([group])[0]

    def next_wake_time(self) -> float | None:
        """Engine-clock time at which ``step`` may have work with no new arrival (see
        ``SchedulingPolicy.wake_time``); None when only new requests can create work."""
        return self.policy.wake_time()

    def has_unfinished(self) -> bool:
        """True while any request is waiting or running."""
        return bool(len(self.output_processor))

    @property
    def num_requests(self) -> int:
        return len(self.output_processor)

    def snapshot(self) -> EngineSnapshot:
        """The engine's figures now (call from the thread that owns the engine)."""
        bm, stats = self.block_manager, self.stats
        by_cause = self.policy.stats.num_preemptions_by_cause
        return EngineSnapshot(
            num_running=self.policy.num_running,
            num_waiting=self.policy.num_waiting,
            num_free_blocks=bm.num_free_blocks,
            num_blocks=self.num_blocks,
            kv_cache_usage=bm.usage,
            num_unfinished=self.num_requests,
            steps=stats.steps,
            mean_batch_size=stats.mean_batch_size,
            num_preemptions=self.policy.stats.num_preemptions,
            prompt_tokens=stats.prompt_tokens,
            generation_tokens=stats.generated_tokens,
            prefix_cache_queries=bm.prefix_cache_stats.queries,
            prefix_cache_hits=bm.prefix_cache_stats.hits,
            num_preemptions_kv_cache=by_cause.get("kv_cache", 0),
            num_preemptions_priority=by_cause.get("priority", 0),
        )

    # ---- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one forward pass and return the outputs of every request that progressed."""
        return self.run_step().outputs

    def run_step(self) -> EngineStep:
        """Schedule, execute, update; say what happened (``record`` None: the model idled)."""
        start = self.clock()
        sched = self.policy.schedule(start)
        if sched.is_empty:  # an abort may have completed a static batch: report its release
            return EngineStep(self._report(self.policy.take_released(start), {}), None)
        try:
            requests = {c.request_id: self.policy.get_request(c.request_id) for c in sched.chunks}
            result = self.runner.execute(sched, requests)
        except Exception as e:  # the model failed: fail this batch's requests, keep serving
            return EngineStep(self._fail_batch(sched, e), None)
        now = self.clock()
        # Rows the sampler could not serve fail alone (before the update, which then skips
        # them); every other request of the batch keeps its token.
        failed = self._fail_rows(result.failed, now)
        finished = failed + self.policy.update_from_output(sched, result.sampled, now)
        stopped, touched = self.output_processor.add_tokens(result.sampled, result.logprobs)
        for rid in stopped:
            self.policy.finish_request(rid, FinishReason.STOP, now)
            self.runner.release(rid)  # its generator, block table and grammar state
        # Held results (a static batch) may be released now, though they sampled nothing now.
        finished += self.policy.take_released(now)
        record = StepRecord(
            start,
            now - start,
            sched.num_seqs,
            sched.num_batched_tokens,
            result.num_padded_tokens,
            len(result.sampled),
            sched.kv_blocks_in_use,
            sched.num_idle_seats,
            num_prefill_tokens=_num_prefill_tokens(sched, requests),
            num_preempted=len(sched.preempted_ids),
        )
        self.stats.add(record, self._prompt_tokens_computed(sched))
        return EngineStep(self._report(finished, touched), record)

    def _fail_batch(self, sched: SchedulerOutput, e: Exception) -> list[RequestOutput]:
        logger.exception(
            "engine step failed; failing the %d requests of the batch", len(sched.chunks)
        )
        now = self.clock()
        touched: dict[str, RequestGroup] = {}
        for chunk in sched.chunks:
            self.policy.finish_request(
                chunk.request_id, FinishReason.ERROR, now, error=f"engine step failed: {e}"
            )
            self.runner.release(chunk.request_id)
            group = self.output_processor.group_of(chunk.request_id)
            if group is not None:
                touched[group.request_id] = group
        return self.output_processor.outputs(touched.values())

    def _fail_rows(self, errors: dict[str, str], now: float) -> list[Request]:
        """Finish with ERROR each request whose row failed in sampling (``errors``: id -> why)."""
        failed = []
        for rid, error in errors.items():
            req = self.policy.finish_request(rid, FinishReason.ERROR, now, error=error)
            if req is not None:
                failed.append(req)
        return failed

    def _report(
        self, finished: list[Request], touched: dict[str, RequestGroup]
    ) -> list[RequestOutput]:
        """Outputs of the ``touched`` groups plus those of the requests the policy released."""
        for req in finished:
            self.runner.release(req.request_id)
            group = self.output_processor.group_of(req.request_id)
            if group is not None:
                touched[group.request_id] = group
        return self.output_processor.outputs(touched.values())

    def _prompt_tokens_computed(self, sched: SchedulerOutput) -> int:
        """Prompt tokens computed this step (recomputation after preemption included)."""
        total = 0
        for c in sched.chunks:
            group = self.output_processor.group_of(c.request_id)
            prompt_len = len(group.prompt_token_ids) if group is not None else 0
            total += max(0, min(c.end_pos, prompt_len) - c.start_pos)
        return total


def _num_prefill_tokens(sched: SchedulerOutput, requests: dict[str, Request | None]) -> int:
    """Tokens of the step that are not decodes (a decode feeds one token after the prompt)."""
    total = 0
    for c in sched.chunks:
        req = requests.get(c.request_id)
        prompt_len = req.num_prompt_tokens if req is not None else 0
        if not (c.num_tokens == 1 and c.start_pos >= prompt_len):
            total += c.num_tokens
    return total
