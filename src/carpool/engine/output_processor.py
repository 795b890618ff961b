"""``OutputProcessor``: from sampled tokens to ``RequestOutput`` s, apart from the step.

It owns what is per request but not the scheduler's business: the ``n`` completions of a prompt
(fanned out into ``n`` scheduler requests and gathered back into one output), the incremental
detokenizer with its stop strings, and the logprobs. What an output carries follows the
request's ``RequestOutputKind``: a DELTA output holds only what is new, so a stream of n tokens
costs O(n) in all; FINAL_ONLY emits once, at the end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from carpool.engine.detokenizer import IncrementalDetokenizer
from carpool.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from carpool.request import Request
from carpool.sampling_params import RequestOutputKind, SamplingParams
from carpool.tokenizer import Tokenizer


@dataclass
class _Completion:
    """Engine-side state of one of a request's ``n`` completions."""

    request: Request
    detok: IncrementalDetokenizer
    logprobs: list[TokenLogprobs] | None
    sent_tokens: int = 0
    sent_logprobs: int = 0
    stop_reason: str | int | None = None


@dataclass
class RequestGroup:
    """One prompt and its ``n`` completions (``n`` scheduler requests)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    kind: RequestOutputKind
    completions: list[_Completion]

    @property
    def requests(self) -> list[Request]:
        """The scheduler requests of the completions."""
        return [c.request for c in self.completions]

    @property
    def finished(self) -> bool:
        return all(c.request.is_finished for c in self.completions)


class OutputProcessor:
    """Turns each step's sampled tokens into per-request outputs.

    Args:
        tokenizer: decodes the output tokens.
        eos_token_ids: tokens that end a request (unless ``ignore_eos``).
    """

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self._groups: dict[str, RequestGroup] = {}
        self._child: dict[str, tuple[RequestGroup, int]] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._groups

    def __len__(self) -> int:
        return len(self._groups)

    def new_group(
        self,
        request_id: str,
        prompt: str | None,
        ids: list[int],
        params: SamplingParams,
        now: float,
    ) -> RequestGroup:
        """The group of ``params.n`` scheduler requests for one prompt (not yet registered).

        Completion ``i`` of a seeded request gets seed ``seed + i``, so the n are distinct but
        reproducible.
        """
        completions = []
        for i in range(params.n):
            child_params = params
            if params.n > 1:
                seed = None if params.seed is None else params.seed + i
                child_params = replace(params, n=1, seed=seed)
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(child_id, ids, child_params, now, self.eos_token_ids)
            detok = IncrementalDetokenizer(self.tokenizer, child_params.stop, ids)
            completions.append(_Completion(req, detok, [] if params.logprobs is not None else None))
        return RequestGroup(request_id, prompt, ids, params.output_kind, completions)

    def register(self, group: RequestGroup) -> None:
        """Start tracking ``group`` (after the policy accepted all its requests)."""
        self._groups[group.request_id] = group
        for i, c in enumerate(group.completions):
            self._child[c.request.request_id] = (group, i)

    def groups(self) -> list[RequestGroup]:
        """Every group still tracked, in arrival order."""
        return list(self._groups.values())

    def group(self, request_id: str) -> RequestGroup | None:
        """The group of a client request id."""
        return self._groups.get(request_id)

    def group_of(self, child_id: str) -> RequestGroup | None:
        """The group a scheduler request belongs to."""
        entry = self._child.get(child_id)
        return entry[0] if entry is not None else None

    def add_tokens(
        self, sampled: Mapping[str, int], logprobs: Mapping[str, TokenLogprobs]
    ) -> tuple[list[str], dict[str, RequestGroup]]:
        """Feed each request's new token to its detokenizer.

        Returns:
            The scheduler requests a stop string ended now (the engine finishes them with
            STOP) and the groups that progressed.
        """
        stopped: list[str] = []
        touched: dict[str, RequestGroup] = {}
        for rid, token in sampled.items():
            group, index = self._child[rid]
            comp = group.completions[index]
            touched[group.request_id] = group
            comp.detok.add_token(token)
            if comp.logprobs is not None and rid in logprobs:
                comp.logprobs.append(logprobs[rid])
            sp = comp.request.sampling_params
            if token in sp.stop_token_ids and comp.request.num_output_tokens >= sp.min_tokens:
                comp.stop_reason = token  # it stopped here (a static batch may hold it a while)
            elif not comp.request.is_finished and comp.detok.stopped_by is not None:
                comp.stop_reason = comp.detok.stopped_by
                stopped.append(rid)
        return stopped, touched

    def outputs(self, groups: Iterable[RequestGroup]) -> list[RequestOutput]:
        """The outputs of ``groups`` (per their kind); forgets the groups that finished."""
        outs = []
        for g in groups:
            out = self._output(g)
            if out is not None:
                outs.append(out)
        return outs

    def _output(self, group: RequestGroup) -> RequestOutput | None:
        done = group.finished
        if done:
            del self._groups[group.request_id]
            for c in group.completions:
                self._child.pop(c.request.request_id, None)
        elif group.kind is RequestOutputKind.FINAL_ONLY:
            return None
        delta = group.kind is RequestOutputKind.DELTA
        outs = [self._completion(i, c, delta) for i, c in enumerate(group.completions)]
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=outs,
            finished=done,
            # Only at the end: timings are O(tokens) to build, and read only once finished.
            timings=[c.request.timings() for c in group.completions] if done else [],
            num_cached_tokens=min(c.request.num_cached_tokens or 0 for c in group.completions),
        )

    @staticmethod
    def _completion(index: int, c: _Completion, delta: bool) -> CompletionOutput:
        req = c.request
        if req.is_finished:
            c.detok.flush()
        ids = req.output_token_ids
        new_ids = ids[c.sent_tokens :]  # O(new tokens), whatever the kind
        new_text = c.detok.delta(final=req.is_finished)
        lps = c.logprobs
        if delta:
            text, token_ids = new_text, new_ids
            logprobs = lps[c.sent_logprobs :] if lps is not None else None
        else:
            text, token_ids = c.detok.text, list(ids)
            logprobs = list(lps) if lps is not None else None
        c.sent_tokens = len(ids)
        c.sent_logprobs = len(lps) if lps is not None else 0
        return CompletionOutput(
            index=index,
            text=text,
            token_ids=token_ids,
            finish_reason=req.finish_reason.value if req.finish_reason else None,
            stop_reason=c.stop_reason,
            logprobs=logprobs,
            delta_text=new_text,
            delta_token_ids=new_ids,
            error=req.error,
            num_tokens=len(ids),
        )
