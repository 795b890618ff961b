"""The real-run half of ``carpool optimize``: run a batch on an engine and say whether it fit.

``carpool.capacity.fit.BatchFitter`` does the arithmetic and the search; it is given
``engine_trial`` to confirm each candidate on a real engine (a benchmark run, hence here).
"""

from __future__ import annotations

import gc

import torch

from carpool.config import EngineConfig


def is_out_of_memory(error: BaseException) -> bool:
    """True for the ways torch and Python report an allocation failure."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def engine_trial(config: EngineConfig, batch: int, prompt_len: int, decode_tokens: int) -> str:
    """Prefill ``batch`` random prompts of ``prompt_len`` tokens in one pass and decode
    ``decode_tokens`` more on an engine built from ``config``.

    Returns:
        "" when every sequence ran in one step, else why the batch does not fit (out of
        memory: ``torch.OutOfMemoryError``, a ``RuntimeError`` saying "out of memory",
        ``MemoryError`` or a request the engine failed with one). The process survives.

    Raises:
        RuntimeError: a request failed for another reason (a bug, not a size limit).
    """
    from carpool.bench.sweep import random_prompts
    from carpool.engine.llm_engine import LLMEngine
    from carpool.sampling_params import SamplingParams

    engine = None
    try:
        engine = LLMEngine(config)
        prompts = random_prompts(batch, prompt_len, engine.limits.vocab_size, batch)
        params = SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True)
        for p in prompts:
            engine.add_request(p, params)
        errors: list[str] = []
        while engine.has_unfinished():
            for out in engine.step():  # the engine turns a failed step into failed requests
                errors += [o.error or "failed" for o in out.outputs if o.finish_reason == "error"]
        if errors:
            if any("out of memory" in e.lower() for e in errors):
                return f"out of memory: {errors[0][:200]}"
            raise RuntimeError(f"batch {batch} failed: {errors[0]}")
        if max(r.num_seqs for r in engine.stats.records) != batch:
            return f"the engine did not run all {batch} sequences in one step"
        return ""
    except Exception as e:  # only allocation failures are "does not fit"
        if not is_out_of_memory(e):
            raise
        return f"out of memory: {str(e).splitlines()[0][:200]}"
    finally:
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
