"""Priority scheduling through the real engine (counted, not timed)."""

from __future__ import annotations

from carpool import LLMEngine, SamplingParams
from carpool.config import EngineConfig
from helpers.hf_models import first_difference

PARAMS = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


def test_late_priority_request_overtakes_and_preempted_tokens_are_exact(tiny_llama):
    engine = LLMEngine(
        EngineConfig(
            model=tiny_llama.path,
            dtype="float32",
            max_num_seqs=4,
            max_num_batched_tokens=64,
            scheduling_policy="priority",
        )
    )
    prompts = tiny_llama.prompts[:17]
    for i in range(16):
        engine.add_request(prompts[i], PARAMS, request_id=f"low{i}", priority=10)
    order: list[str] = []
    while engine.policy.num_running < 4:  # saturate the seats
        order += [o.request_id for o in engine.step() if o.finished]
    engine.add_request(prompts[16], PARAMS, request_id="vip", priority=0)
    outputs = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                order.append(o.request_id)
                outputs[o.request_id] = o.outputs[0].token_ids
    assert order.index("vip") < 8, order
    stats = engine.policy.stats
    assert stats.num_preemptions_by_cause.get("priority", 0) >= 1, stats
    # Every request, preempted or not, gives the transformers greedy tokens.
    for i, rid in enumerate([f"low{i}" for i in range(16)] + ["vip"]):
        expected = tiny_llama.reference(prompts[i])
        assert outputs[rid] == expected, f"{rid}: " + first_difference(outputs[rid], expected)
    engine.block_manager.check_integrity()
    assert engine.block_manager.num_used_blocks == 0
