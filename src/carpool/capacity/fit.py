"""The largest batch that fits a memory budget: estimated, then confirmed by really running it.

"Fits" for B sequences of L tokens means both:
1. the budget check the engine itself makes: the KV cache gets what the budget leaves after the
   weights and the activation estimate (``carpool.capacity``), and those blocks must hold B
   sequences of L tokens (so on a CPU, where nothing fails at a limit, the budget still binds);
2. a real engine with exactly that cache prefills the B sequences in one pass and decodes a few
   tokens without running out of memory. That trial is given to ``BatchFitter`` (the engine
   run of ``carpool.bench.optimize.engine_trial``), so this package never imports the engine
   (which sizes its own cache from here).

Then a short throughput sweep up to that batch finds the knee: the batch past which doubling
buys less than ``knee_gain`` (10%) more decode throughput.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from carpool.capacity.activations import activation_bytes
from carpool.capacity.kv import block_bytes, kv_element
from carpool.capacity.weights import weight_bytes
from carpool.config import EngineConfig
from carpool.model_config import ModelConfig

logger = logging.getLogger("carpool.optimize")

# (engine config, batch size, prompt tokens, decode tokens) -> "" when it ran, else why not.
Trial = Callable[[EngineConfig, int, int, int], str]


@dataclass(frozen=True)
class Probe:
    """One batch size tried.

    Attributes:
        batch_size: B.
        fits: both the budget check and the real run passed.
        kv_blocks: KV blocks the budget leaves for this B (0 when none).
        blocks_needed: blocks B sequences of L tokens take.
        reason: why it does not fit ("" when it does).
    """

    batch_size: int
    fits: bool
    kv_blocks: int
    blocks_needed: int
    reason: str = ""


class BatchFitter:
    """Decides whether B sequences of ``seq_len`` tokens fit ``budget`` bytes on a model.

    Args:
        base: engine settings (model, dtype, device, block size); sizes are overridden per probe.
        config: the model's config.
        nbytes: bytes per weight/activation/KV element of the loaded model.
        seq_len: tokens per sequence L (prompt + output).
        budget: bytes for weights + KV cache + activations.
        decode_tokens: tokens each probe generates (the rest of L is prompt).
        trial: runs ``batch`` sequences of ``prompt_len`` + ``decode_tokens`` tokens on an engine
            of the given config; returns "" when it ran, else why it does not fit (see
            ``carpool.bench.optimize.engine_trial``).
    """

    def __init__(
        self,
        base: EngineConfig,
        config: ModelConfig,
        nbytes: int,
        seq_len: int,
        budget: int,
        trial: Trial,
        decode_tokens: int = 4,
    ) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (a prompt and one output), got {seq_len}")
        self.base = base
        self.config = config
        self.nbytes = nbytes
        self.seq_len = seq_len
        self.budget = budget
        self.trial = trial
        self.decode_tokens = max(1, min(decode_tokens, seq_len - 1))
        self.probes: list[Probe] = []

    def kv_budget(self, batch: int) -> int:
        """Bytes the budget leaves for the KV cache at batch ``batch``."""
        c = self.config
        used = weight_bytes(c, self.nbytes) + activation_bytes(c, batch, self.seq_len, self.nbytes)
        return self.budget - used

    def budget_check(self, batch: int) -> Probe:
        """The arithmetic part of "fits": do the budget's KV blocks hold the batch?"""
        bs = self.base.block_size
        kv = kv_element(self.base, self.nbytes)
        per_block = block_bytes(self.config.kv_bytes_per_token_for(kv), bs)
        blocks = max(0, self.kv_budget(batch) // per_block)
        needed = batch * math.ceil(self.seq_len / bs)
        if blocks < needed:
            reason = f"budget leaves {blocks} KV blocks, {needed} needed"
            return Probe(batch, False, blocks, needed, reason)
        return Probe(batch, True, blocks, needed)

    def engine_config(self, batch: int) -> EngineConfig:
        """An engine whose KV cache is what the budget leaves, running the batch in one pass."""
        prompt = self.seq_len - self.decode_tokens
        return replace(
            self.base,
            batching="continuous",
            kv_cache_memory=max(1, self.kv_budget(batch)),
            max_num_seqs=batch,
            max_num_batched_tokens=max(batch * prompt, batch),
            max_model_len=self.seq_len,
        )

    def fits(self, batch: int) -> Probe:
        """Budget check, then a real prefill + decode of the batch; recorded in ``probes``."""
        probe = self.budget_check(batch)
        if probe.fits:
            error = self._run(batch)
            if error:
                probe = replace(probe, fits=False, reason=error)
        logger.info("batch %d: %s", batch, "fits" if probe.fits else probe.reason)
        self.probes.append(probe)
        return probe

    def _run(self, batch: int) -> str:
        """Run the batch for real through the trial; "" on success, else why it failed."""
        prompt_len = self.seq_len - self.decode_tokens
        return self.trial(self.engine_config(batch), batch, prompt_len, self.decode_tokens)


def largest_fitting_batch(fitter: BatchFitter, estimate: int) -> int:
    """Largest B for which ``fitter.fits(B)``: check the estimate, else binary-search below it.

    ``fits`` is assumed monotone in B. Returns 0 when not even one sequence fits.
    """
    if estimate < 1:
        return 0
    if fitter.fits(estimate).fits:
        return estimate
    lo, hi = 0, estimate - 1  # fits(lo) holds (or lo == 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fitter.fits(mid).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def sweep_sizes(largest: int) -> tuple[int, ...]:
    """Powers of two below ``largest``, and ``largest``."""
    sizes = {1 << k for k in range(max(largest, 1).bit_length()) if (1 << k) < largest}
    return tuple(sorted(sizes | {largest}))


def sweet_spot(throughputs: list[tuple[int, float]], knee_gain: float = 0.10) -> int:
    """The first batch after which the next size buys less than ``knee_gain`` more throughput.

    Args:
        throughputs: (batch size, tokens/s), ascending batch sizes.
    """
    for (b, tps), (_, next_tps) in zip(throughputs, throughputs[1:], strict=False):
        if next_tps < (1 + knee_gain) * tps:
            return b
    return throughputs[-1][0]


def probes_as_dicts(probes: list[Probe]) -> list[dict[str, object]]:
    """Plain values for JSON."""
    return [asdict(p) for p in probes]
