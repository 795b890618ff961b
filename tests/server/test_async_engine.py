"""``AsyncEngine`` without HTTP: streaming, cancellation, deadlines, backpressure."""

from __future__ import annotations

import asyncio

import pytest

from carpool import SamplingParams
from carpool.config import EngineConfig
from carpool.engine.async_engine import AsyncEngine
from carpool.engine.llm_engine import LLMEngine
from carpool.errors import InvalidRequestError, QueueFullError, RequestTimeoutError

GREEDY = SamplingParams(max_tokens=8, temperature=0)
LONG = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)


@pytest.fixture
def engine(tiny_dir):
    e = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_dir), dtype="float32")), max_queue=3)
    e.start()
    yield e
    e.shutdown()


async def _wait_idle(engine: AsyncEngine) -> None:
    for _ in range(400):
        s = engine.snapshot
        if s.num_unfinished == 0 and engine.num_waiting == 0:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"not idle: {engine.snapshot}")


def test_generate_streams_the_reference_text(engine, reference):
    async def main() -> tuple[str, str]:
        deltas, final = "", None
        async for out in engine.generate("def fibonacci(n):", GREEDY):
            deltas += out.outputs[0].delta_text
            final = out
        assert final is not None and final.finished
        return deltas, final.outputs[0].text

    deltas, text = asyncio.run(main())
    exp = reference.generate(["def fibonacci(n):"], GREEDY, use_tqdm=False)[0].outputs[0].text
    assert deltas == text == exp


def test_cancelled_consumer_aborts_and_frees_blocks(engine):
    async def main() -> None:
        async def consume() -> None:
            async for _ in engine.generate("hello", LONG):
                pass

        task = asyncio.ensure_future(consume())
        while engine.snapshot.num_running == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _wait_idle(engine)

    asyncio.run(main())
    s = engine.snapshot
    assert s.num_free_blocks == s.num_blocks and s.generation_tokens < 1000
    engine.engine.block_manager.check_integrity()


def test_errors_reach_the_caller(engine):
    async def drain(prompt, params, **kw) -> None:
        async for _ in engine.generate(prompt, params, **kw):
            pass

    async def main() -> None:
        with pytest.raises(InvalidRequestError, match="max_model_len"):
            await drain("hello", SamplingParams(max_tokens=5000))
        with pytest.raises(RequestTimeoutError, match="timed out"):
            await drain("hello", LONG, timeout=0.05)  # well before LONG ends
        # max_queue=3 counts only what the engine cannot admit now: the free sequence slots
        # plus 3 are accepted in one event-loop turn, one more is refused.
        await _wait_idle(engine)
        free = engine.engine.config.max_num_seqs - engine.snapshot.num_running
        streams = [engine.submit("hello", GREEDY) for _ in range(free + 3)]
        with pytest.raises(QueueFullError):
            engine.submit("hello", GREEDY)
        for s in streams:
            async for _ in s:
                pass
        await _wait_idle(engine)

    asyncio.run(main())
    assert engine.snapshot.num_free_blocks == engine.snapshot.num_blocks
