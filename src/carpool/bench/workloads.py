"""Synthetic workloads: prompt lengths, output lengths and arrival times, from a fixed seed.

Prompts are random token ids (the step time depends on lengths, not on the text) and every
request runs exactly ``max_tokens`` tokens (``ignore_eos``), so each strategy does the same work.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

WORKLOADS = ("fixed", "uniform", "long-tail")
ARRIVALS = ("all", "poisson")


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload.

    Attributes:
        prompt_token_ids: the prompt.
        max_tokens: tokens to generate (EOS ignored).
        arrival: seconds after the start of the run when the request arrives.
    """

    prompt_token_ids: list[int]
    max_tokens: int
    arrival: float


@dataclass(frozen=True)
class WorkloadSpec:
    """How to draw a workload.

    Attributes:
        kind: ``fixed`` (every prompt ``max_prompt_len`` tokens, every output ``output_len``),
            ``uniform`` (prompts uniform in [min, max], outputs uniform in
            [1, 2 x output_len - 1]), or ``long-tail`` (prompts uniform, outputs lognormal with
            median ``output_len`` and a 99th percentile at ``max_output_len``).
        num_requests: requests in the workload.
        min_prompt_len, max_prompt_len: prompt length range (tokens).
        output_len: median (long-tail) or mean (uniform) or exact (fixed) output length.
        max_output_len: outputs are clipped to this.
        arrival: ``all`` at once at t=0, or ``poisson`` at ``rate`` requests per second.
        rate: mean arrival rate for ``poisson``.
        seed: seed of every random draw.
        vocab_size: prompt ids are drawn from [3, vocab_size) (0-2 are special).
    """

    kind: str = "long-tail"
    num_requests: int = 64
    min_prompt_len: int = 16
    max_prompt_len: int = 128
    output_len: int = 32
    max_output_len: int = 256
    arrival: str = "all"
    rate: float = 4.0
    seed: int = 0
    vocab_size: int = 32000

    def __post_init__(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(f"workload must be one of {WORKLOADS}, got {self.kind!r}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {ARRIVALS}, got {self.arrival!r}")
        if not 1 <= self.min_prompt_len <= self.max_prompt_len:
            raise ValueError(
                f"need 1 <= min_prompt_len <= max_prompt_len, got "
                f"{self.min_prompt_len}, {self.max_prompt_len}"
            )
        if not 1 <= self.output_len <= self.max_output_len:
            raise ValueError(
                f"need 1 <= output_len <= max_output_len, got "
                f"{self.output_len}, {self.max_output_len}"
            )
        if self.num_requests < 1 or self.rate <= 0 or self.vocab_size < 4:
            raise ValueError(f"bad workload: {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_workload(spec: WorkloadSpec) -> list[BenchRequest]:
    """Draw the requests of ``spec`` (same spec, same requests), in arrival order."""
    rng = np.random.default_rng(spec.seed)
    n = spec.num_requests
    if spec.kind == "fixed":
        prompt_lens = np.full(n, spec.max_prompt_len)
        out_lens = np.full(n, spec.output_len)
    else:
        prompt_lens = rng.integers(spec.min_prompt_len, spec.max_prompt_len + 1, n)
        if spec.kind == "uniform":
            out_lens = rng.integers(1, 2 * spec.output_len, n)
        else:
            # The 99th percentile of a lognormal is median * exp(2.326 sigma).
            sigma = math.log(max(spec.max_output_len / spec.output_len, 1.0 + 1e-9)) / 2.326
            out_lens = np.rint(rng.lognormal(math.log(spec.output_len), sigma, n))
    out_lens = np.clip(out_lens, 1, spec.max_output_len).astype(int)
    if spec.arrival == "all":
        arrivals = np.zeros(n)
    else:
        arrivals = np.cumsum(rng.exponential(1.0 / spec.rate, n))
        arrivals -= arrivals[0]  # the first request opens the run
    return [
        BenchRequest(
            prompt_token_ids=rng.integers(3, spec.vocab_size, int(p)).tolist(),
            max_tokens=int(o),
            arrival=float(a),
        )
        for p, o, a in zip(prompt_lens, out_lens, arrivals, strict=True)
    ]
