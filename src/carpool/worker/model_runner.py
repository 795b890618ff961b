"""Run one scheduled step: build the batch, run the model once, sample.

The runner owns the device-side state: the model, the paged KV cache tensors and the per-request
random generators. It reads requests (for sampling parameters and token history) but never
changes their status: that is the scheduling policy's job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from carpool.model import (
    decode_stack,
    fused_ops,
    kernel_build,
    paged_attention,
    pages,
    quant,
    vnni_linear,
)
from carpool.model.kv_quant import resolve_kv_dtype
from carpool.model.layers import Linear, prepack_linears
from carpool.model.quant import QuantizedLinear
from carpool.request import Request
from carpool.scheduling.output import BlockTables, ScheduledChunk, SchedulerOutput
from carpool.worker import heap
from carpool.worker.batch import DecodeInputs, ModelInput, build_ragged_batch, generated_row
from carpool.worker.padded import build_padded_batch
from carpool.worker.sampler import Sampler, SamplingRow, TokenLogprobs, argmax_only
from carpool.worker.sampler_guard import SamplingGuard

if TYPE_CHECKING:
    from carpool.structured.processor import LogitsProcessor


@dataclass(frozen=True)
class ModelRunnerOutput:
    """One new token per request that sampled this step (and its logprobs when asked).

    ``num_padded_tokens``: pad token slots the layout computed this step (0 when ragged).
    ``failed``: requests whose row could not be sampled (request id -> why); they got no token
    and must fail, alone (see ``SamplingGuard``).
    """

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    num_padded_tokens: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def prepare_model(model: nn.Module, device: str | torch.device) -> None:
    """Make a loaded model ready for fast steps on ``device`` (the runner does it at start;
    benchmarks that drive a model directly call it too).

    On the CPU: build (first time on this machine) or load the paged decode kernel and the
    fused norm/activation operators and the VNNI linear kernel now, not in the middle of the
    first request's first step; pack bf16 linear weights once (see ``layers.Linear``); move
    the weights of a model with VNNI-packed linears onto huge pages in read order
    (``pages.move_weights``); lay the layers out for the one-call decode stack
    (``carpool.model.decode_stack``).
    """
    if torch.device(device).type == "cpu":
        paged_attention.warm_up()
        fused_ops.load()
        vnni_linear.load()
        prepack_linears(model)  # trims the heap as it goes and at the end
        # After packing (the final bytes), before the plan's pointers.
        if weights_want_huge_pages(model):
            pages.move_weights(model)
        arena = pages.weight_arena(model)
        if arena is not None and pages.huge_page_bytes(arena) >= arena.nbytes // 2:
            vnni_linear.stream_from_huge_pages(arena)
        decode_stack.attach(model)  # after packing: the plan refers to the packed weights


def weights_want_huge_pages(model: nn.Module) -> bool:
    """Whether ``prepare_model`` moves ``model``'s weights onto huge pages (``pages.move_weights``)
    on this CPU: where it measured faster.

    A model whose linears run on the VNNI kernel: 1.12-1.15x at batch 1 on small (Zen 4;
    BENCHMARKS.md, issue 11, fourteenth pass). A weight-only quantized model on a CPU whose
    kernels take their AVX2 loops (no AVX-512): on a Zen 2 the int8 tiles read a Q8_0 model's
    codes 1.2-1.5x faster at one row from huge pages (the int4 loop level), and a Q8_0 model and
    SmolLM2 (Q4_1, a Q8_0 head) decode 1.05-1.13x faster at batch 1 (medians 1.07x and 1.10x),
    the peak RSS unchanged (twenty-sixth pass). On an Intel Xeon with AMX, whose int4/int8
    kernels multiply on tiles, SmolLM2's decode step in the engine 1.04-1.06x at batch 16 and
    level at one (``ab_engine_env.py --env CARPOOL_WEIGHT_PAGES=0``, four runs; the model's own
    steps, ``ab_step.py --before pages``, 1.06-1.16x), a Q8_0 model's 1.02-1.03x, the peak RSS
    7 MiB lower (forty-sixth pass). On the Zen 4 such a model's int4/int8 kernels were not
    faster, and its peak RSS was 5-15 MiB higher: left in place there.
    """
    if any(isinstance(m, Linear) and m.layout == "vnni" for m in model.modules()):
        return True
    kernels_gain = torch.backends.cpu.get_cpu_capability() == "AVX2" or kernel_build.amx_tiles()
    return kernels_gain and any(isinstance(m, QuantizedLinear) for m in model.modules())


class ModelRunner:
    """Executes ``SchedulerOutput``s against a model and its paged KV cache.

    ``layout`` chooses how a step's sequences are laid out: ``ragged`` (packed end to end) or
    ``padded`` (a rectangle; see ``carpool.worker.padded``). The padded layout reserves one
    scratch block past the ``num_blocks`` the scheduler hands out, for the pad tokens' K/V.
    ``kv_dtype``: the cache's dtype, or an ``EngineConfig.kv_cache_dtype`` name (``"auto"``:
    the model's dtype; ``"int8"``: int8 rows with a scale each, see ``carpool.model.kv_quant``);
    None is ``"auto"``.
    """

    def __init__(
        self,
        model: nn.Module,
        num_blocks: int,
        block_size: int,
        device: str = "cpu",
        kv_dtype: torch.dtype | str | None = None,
        layout: str = "ragged",
        logits_processor: LogitsProcessor | None = None,
    ) -> None:
        assert layout in ("ragged", "padded"), f"unknown layout {layout!r}"
        self.model = model
        self.block_size = block_size
        self.device = device
        self.layout = layout
        self.scratch_block = num_blocks  # only allocated (and used) by the padded layout
        model_dtype = next(model.parameters()).dtype
        if kv_dtype is None or isinstance(kv_dtype, str):
            dtype = resolve_kv_dtype(kv_dtype or "auto", model_dtype)
        else:
            dtype = kv_dtype
        self.kv_caches: list[torch.Tensor] = model.allocate_kv_cache(
            num_blocks + (layout == "padded"), block_size, dtype, device
        )
        prepare_model(model, device)
        self.sampler = Sampler()
        # logit_bias and structured-output masks, applied to the batch's logits before sampling.
        self.logits_processor = logits_processor
        # One request's bad row fails that request only, not the batch.
        self.sampling = SamplingGuard(self.sampler, logits_processor)
        self._generators: dict[str, torch.Generator] = {}
        # Every scheduled request's block table, kept here from the per-step deltas so the
        # hand-off costs O(new blocks), not O(context), per step.
        self.block_tables = BlockTables()
        self._inference_mode = torch.inference_mode()
        # A pure decode step's inputs, patched from step to step (the CPU's; elsewhere the
        # tensors are copies on the device, made anew).
        self._decode_inputs = DecodeInputs() if torch.device(device).type == "cpu" else None
        # The batch builders' kernel_below (paged_attention.prompt_kernel_positions): fixed for
        # the engine, as a row's path must follow from its position alone.
        c = model.config
        self.kernel_below = paged_attention.prompt_kernel_positions(
            self.kv_caches[0], model_dtype, c.num_attention_heads, c.num_key_value_heads
        )
        # The builders' wide_from (quant.wide_prompt_from): a prompt's rows through the
        # quantized linears' widened weight, fixed for the engine as kernel_below is.
        self.wide_from = quant.wide_prompt_from(model, device)
        # Mixed steps run as a pure decode step and the rest (_ragged_parts); tests count them.
        self.num_split_steps = 0

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes actually allocated for the KV cache."""
        return sum(t.numel() * t.element_size() for t in self.kv_caches)

    def _generator(self, request: Request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        gen = self._generators.get(request.request_id)
        if gen is None:
            # On the model's device: the sampler draws its noise where the logits are.
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[request.request_id] = gen
        return gen

    def release(self, request_id: str) -> None:
        """Forget a finished request's generator, block table (and grammar state)."""
        self._generators.pop(request_id, None)
        self.block_tables.drop(request_id)
        if self.logits_processor is not None:
            self.logits_processor.release(request_id)

    def execute(
        self, output: SchedulerOutput, requests: Mapping[str, Request]
    ) -> ModelRunnerOutput:
        """Run the model on ``output.chunks`` and sample for every ``needs_sample`` chunk."""
        # One inference_mode object for every step (the decorator made a new one per call);
        # a runner's steps run one at a time, so it is never entered twice at once.
        with self._inference_mode:
            self.block_tables.apply(output)
            if output.is_empty:
                return ModelRunnerOutput()
            tables = self.block_tables.tables_of(output.chunks)
            # Generated tokens' rows take the paged decode kernel wherever they are computed, in
            # either layout.
            prompts = [len(requests[c.request_id].prompt_token_ids) for c in output.chunks]
            if self.layout == "padded":
                inputs = [
                    build_padded_batch(
                        output.chunks,
                        tables,
                        self.block_size,
                        self.scratch_block,
                        output.num_idle_seats,
                        self.device,
                        prompts,
                        kernel_below=self.kernel_below,
                        wide_from=self.wide_from,
                    )
                ]
            else:
                inputs = [
                    build_ragged_batch(
                        chunks,
                        tabs,
                        self.block_size,
                        self.device,
                        proms,
                        reuse=reuse,
                        kernel_below=self.kernel_below,
                        wide_from=self.wide_from,
                    )
                    for chunks, tabs, proms, reuse in self._ragged_parts(
                        output.chunks, tables, prompts
                    )
                ]
            num_padded = sum(i.num_tokens for i in inputs) - output.num_batched_tokens
            if len(inputs) == 1:
                return self._forward_and_sample(inputs[0], requests, num_padded)
            outs = [self._forward_and_sample(inp, requests) for inp in inputs]
            return ModelRunnerOutput(
                sampled={k: v for o in outs for k, v in o.sampled.items()},
                logprobs={k: v for o in outs for k, v in o.logprobs.items()},
                num_padded_tokens=num_padded,
                failed={k: v for o in outs for k, v in o.failed.items()},
            )

    def _ragged_parts(
        self, chunks: list[ScheduledChunk], tables: list[list[int]], prompts: list[int]
    ) -> list[tuple[list[ScheduledChunk], list[list[int]], list[int], DecodeInputs | None]]:
        """The step's chunks as one batch, or a mixed step as two: its generated tokens' rows as
        a pure decode step of their own (the one-call decode stack's), then the other chunks.

        Why: a prompt's chunk beside more than 32 decoding sequences took the Python layers for
        all of them (the stack takes pure decode steps only): 79.0 ms for a 64-token prompt
        beside 63 of the default model's sequences, against 38.6 + 32.9 apart (BENCHMARKS.md,
        issue 11, forty-seventh pass); at up to 32 the mixed step costs no more than its parts.
        Every row's numbers follow from the row alone (its position picks its kernels), so the
        two steps compute the same bits as the one (tested). (chunks, tables, prompt lengths,
        the reusable decode inputs) per part."""
        whole = [(chunks, tables, prompts, self._decode_inputs)]
        if len(chunks) <= decode_stack.EXACT_ROWS:  # too few to split: no scan (batch 1's step)
            return whole
        decode = [
            i for i, c in enumerate(chunks) if c.needs_sample and generated_row(c, prompts[i])
        ]
        plan = getattr(self.model, "decode_plan", None)
        if len(decode) == len(chunks) or not decode_stack.splits_mixed(plan, len(decode)):
            return whole
        self.num_split_steps += 1
        taken = set(decode)
        rest = [i for i in range(len(chunks)) if i not in taken]
        return [
            (
                [chunks[i] for i in part],
                [tables[i] for i in part],
                [prompts[i] for i in part],
                self._decode_inputs if part is decode else None,
            )
            for part in (decode, rest)
        ]

    def _forward_and_sample(
        self, inp: ModelInput, requests: Mapping[str, Request], num_padded: int = 0
    ) -> ModelRunnerOutput:
        """One forward over ``inp`` and a token for each of its sampling rows; ``num_padded``
        goes into the output as it is."""
        logits = self.model(
            inp.input_ids, inp.positions, inp.meta, self.kv_caches, inp.logits_indices
        )
        # A prefill's freed temporaries back to the OS (see carpool.worker.heap).
        heap.release_after(inp.num_tokens, self.device)
        if not inp.sample_request_ids:
            return ModelRunnerOutput(num_padded_tokens=num_padded)
        reqs = [requests[rid] for rid in inp.sample_request_ids]
        if all(argmax_only(r.sampling_params) for r in reqs):
            # Every row greedy with nothing to apply: the argmax alone, without the sampler's
            # per-row objects (the same tokens). This Python runs right after the forward,
            # where each call costs several times its warm price (BENCHMARKS.md, issue 11,
            # thirty-second pass).
            tokens = self.sampler.greedy(logits)
            return ModelRunnerOutput(
                sampled=dict(zip(inp.sample_request_ids, tokens, strict=True)),
                num_padded_tokens=num_padded,
            )
        rows = [
            SamplingRow(
                r.sampling_params, r.prompt_token_ids, r.output_token_ids, self._generator(r)
            )
            for r in reqs
        ]
        result = self.sampling(logits, inp.sample_request_ids, rows)
        return ModelRunnerOutput(
            sampled=result.sampled,
            logprobs=result.logprobs,
            num_padded_tokens=num_padded,
            failed=result.failed,
        )
