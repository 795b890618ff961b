"""The offline Python API: ``LLM(...).generate(prompts, params)``."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from carpool.config import EngineConfig
from carpool.engine.llm_engine import LLMEngine
from carpool.outputs import RequestOutput
from carpool.sampling_params import SamplingParams

Prompt = str | Sequence[int]


class LLM:
    """A model with its engine, for batch generation from Python.

    Example::

        from carpool import LLM, SamplingParams
        llm = LLM()  # the default model (SmolLM2-135M-Instruct where installed)
        out = llm.generate(["def fibonacci(n):"], SamplingParams(max_tokens=32, temperature=0))
        print(out[0].outputs[0].text)

    Args:
        model: model directory, ``.gguf`` file, Hub id, ``"embedded"`` (the 4M test model), or
            None: SmolLM2-135M-Instruct where its package is installed, else the embedded
            model (``EngineConfig.model``).
        **engine_args: any ``EngineConfig`` field (``dtype``, ``kv_cache_memory``,
            ``max_num_seqs``, ``max_num_batched_tokens``, ``block_size``, ``batching``,
            ``quantization="int8"`` or ``"int4"`` for weight-only quantized matrices...).
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self.engine_config = self.engine.config
        self.tokenizer = self.engine.tokenizer

    def _add(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[str]:
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        ids = []
        try:
            for p, sp in zip(prompts, params, strict=True):
                ids.append(self.engine.add_request(p, sp))
        except Exception:
            for rid in ids:  # all or nothing
                self.engine.abort(rid)
            raise
        return ids

    @staticmethod
    def _normalise(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        if prompts and isinstance(prompts[0], int):
            return [prompts]  # one prompt given as token ids
        return list(prompts)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids), batched; outputs in input order.

        Raises:
            InvalidRequestError: a prompt or parameter is invalid; nothing is generated.
        """
        plist = self._normalise(prompts)
        ids = self._add(plist, params or SamplingParams())
        order = {rid: i for i, rid in enumerate(ids)}
        results: list[RequestOutput | None] = [None] * len(ids)
        bar = tqdm(
            total=len(ids), desc="generate", unit="req", disable=not use_tqdm or len(ids) < 8
        )
        while self.engine.has_unfinished():
            step = self.engine.run_step()
            for out in step.outputs:
                if out.finished and out.request_id in order:
                    results[order[out.request_id]] = out
                    bar.update(1)
            if step.record is None:  # the model did not run: maybe a batching timer
                self._sleep_until_wake()
        bar.close()
        assert all(r is not None for r in results), "a request ended without a final output"
        return results  # type: ignore[return-value]

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield each request's output every step it progresses (``delta_text`` per step)."""
        self._add(self._normalise(prompts), params or SamplingParams())
        while self.engine.has_unfinished():
            step = self.engine.run_step()
            yield from step.outputs
            if step.record is None:  # the model did not run: maybe a batching timer
                self._sleep_until_wake()

    def _sleep_until_wake(self) -> None:
        """Nothing ran: sleep until the policy's timer (e.g. a dynamic batch's deadline).

        No request can arrive during ``generate`` (all were added up front), so the only thing
        that can create work is the policy's ``wake_time``; the deadline is on the engine's
        clock. Without a timer, return at once (the next step has work, e.g. a release).
        """
        wake = self.engine.next_wake_time()
        if wake is not None:
            delay = wake - self.engine.clock()
            if delay > 0:
                time.sleep(delay)

    def chat(
        self,
        conversations: list[dict[str, str]] | list[list[dict[str, str]]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then ``generate``."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        prompts = [
            self.tokenizer.apply_chat_template(
                conv, add_generation_prompt=True, tokenize=True, **template_kwargs
            )
            for conv in conversations
        ]
        return self.generate(prompts, params, use_tqdm=use_tqdm)
