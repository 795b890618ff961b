"""Batch-size sweep (``carpool bench``): throughput and latency per batch size, with rooflines.

For each batch size B, after one untimed warm-up round, the requests run in rounds of B: B
prompts of ``PP`` random tokens are added at once, so the engine prefills them in one pass and
then decodes them together for ``TG`` tokens (greedy, EOS ignored). Times come from the
engine's own ``StepRecord``s:

- ``T_PP``: the prefill steps (a step that computed more tokens than sequences, or a round's
  first step); each also samples one token per sequence.
- ``T_TG``: the decode steps (one token per sequence); ``S_TG = B x (TG - 1) / T_TG`` per round.
- ``N_KV = B x (PP + TG)``, ``T = T_PP + T_TG``, ``S = N_KV / T``: llama.cpp batched-bench's
  columns.

The roofline columns divide what the decode steps achieved by the machine's probes
(``carpool.bench.probes``): FLOP/s ``2 x matmul parameters x B`` (+ attention) per step, and
bytes/s of the weights every step reads plus the KV cache it attends over.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from carpool.bench.probes import Roofline
from carpool.config import ModelConfig
from carpool.engine.llm_engine import LLMEngine
from carpool.engine.stats import StepRecord
from carpool.sampling_params import SamplingParams


@dataclass(frozen=True)
class SweepSpec:
    """The workload of a sweep.

    Attributes:
        batch_sizes: B values, ascending.
        num_requests: requests per batch size (run in rounds of B; at least one round).
        prompt_len: PP, tokens per prompt.
        gen_len: TG, tokens generated per request.
        seed: seed of the random prompts.
    """

    batch_sizes: tuple[int, ...]
    num_requests: int = 100
    prompt_len: int = 128
    gen_len: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be ints >= 1, got {self.batch_sizes!r}")
        for name in ("num_requests", "prompt_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gen_len < 2:
            raise ValueError(f"gen_len must be >= 2 (a prefill token + decode), got {self.gen_len}")
        object.__setattr__(self, "batch_sizes", tuple(sorted(set(self.batch_sizes))))

    def rounds(self, batch_size: int) -> int:
        """Rounds of ``batch_size`` requests that cover ``num_requests``."""
        return max(1, math.ceil(self.num_requests / batch_size))


@dataclass(frozen=True)
class SweepRow:
    """One batch size's results (times in seconds, rates per second)."""

    pp: int
    tg: int
    b: int
    n_kv: int
    rounds: int
    t_pp: float
    s_pp: float
    t_tg: float
    s_tg: float
    t: float
    s: float
    gen_tok_s: float
    prefill_tok_s: float
    latency_mean_ms: float
    latency_p95_ms: float
    speedup_vs_b1: float
    efficiency: float
    tg_gflops: float
    tg_flops_frac: float
    tg_gbs: float
    tg_bw_frac: float
    pp_flops_frac: float
    bound: str

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain values for JSON."""
        return asdict(self)


@dataclass(frozen=True)
class Measured:
    """Raw times of one batch size's rounds."""

    wall: float
    prefill: list[StepRecord]
    decode: list[StepRecord]


def matmul_parameters(config: ModelConfig) -> int:
    """Parameters used in matmuls each token: all but an untied embedding table (a lookup)."""
    embed = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return config.num_parameters - embed


def _attention_flops(config: ModelConfig, queries: float, context: float) -> float:
    """QK^T and PV: 2 matmuls x 2 FLOP x heads x head_dim per (query, key) pair."""
    c = config
    return 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * queries * context


def decode_step_cost(
    config: ModelConfig, batch: int, context: float, nbytes: int
) -> tuple[float, float]:
    """(FLOP, bytes read) of one decode step of ``batch`` sequences at mean ``context`` tokens."""
    params = matmul_parameters(config)
    flops = 2 * params * batch + _attention_flops(config, batch, context)
    read = (
        params * nbytes
        + batch * context * config.kv_bytes_per_token_for(nbytes)
        + batch * config.hidden_size * nbytes  # B embedding rows
    )
    return flops, read


def prefill_flops(config: ModelConfig, batch: int, prompt_len: int) -> float:
    """FLOP of prefilling ``batch`` prompts (useful causal attention only)."""
    tokens = batch * prompt_len
    return 2 * matmul_parameters(config) * tokens + _attention_flops(
        config, tokens, (prompt_len + 1) / 2
    )


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """``n`` prompts of ``length`` uniform token ids (ids 0-2 avoided: pad, BOS, EOS)."""
    rng = random.Random(seed)
    low = 3 if vocab_size > 3 else 0
    return [[rng.randrange(low, vocab_size) for _ in range(length)] for _ in range(n)]


def run_round(engine: LLMEngine, prompts: Sequence[list[int]], gen_len: int) -> list[StepRecord]:
    """Add every prompt at once, step until all finish; the round's step records."""
    params = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)
    first = engine.stats.steps
    for p in prompts:
        engine.add_request(p, params)
    while engine.has_unfinished():
        engine.step()
    records = list(engine.stats.records)
    return records[len(records) - (engine.stats.steps - first) :]


def _measure(
    engine: LLMEngine, spec: SweepSpec, batch: int, on_round: Callable[[int], None]
) -> Measured:
    vocab = engine.model_config.vocab_size
    # One untimed round of the same shapes first: kernels are picked (oneDNN) or compiled per
    # shape on first use, which would otherwise land in the timed rounds of a large B.
    run_round(engine, random_prompts(batch, spec.prompt_len, vocab, -batch), spec.gen_len)
    prefill: list[StepRecord] = []
    decode: list[StepRecord] = []
    start = time.perf_counter()
    for r in range(spec.rounds(batch)):
        prompts = random_prompts(batch, spec.prompt_len, vocab, spec.seed + 1000 * batch + r)
        for i, rec in enumerate(run_round(engine, prompts, spec.gen_len)):
            (prefill if i == 0 or rec.num_tokens > rec.num_seqs else decode).append(rec)
        on_round(batch)
    return Measured(time.perf_counter() - start, prefill, decode)


def _row(
    config: ModelConfig,
    spec: SweepSpec,
    batch: int,
    m: Measured,
    roof: Roofline,
    nbytes: int,
    base_s_tg: float | None,
    base_batch: int,
) -> SweepRow:
    """One table row from the measured steps.

    Speedup and efficiency are relative to ``base_batch`` (batch 1 when it was swept):
    ``speedup = S_TG / S_TG(base)``, ``efficiency = speedup / (B / base)``.
    """
    rounds = spec.rounds(batch)
    t_pp = sum(r.duration for r in m.prefill)
    t_tg = sum(r.duration for r in m.decode)
    n_kv = batch * (spec.prompt_len + spec.gen_len)
    decode_tokens = sum(r.num_sampled for r in m.decode)
    s_tg = decode_tokens / t_tg if t_tg > 0 else 0.0
    s_pp = batch * spec.prompt_len * rounds / t_pp if t_pp > 0 else 0.0
    t = t_pp + t_tg
    latencies = sorted(r.duration * 1e3 for r in m.decode) or [0.0]
    p95 = latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)]
    context = spec.prompt_len + spec.gen_len / 2
    step_flops, step_bytes = decode_step_cost(config, batch, context, nbytes)
    steps_per_s = len(m.decode) / t_tg if t_tg > 0 else 0.0
    tg_flops = step_flops * steps_per_s
    tg_bytes = step_bytes * steps_per_s
    pp_flops = prefill_flops(config, batch, spec.prompt_len) * rounds / t_pp if t_pp > 0 else 0.0
    speedup = s_tg / base_s_tg if base_s_tg else 1.0
    return SweepRow(
        pp=spec.prompt_len,
        tg=spec.gen_len,
        b=batch,
        n_kv=n_kv,
        rounds=rounds,
        t_pp=t_pp / rounds,
        s_pp=s_pp,
        t_tg=t_tg / rounds,
        s_tg=s_tg,
        t=t / rounds,
        s=n_kv * rounds / t if t > 0 else 0.0,
        gen_tok_s=batch * spec.gen_len * rounds / m.wall,
        prefill_tok_s=s_pp,
        latency_mean_ms=statistics.fmean(latencies),
        latency_p95_ms=p95,
        speedup_vs_b1=speedup,
        efficiency=speedup * base_batch / batch,
        tg_gflops=tg_flops / 1e9,
        tg_flops_frac=tg_flops / roof.peak_flops,
        tg_gbs=tg_bytes / 1e9,
        tg_bw_frac=tg_bytes / roof.bandwidth,
        pp_flops_frac=pp_flops / roof.peak_flops,
        bound="memory" if step_flops / step_bytes < roof.ridge_intensity else "compute",
    )


def measure_sweep(
    engine: LLMEngine, spec: SweepSpec, on_round: Callable[[int], None] = lambda _b: None
) -> dict[int, Measured]:
    """Run ``spec`` on ``engine``, one untimed warm-up round per batch size; raw step times.

    The engine must accept ``max(spec.batch_sizes)`` sequences of ``PP + TG`` tokens at once
    and prefill them in one pass (``max_num_batched_tokens >= B x PP``) for the prefill and
    decode columns to mean what they say.

    Args:
        engine: an idle engine.
        spec: the workload.
        on_round: called with B after each round (progress bars).
    """
    return {b: _measure(engine, spec, b, on_round) for b in spec.batch_sizes}


def sweep_rows(
    config: ModelConfig,
    spec: SweepSpec,
    measured: dict[int, Measured],
    roof: Roofline,
    nbytes: int,
) -> list[SweepRow]:
    """One row per batch size; ``nbytes`` per weight element (for the bytes/s columns)."""
    b0 = spec.batch_sizes[0]
    first = _row(config, spec, b0, measured[b0], roof, nbytes, None, b0)
    return [first] + [
        _row(config, spec, b, measured[b], roof, nbytes, first.s_tg, b0)
        for b in spec.batch_sizes[1:]
    ]


def run_sweep(
    engine: LLMEngine,
    spec: SweepSpec,
    roof: Roofline,
    nbytes: int,
    on_round: Callable[[int], None] = lambda _b: None,
) -> list[SweepRow]:
    """``measure_sweep`` then ``sweep_rows``."""
    return sweep_rows(
        engine.model_config, spec, measure_sweep(engine, spec, on_round), roof, nbytes
    )


def profile_steps(engine: LLMEngine, batch: int, spec: SweepSpec, out_dir: Path) -> Path:
    """Write a torch.profiler chrome trace of one short round of ``batch`` requests."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available() and str(engine.config.device).startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    prompts = random_prompts(batch, spec.prompt_len, engine.model_config.vocab_size, spec.seed)
    with profile(activities=activities, record_shapes=True) as prof:
        run_round(engine, prompts, min(spec.gen_len, 8))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "trace.json"
    prof.export_chrome_trace(str(path))
    return path
