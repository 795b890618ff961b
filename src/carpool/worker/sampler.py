"""Turn a step's logits into one token per sampling row, vectorised over the batch.

Order of processing (as in vLLM and transformers): penalties on raw logits, then temperature,
then the truncations (top-k, top-p, min-p), then a draw. Greedy rows take the argmax of the
penalised logits. Seeded rows draw from their own ``torch.Generator``, so a seed gives the
same tokens whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from carpool.model import fused_ops
from carpool.outputs import TokenLogprobs
from carpool.sampling_params import MIN_TEMPERATURE, SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs of one request: its params, history and generator."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class SamplerOutput:
    """One token per row, with logprobs where the row asked for them."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def _pad(seqs: Sequence[list[int]], fill: int, device: torch.device) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    rows = [s + [fill] * (width - len(s)) for s in seqs]
    return torch.tensor(rows, dtype=torch.long, device=device)


class RowParams:
    """The batch's per-row sampling parameters: as Python values (``values``, what the
    sampler decides from: on a GPU reading a tensor back is a synchronisation) and as float32
    columns ``[R]`` on the logits' device (``[name]``), all columns made on first use in ONE
    host-to-device copy: on a GPU each small copy is a transfer of its own (with every option
    a step made twelve, counted on ``meta``). The tensors hold what separate tensors of the
    Python values held (float32; ``top_k`` exact below 2^24)."""

    # name -> its value for a row's params and the vocabulary size
    _COLUMNS: dict[str, Callable[[SamplingParams, int], float]] = {
        "repetition_penalty": lambda p, v: p.repetition_penalty,
        "presence_penalty": lambda p, v: p.presence_penalty,
        "frequency_penalty": lambda p, v: p.frequency_penalty,
        # Clamped before the tensor is built: a top_k past the vocabulary keeps every token
        # (off, as in vLLM), and no client value can overflow the tensor.
        "top_k": lambda p, v: min(p.top_k, v),
        "top_p": lambda p, v: p.top_p,
        "min_p": lambda p, v: p.min_p,
        # Greedy rows divide by 1 (their draw is discarded): no infinities in the batch.
        "temperature": lambda p, v: 1.0 if p.temperature < MIN_TEMPERATURE else p.temperature,
        "greedy": lambda p, v: float(p.temperature < MIN_TEMPERATURE),
    }
    COLUMNS = tuple(_COLUMNS)

    def __init__(self, rows: Sequence[SamplingRow], vocab: int, device: torch.device) -> None:
        self.rows, self.vocab, self.device = rows, vocab, device
        self._values: dict[str, list[float]] = {}
        self._table: torch.Tensor | None = None

    def values(self, name: str) -> list[float]:
        """Column ``name`` as Python values, one per row (made once)."""
        got = self._values.get(name)
        if got is None:
            f = self._COLUMNS[name]
            got = self._values[name] = [f(row.params, self.vocab) for row in self.rows]
        return got

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._table is None:
            columns = [self.values(n) for n in self.COLUMNS]  # [columns, R]
            self._table = torch.tensor(columns, dtype=torch.float32).to(self.device)
        return self._table[self.COLUMNS.index(name)]


def apply_penalties(
    logits: torch.Tensor, rows: Sequence[SamplingRow], params: RowParams | None = None
) -> torch.Tensor:
    """Repetition (HF: over prompt + output), presence and frequency (OpenAI: over output).

    ``logits`` is ``[R, V]`` float32; it is not modified: the penalised logits are a new tensor
    (the same one when no row has a penalty). ``params``: the batch's ``RowParams`` (made
    here when not given).
    """
    r, v = logits.shape
    # Every tensor on the logits' device: the sampler runs wherever the model does (CUDA too).
    dev = logits.device
    params = params or RowParams(rows, v, dev)
    has_rep = any(x != 1 for x in params.values("repetition_penalty"))
    has_counts = any(x != 0 for x in params.values("presence_penalty")) or any(
        x != 0 for x in params.values("frequency_penalty")
    )
    if not (has_rep or has_counts):  # the usual case: no tensors built (~50 us a step)
        return logits
    rep = params["repetition_penalty"]
    pres = params["presence_penalty"]
    freq = params["frequency_penalty"]
    if has_rep:
        seen = torch.zeros(r, v + 1, dtype=torch.bool, device=dev)
        hist = _pad([row.prompt_token_ids + row.output_token_ids for row in rows], v, dev)
        seen.scatter_(1, hist, True)
        seen = seen[:, :v]
        penalised = torch.where(logits > 0, logits / rep[:, None], logits * rep[:, None])
        logits = torch.where(seen, penalised, logits)
    if has_counts:
        counts = torch.zeros(r, v + 1, device=dev)
        out = _pad([row.output_token_ids for row in rows], v, dev)
        counts.scatter_add_(1, out, torch.ones_like(out, dtype=counts.dtype))
        counts = counts[:, :v]
        logits = logits - freq[:, None] * counts - pres[:, None] * (counts > 0)
    return logits


def apply_truncation(
    logits: torch.Tensor, rows: Sequence[SamplingRow], params: RowParams | None = None
) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k / top-p / min-p support (``params``:
    as for ``apply_penalties``)."""
    dev = logits.device
    v = logits.shape[-1]
    params = params or RowParams(rows, v, dev)
    # Decided from the Python values, not from the tensors: on a GPU reading a tensor back
    # is a synchronisation with the device.
    if any(k > 0 for k in params.values("top_k")) or any(p < 1 for p in params.values("top_p")):
        top_k = params["top_k"].long()
        top_p = params["top_p"]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(v, device=dev)[None, :]
        k = torch.where(top_k > 0, top_k, v)[:, None]
        drop = rank >= k
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
        # *before* it already reaches top_p (the first token is always kept).
        before = probs.cumsum(-1) - probs
        drop |= before >= top_p[:, None]
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if any(p > 0 for p in params.values("min_p")):
        min_p = params["min_p"]
        probs = logits.softmax(-1)
        threshold = min_p[:, None] * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def argmax_only(params: SamplingParams) -> bool:
    """Whether a row's token is its raw logits' first maximal index: greedy, and nothing
    applied before the argmax (no penalty, no logit bias, no grammar) nor read after it (no
    logprobs). ``Sampler.__call__`` and the logits processor return that very token for such
    a row; ``ModelRunner`` then skips them (``Sampler.greedy``)."""
    return (
        params.temperature < MIN_TEMPERATURE
        and params.logprobs is None
        and params.repetition_penalty == 1
        and params.presence_penalty == 0
        and params.frequency_penalty == 0
        and not params.logit_bias
        and params.structured_outputs is None
    )


class Sampler:
    """Sample one token per row of ``[R, V]`` logits."""

    @staticmethod
    def greedy(logits: torch.Tensor) -> list[int]:
        """Each row's first maximal index (what ``__call__`` gives rows that are all
        ``argmax_only``), without building the batch's sampling parameters."""
        return fused_ops.argmax(logits.float()).tolist()

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        assert logits.shape[0] == len(rows), f"{logits.shape[0]} logits rows for {len(rows)} rows"
        logits = logits.float()
        raw = logits
        params = RowParams(rows, logits.shape[-1], logits.device)  # copied once, if needed
        logits = apply_penalties(logits, rows, params)  # a new tensor when it changes any
        greedy_l = [g > 0 for g in params.values("greedy")]
        # The first maximal index, like argmax (fused_ops: C++ on the CPU, ~2x faster than
        # torch's reduction over a [32, 32000] float32 batch).
        tokens = fused_ops.argmax(logits)
        if not all(greedy_l):
            greedy = params["greedy"] > 0
            temp = params["temperature"]  # 1 for greedy rows (RowParams)
            probs = apply_truncation(logits / temp[:, None], rows, params).softmax(-1)
            # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, and lets each
            # seeded row use its own generator while unseeded rows share one draw.
            noise = torch.empty_like(probs).exponential_()
            for i, row in enumerate(rows):
                if row.generator is not None and not greedy_l[i]:
                    noise[i].exponential_(generator=row.generator)
            sampled = (probs / noise).argmax(-1)
            tokens = torch.where(greedy, tokens, sampled)
        token_list = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        if wanted:
            lp = raw[wanted].log_softmax(-1)
            n_top = max(rows[i].params.logprobs or 0 for i in wanted)
            # A tiny vocabulary may have fewer tokens than the logprobs asked for.
            top_v, top_i = lp.topk(min(max(n_top, 1), lp.shape[-1]), dim=-1)
            chosen = lp.gather(1, tokens[wanted][:, None])
            # Three reads back for the whole batch, not three per row (each one a
            # synchronisation on a GPU).
            chosen_l, top_v_l, top_i_l = chosen.tolist(), top_v.tolist(), top_i.tolist()
            for j, i in enumerate(wanted):
                n = rows[i].params.logprobs or 0
                logprobs[i] = TokenLogprobs(
                    token_id=token_list[i],
                    logprob=chosen_l[j][0],
                    top=list(zip(top_i_l[j][:n], top_v_l[j][:n], strict=True)),
                )
        return SamplerOutput(token_ids=token_list, logprobs=logprobs)
