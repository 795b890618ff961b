"""Weight-only quantized linear layers (int8 per channel, int4 per group of 32) and their swap-in.

The model keeps its dtype (residual stream, norms, attention); a quantized matmul computes in
the *kernel dtype* (``kernel_dtype``: bfloat16, float16 for float16 models): its input is cast
to it, its scales are stored in it, and its output is cast back. Why not float32: both CPU
kernels' float32 paths are scalar loops, 15-100x slower than their bfloat16 paths on the same
weights (``benchmarks/quant_kernels.py --dtypes float32,bfloat16``, BENCHMARKS.md), which made a
float32 model with quantized weights 10x slower than the same model dense. A float32 model with
quantized weights is thus what llama.cpp runs: float32 activations between the matmuls, narrower
inputs to them (llama.cpp even quantizes them to 8 bits). Kernels (chosen by
``benchmarks/quant_kernels.py``, see BENCHMARKS.md):

- int8: ``torch._weight_int8pack_mm`` (CPU): an int8 ``[N, K]`` weight, one scale per output
  channel; ``y = (x @ q.T) * scale``.
- int4: ``torch._weight_int4pack_mm_for_cpu`` (CPU) or ``torch._weight_int4pack_mm`` (CUDA,
  its own packing): codes ``q`` in 0..15, a ``(scale, zero)`` pair per group of ``group_size``
  inputs and output channel; ``w = (q - 8) * scale + zero``. llama.cpp's Q4_1 block
  ``w = d * q + m`` is exactly ``scale = d, zero = m + 8 d``; Q4_0's ``w = d * (q - 8)`` is
  ``scale = d, zero = 0``.

Other devices (and int8 on CUDA, which has no such op) fall back to widening the weight per
call: correct everywhere, fast where a kernel exists.

The same storage also serves embedding rows (``rows``), so a tied head and embedding share one
quantized tensor.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from carpool.model import fused_ops, row_paths, vnni_linear
from carpool.model.layers import MLP_MIN_CHUNK_ROWS, linear_bucketed, widened, widening_once
from carpool.model.stored_tensor import StoredTensor

QUANTIZATION_METHODS = ("int8", "int4")
GROUP_SIZE = 32
# The CPU int4 packing interleaves blocks of output rows (``int4_row_block``: 64 or 32); weights
# are padded to a multiple of 64 (of either) so that every row can be read back for an
# embedding lookup and every block is whole.
_INT4_ROW_PAD = 64
# Above this many input rows (tokens in the step) the weight-only kernels, whose cost grows
# linearly with the rows, lose to widening the weight once and running the dense GEMM (AMX /
# oneDNN bf16) on it: prefill chunks take that path, decode steps the kernels. Crossovers
# measured by benchmarks/quant_kernels.py (see BENCHMARKS.md); int4 widens ~3x slower.
INT8_WIDEN_ABOVE_ROWS = 16
INT4_WIDEN_ABOVE_ROWS = 128
# GatedMLP's row chunks must each take the kernel the whole step would (see MLP_MIN_CHUNK_ROWS):
# every row limit is at most a chunk's rows, or none (fused_ops.ANY_ROWS: every count).
assert (
    max(
        limit
        for limit in (
            INT8_WIDEN_ABOVE_ROWS,
            INT4_WIDEN_ABOVE_ROWS,
            fused_ops.INT4_GEMV_MAX_ROWS,
            fused_ops.INT8_GEMV_MAX_ROWS,
            fused_ops.INT8_GEMV_LARGE_MAX_ROWS,
            fused_ops.INT8_DOT_MAX_ROWS,
        )
        if limit != fused_ops.ANY_ROWS
    )
    <= MLP_MIN_CHUNK_ROWS
), "an MLP chunk could take another quantized kernel than its whole step"


# How many of a row's largest logits ``QuantizedLinear.logits`` recomputes in float32: far more
# than the entries a bf16 rounding of the output (2^-8 relative) can carry past the true
# maximum, so the argmax and the head of the distribution are exact.
RESCORE_TOP_K = 64


# The prompt position from which a prompt's rows take the weight widened into vnni_linear's
# layout and multiplied on AMX tiles (row_paths), where that path applies (wide_prompt_from).
# On the AMX Xeon of issue 11's forty-first pass, SmolLM2-135M's four layer matrices (int4;
# benchmarks/quant_kernels.py): the kernels 0.11 / 0.78 / 1.52 / 18.2 ms at 1 / 16 / 32 / 512
# rows, widened and on tiles 0.45 / 0.47 / 0.55 / 2.57 (~0.37 of it the widening, paid once a
# step; since the forty-second pass each block widened inside the loop: 0.32 / 0.32 / 0.36 /
# 2.15 ms, ~0.27 of it the widening). One prompt's step (benchmarks/wide_rows.py, SmolLM2 Q4_1,
# against no wide rows; the forty-first pass):
#   from 1: 0.22x / 0.50x / 0.86x at 2 / 8 / 16 tokens, 1.01x at 20, 1.43x / 1.77x / 2.77x /
#           3.24x at 32 / 40 / 128 / 512;
#   from 16: 1.00x to 16 tokens, 0.65x / 0.95x at 20 / 32 (such steps leave the decode stack,
#           which has only the kernels), 1.20x / 2.05x / 2.94x at 40 / 128 / 512;
#   from 32: 1.00x to 32 tokens, 0.86x at 40, 1.59x / 2.68x at 128 / 512.
# Every cutoff leaves a window of prompts whose few wide rows pay for the widening; from 1 it is
# the shortest prompts (2-16 tokens, at most +21 ms there), and every prompt from 20 tokens on
# gains the most (a chat turn with SmolLM2's system prompt is 36-42 tokens). With 16 prompts a
# step: from 1 1.79x / 2.67x / 3.14x at 8 / 20 / 40 tokens, from 16 1.02x / 1.01x / 1.64x.
# From 0 (every prompt row; the forty-second pass, fused products): a prompt alone in its step
# then takes no kernel call at all (its first row's cost ~3.4 ms a step for SmolLM2, the int4
# kernel at one row and the split around it): 1.17x / 1.19x / 1.19x / 1.13x / 1.06x the step
# from 1 at 2 / 8 / 16 / 40 / 128 tokens, level at 512; a one-token prompt alone pays the
# widening (a decode step's form before). Since the forty-third pass (int4_gemv on AMX tiles
# at every row count) a prompt alone of up to ~48 tokens is faster through the kernels (from 0:
# 0.40x / 0.74x / 1.03x / 1.26x / 1.50x / 1.60x at 8 / 32 / 48 / 64 / 128 / 512 tokens against
# none widened); a later cutoff pays both paths in one step (from 32: 0.75x at 48 tokens), so 0
# stays. Since the forty-ninth pass that holds for int8 layers only (WIDE_INT4_PROMPTS).
WIDE_PROMPT_FROM = 0
# Whether an int4 layer's prompt rows take the widened weight too (Int4Linear.takes_wide_rows;
# CARPOOL_WIDE_INT4_PROMPTS=1 / 0 overrides). No: since int4_gemv's 16-row tiles and one-pass
# inputs (issue 11, forty-seventh and forty-eighth passes) the kernels beat the widening (a
# fixed ~11 ms a step for SmolLM2, the whole weight widened) up to ~160 prompt tokens in a
# step, and a cutoff by position makes the rows past it pay that fixed cost however few they
# are (a follow-up turn's new tokens after a prefix-cache hit, say). SmolLM2 Q4_1 through the
# engine (benchmarks/int4_prompt_rows.py, max_tokens 1, 2 threads, the forty-ninth pass; the
# kernels against every prompt row widened): 2.28x / 1.33x / 1.07x at 8 / 40 / 128-token
# prompts, a follow-up turn of 24 new tokens after 64 / 400 cached 1.44x / 1.12x, `carpool
# serve` at 4 concurrent requests TTFT p50 1.2-1.3x lower (at 64 level); the cost: 0.87-0.96x
# for a fresh prompt of 256 to 2,048 tokens, 0.85-0.90x for an offline batch's prefill of many
# short prompts in one step (512-2,048 rows: there CARPOOL_WIDE_INT4_PROMPTS=1 pays). An int8
# layer's kernels have no tiles past 16 rows: 0.58x / 0.36x at 40 / 128 tokens without the
# widening, so int8 layers keep it.
WIDE_INT4_PROMPTS = False
ENV_WIDE_INT4_PROMPTS = "CARPOOL_WIDE_INT4_PROMPTS"
# Where prompts take the widened weight at all: None: where vnni_linear multiplies on AMX tiles
# (elsewhere it was not measured to pay: the int4 kernel decodes a group once for many rows on
# an AVX-512 BF16 CPU without AMX, and AVX2 CPUs take the kernels at every row count); True /
# False: forced (tests take the path on any CPU: vnni_linear's loops give a row's bits alone).
WIDE_PROMPT_HERE: bool | None = None
# CARPOOL_WIDE_PROMPT_FROM=n overrides WIDE_PROMPT_FROM where the path applies (a position: 0,
# every prompt row); "off" turns it off.
ENV_WIDE_PROMPT_FROM = "CARPOOL_WIDE_PROMPT_FROM"


# Float32 rows up to which the wide products take them as they are and write float32 rows
# (from inside vnni_linear's loop); past them a cast in, the bf16 product and a cast out, the
# same values. SmolLM2's prompt steps (benchmarks/wide_rows.py --whole-matrix) 1.06-1.10x at
# 8-128 rows, level at 256-512, but 0.93x at 1,024: there the float32 rows written from the
# loop (12 MB for a gate/up product, out of cache) cost more than bf16 rows and a streaming cast.
WIDE_FLOAT32_ROWS = 512


def wide_int4_prompts() -> bool:
    """Whether int4 layers made now take a step's wide rows (``WIDE_INT4_PROMPTS``, or
    ``CARPOOL_WIDE_INT4_PROMPTS`` = 1 / 0)."""
    env = os.environ.get(ENV_WIDE_INT4_PROMPTS, "").strip()
    if not env:
        return WIDE_INT4_PROMPTS
    if env not in ("0", "1"):
        raise ValueError(f"{ENV_WIDE_INT4_PROMPTS}: expected 1 or 0, got {env!r}")
    return env == "1"


def wide_prompt_from(model: nn.Module, device: torch.device | str) -> int | None:
    """The prompt position from which a step's prompt rows take the quantized linears' widened
    weight (``row_paths``; the batch builders' ``wide_from``), fixed for an engine as a row's
    path must follow from the row alone; None: never (no quantized layer that takes wide rows
    (``QuantizedLinear.takes_wide_rows``: int8 ones, int4 ones where ``wide_int4_prompts``),
    another device or dtype, a CPU where it is not taken, ``vnni_linear`` not loaded, or
    turned off)."""
    here = WIDE_PROMPT_HERE
    if here is None:
        here = vnni_linear.available(device) and vnni_linear.amx()
    if not here or torch.device(device).type != "cpu" or not vnni_linear.loaded():
        return None
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not linears or any(
        kernel_dtype(m.out_dtype) != torch.bfloat16 or not m.widens_to_vnni() for m in linears
    ):
        return None
    # The vocabulary head runs after the layers, outside any step's row paths.
    head = getattr(model, "lm_head", None)
    if not any(m.takes_wide_rows() for m in linears if m is not head):
        return None
    env = os.environ.get(ENV_WIDE_PROMPT_FROM, "").strip()
    if not env:
        return WIDE_PROMPT_FROM
    if env == "off":
        return None
    if not env.isdigit():
        raise ValueError(
            f"{ENV_WIDE_PROMPT_FROM}: expected a position (0: every prompt row) or off, got {env!r}"
        )
    return int(env)


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype quantized matmuls compute in and keep scales in, for a model in ``dtype``."""
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


class QuantizedLinear(nn.Module):
    """Common surface of the weight-only quantized linears: ``forward``, ``rows``, ``dequantize``.

    Subclasses hold their weight in buffers (never parameters: nothing here is trained), so
    ``model.parameters()`` keeps listing only the floating-point tensors.
    """

    in_features: int
    out_features: int
    bias: torch.Tensor | None
    # The model's dtype: what ``rows`` and ``dequantize`` return (forward returns its input's).
    out_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` in ``x``'s dtype: each row through the kernels over the codes
        (``_kernel_forward``), but the step's wide rows (``row_paths.current()``: its prompts'
        rows) through the widened weight (``_wide_product``)."""
        wide = row_paths.current()
        if wide is None or not self.takes_wide_rows():
            return self._kernel_forward(x)
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        assert x2.shape[0] == wide.rows, (
            f"{type(self).__name__}: {x2.shape[0]} rows, but the step's wide rows are of "
            f"{wide.rows}"
        )
        if wide.every_row:
            y = self._finish(self._wide_product(x2), x2)
        else:
            # Each kind's rows in one call (a decode step's rows share one pass over the codes),
            # each result copied into its rows of the output (the wide rows' cast to x's dtype
            # in the same copy, then their bias, as _finish adds it).
            kernel, kernel_index = wide.others, wide.others_index
            y = x2.new_empty(x2.shape[0], self.out_features)
            _put_runs(
                y, kernel, kernel_index, self._kernel_forward(_take(x2, kernel, kernel_index))
            )
            if len(wide.runs) == 1:
                # One run (a prompt's rows beside decode rows, say): its product written
                # straight into its rows of the output, then their bias (a float32 model's casts
                # and copy around it gone: SmolLM2's prompt steps 1.06-1.10x at 8-128 tokens,
                # level at 256-512, where writing the float32 rows costs what the copy did).
                a, b = wide.runs[0]
                rows = self._wide_product(x2[a:b], out=y[a:b])
                if self.bias is not None:
                    rows.add_(self.bias)
            else:
                y_wide = self._wide_product(_take(x2, wide.runs, wide.index))
                _put_runs(y, wide.runs, wide.index, y_wide, self.bias)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` through the kernels over the codes (or torch's), whatever the rows."""
        raise NotImplementedError

    def _wide_product(self, x2: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x2 @ W.T`` (``[rows, out_features]``, no bias) for ``[rows, in_features]`` in
        ``x2``'s dtype (the model's: bf16, or float32 rounded to bf16 first), into ``out`` where
        given, through the weight widened to bf16 into ``vnni_linear``'s layout and its loops,
        whose rows' bits do not depend on the rows beside them: each 64-column block widened
        into a thread's buffer as the loop reaches it (``vnni_linear.linear_int4`` / ``_int8``),
        the widened matrix never in memory; the sums rounded to bf16."""
        kd = self._kernel_dtype()
        assert kd == torch.bfloat16, f"wide rows need bf16 scales, got {kd}"
        assert x2.dtype in (torch.bfloat16, torch.float32), f"wide rows of {x2.dtype}"
        if x2.dtype == torch.float32 and x2.shape[0] > WIDE_FLOAT32_ROWS:
            # Many float32 rows: the bf16 product, then one cast (the same values).
            y = self._vnni_product(x2.to(torch.bfloat16), None).float()
            return y if out is None else out.copy_(y)
        return self._vnni_product(x2 if x2.is_contiguous() else x2.contiguous(), out)

    def _kernel_dtype(self) -> torch.dtype:
        """The dtype this layer's scales are kept in (``kernel_dtype`` of the model's)."""
        raise NotImplementedError

    def _vnni_product(self, xk: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """``_wide_product`` of a contiguous ``xk``."""
        raise NotImplementedError

    def widens_to_vnni(self) -> bool:
        """Whether ``_wide_product`` applies to this layer's shape (an even ``in_features``)."""
        return self.in_features % 2 == 0

    def takes_wide_rows(self) -> bool:
        """Whether a step's wide rows (``row_paths``) take ``_wide_product`` here; if not, every
        row takes the kernels. Fixed for the layer, so a row's path still follows from the row
        alone."""
        return True

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized weight rows ``[*ids.shape, in_features]`` in ``out_dtype`` (an embedding
        lookup), computed in float32 from the codes and the stored scales."""
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The whole weight ``[out_features, in_features]`` in ``out_dtype``."""
        return self.rows(torch.arange(self.out_features, device=self._device()))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` as a vocabulary head: ``[R, out_features]`` float32 logits.

        The kernels return bf16, whose rounding (0.125 at a logit of 25) can tie or swap the top
        tokens of a float32 model: SmolLM2-135M's first answer token to "What is the capital of
        France?" leads the runner-up by 0.08. So for float32 inputs each row's
        ``RESCORE_TOP_K`` largest logits are recomputed exactly from the dequantized rows in
        float32 (a ``[R, k, K]`` gather: 64 rows of 576 for SmolLM2, ~1% of the head's reads).
        Where a subclass's kernel gives every logit in float32 itself (``_kernel_logits``),
        nothing is rescored.
        """
        y = self._kernel_logits(x)
        if y is not None:
            return y if self.bias is None else y + self.bias.float()
        y = self(x).float()
        if x.dtype != torch.float32:
            return y
        top = y.topk(min(RESCORE_TOP_K, self.out_features), dim=-1).indices  # [R, k]
        exact = self._exact_logits_at(x, top)  # [R, k]
        if self.bias is not None:
            exact = exact + self.bias[top].float()
        return y.scatter_(1, top, exact)

    def _kernel_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits ``[R, out_features]`` (bias not added) straight from a kernel that
        rounds nothing, where one takes ``x``; None otherwise (``logits`` rescores)."""
        return None

    def _exact_logits_at(self, x: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[R, k]`` of ``x`` ``[R, in_features]`` at the columns ``top``."""
        return torch.bmm(self.rows(top).float(), x.unsqueeze(-1)).squeeze(-1)

    def _device(self) -> torch.device:
        return next(self.buffers()).device

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Cast the kernel's ``[rows, N]`` output back to the input's dtype, add the bias, and
        restore the input's leading dimensions."""
        # Each op skipped where it would do nothing: at batch 1 a layer's four linears are
        # ~30 dispatches, and a no-op cast or reshape costs as much as a real one.
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        y = y if self.bias is None else y + self.bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _widened_product(
        self,
        xk: torch.Tensor,
        make: Callable[[], torch.Tensor],
        make_packed: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``xk @ W.T`` (``[rows, out_features]`` in ``xk``'s dtype) for ``W = make()``, this
        layer's weight widened to ``xk``'s dtype, widened once per ``widen_once`` block.

        On an AVX2 CPU without a bf16 GEMM (``fused_ops.bf16_emulated``) the widened weight goes
        into the VNNI layout (``vnni_linear.pack``, one pass) for ``vnni_linear``'s six-row
        float32 FMA loops: 1.3-1.4x ``bf16_linear`` on the plain widened weight at 64-512 rows
        of small's layer matrices, the packing included (BENCHMARKS.md, issue 11,
        twenty-seventh pass). ``make_packed``: the widened weight made in that layout (None:
        pack ``make()``). Elsewhere the dense GEMM on the plain widened weight."""
        if (
            xk.dtype == torch.bfloat16
            and fused_ops.bf16_emulated()
            and vnni_linear.available(xk.device)
            and self.in_features % 2 == 0
        ):
            pack = make_packed or (lambda: vnni_linear.pack(make()))
            packed = widened(self, xk.dtype, pack, layout="vnni")
            return vnni_linear.linear(xk, packed, None, self.out_features)
        return linear_bucketed(xk, widened(self, xk.dtype, make))

    @staticmethod
    def _kernel_input(x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x2`` (``[rows, in_features]``) contiguous in the kernel's ``dtype``."""
        x2 = x2 if x2.dtype == dtype else x2.to(dtype)
        return x2 if x2.is_contiguous() else x2.contiguous()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Linear(QuantizedLinear):
    """``y = x @ (q * scale[:, None]).T + bias`` with an int8 ``q`` and one scale per row."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype | None = None,
    ):
        """``dtype``: the model's (default: ``scales``'); scales are kept in its kernel dtype."""
        super().__init__()
        assert qweight.dtype == torch.int8 and qweight.dim() == 2, qweight.dtype
        self.out_features, self.in_features = qweight.shape
        self.out_dtype = dtype or scales.dtype
        self.register_buffer("qweight", qweight.contiguous())  # [N, K] int8
        # [N], rounded once from float32 (a Q8_0 file's re-rounded scales arrive in float32).
        self.register_buffer("scales", scales.float().to(kernel_dtype(self.out_dtype)).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(self.out_dtype))

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> Int8Linear:
        """Symmetric per-output-channel quantization: ``scale = max|w| / 127`` per row."""
        return cls(*int8_quantize(weight, dtype), bias, dtype)

    def _kernel_dtype(self) -> torch.dtype:
        return self.scales.dtype

    def _vnni_product(self, xk: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        # The codes widened (exact in bf16) a block at a time inside vnni_linear's loop (up to
        # 16 rows on AMX the codes as they lie, the same bits), the row scales on the float32
        # sums before their one rounding there (as int8_dot's); in a chunked MLP the whole
        # matrix widened once for its chunks (the same bits).
        if widening_once():
            packed = widened(
                self, torch.bfloat16, lambda: vnni_linear.pack_int8(self.qweight), "vnni"
            )
            return vnni_linear.linear_packed(xk, packed, self.out_features, self.scales, out)
        return vnni_linear.linear_int8(xk, self.qweight, self.scales, out)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Up to fused_ops.INT8_GEMV_MAX_ROWS rows on the CPU: the fused kernel (it prefetches
        # the rows: 1.18-1.5x torch's on a vocabulary head not in cache; the same sums, in
        # another order) for a float32 x as it is, or a bf16 x times a large enough weight;
        # past them, up to fused_ops.INT8_DOT_MAX_ROWS, its bf16 dot-product form where the
        # CPU has one; torch's takes the rest.
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = fused_ops.int8_gemv(x2, self.qweight, self.scales)
        if y is None:
            y = fused_ops.int8_dot(x2, self.qweight, self.scales)
        if y is not None:
            return self._finish(y, x)
        kd = self.scales.dtype
        xk = self._kernel_input(x2, kd)
        if xk.shape[0] <= INT8_WIDEN_ABOVE_ROWS and xk.device.type == "cpu":
            y = torch._weight_int8pack_mm(xk, self.qweight, self.scales)
        else:  # widen the codes (exact in bf16/fp16); the row scales on the output
            y = self._widened_product(xk, lambda: self.qweight.to(kd)) * self.scales
        return self._finish(y, x)

    def _kernel_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        # A float32 x of up to fused_ops.int8_logits_max_rows rows: every logit in float32 from
        # the int8 kernel itself (no bf16 rounding, so nothing to rescore: the top-k, gathers
        # and scatter of the rescoring were ~0.25 ms of a ~3.5 ms batch-1 step of a Q8_0 model
        # on a Zen 4). Otherwise QuantizedLinear's rescoring, whose exact top logits come from
        # the same kernel (_exact_logits_at): the same bits whichever path a row took.
        return fused_ops.int8_logits(x, self.qweight, self.scales)

    def _exact_logits_at(self, x: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        exact = fused_ops.int8_logits_at(x, self.qweight, self.scales, top)
        return super()._exact_logits_at(x, top) if exact is None else exact

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.qweight[ids].float() * self.scales[ids].float().unsqueeze(-1)
        return w.to(self.out_dtype)


class Int4Linear(QuantizedLinear):
    """``y = x @ w.T + bias`` with ``w = (q - 8) * scale + zero`` per group of ``group_size``."""

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int = GROUP_SIZE,
        dtype: torch.dtype | None = None,
        packed: bool = False,
        minima: bool = False,
    ) -> None:
        """Pack ``codes`` ``[N, K]`` (uint8 in 0..15) with ``scales``/``zeros`` ``[N, K/g]``.

        ``dtype``: the model's (default: ``scales``'); scales and zeros are kept in its kernel
        dtype. ``packed``: ``codes`` are in the kernel's layout already (``[N, K/2]``, from
        ``int4_quantize(packed=True)`` or ``pack_int4_rows``; N ``int4_packable``).
        ``minima``: ``zeros`` are the groups' minima ``m`` (``w = scale q + m``), made zeros
        ``m + 8 scale`` here in float32, a slice of rows at a time.
        """
        super().__init__()
        self.out_dtype = dtype or scales.dtype
        kd = kernel_dtype(self.out_dtype)
        n, k = codes.shape[0], codes.shape[1] * (2 if packed else 1)
        assert k % group_size == 0 and scales.shape == zeros.shape == (n, k // group_size), (
            codes.shape,
            scales.shape,
            group_size,
        )
        self.out_features, self.in_features, self.group_size = n, k, group_size
        assert not packed or int4_packable(n), f"packed int4 codes of {n} rows: not whole blocks"
        pad = -n % _INT4_ROW_PAD
        if pad:  # padded rows are zero weights; their outputs are sliced off
            # Code 8 in both nibbles of a packed byte: a padded row block packs to 0x88s.
            codes = F.pad(codes, (0, 0, 0, pad), value=0x88 if packed else 8)
        self.register_buffer("packed", codes if packed else _pack_int4(codes))
        # [K/g, N, 2]: the kernels' layout of (scale, zero) pairs, each rounded once to the
        # kernel dtype; written a slice of rows at a time (stacking and transposing whole
        # copies had four temporaries of its size: a Llama 3 head's 33 MB each).
        groups = k // group_size
        pairs = torch.zeros(groups, n + pad, 2, dtype=kd, device=scales.device)
        for r0, r1 in row_slices(n, groups):
            scale = scales[r0:r1].float()
            zero = zeros[r0:r1].float()
            pairs[:, r0:r1, 0] = scale.T
            pairs[:, r0:r1, 1] = (torch.add(zero, scale, alpha=8) if minima else zero).T
        self.register_buffer("scales_zeros", pairs)
        self.register_buffer("bias", None if bias is None else bias.to(self.out_dtype))
        # Whether a step's wide rows take the widened weight here (takes_wide_rows), fixed at
        # construction: a model's layers all alike for the engine's life.
        self.wide_prompts = wide_int4_prompts()

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> Int4Linear:
        """Asymmetric min/max quantization per group of 32 inputs (llama.cpp's Q4_1 rule)."""
        return cls.from_codes(*int4_quantize(weight, dtype), bias, dtype)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        minimum: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        packed: bool = False,
    ) -> Int4Linear:
        """From ``w = scale q + minimum`` per group of 32 (Q4_1; Q4_0: ``minimum = -8 scale``);
        ``packed`` as in the constructor.

        The zero ``minimum + 8 scale`` is formed in float32, then both are rounded once to the
        kernel dtype (fp16 -> bf16: at most 2^-8 of each, relative).
        """
        return cls(codes, scale, minimum, bias, dtype=dtype, packed=packed, minima=True)

    def takes_wide_rows(self) -> bool:
        """Only where ``wide_int4_prompts`` at construction: the kernels (on AMX 16-row
        tiles) beat widening the weight up to ~160 prompt rows a step (``WIDE_INT4_PROMPTS``)."""
        return self.wide_prompts

    def _kernel_dtype(self) -> torch.dtype:
        return self.scales_zeros.dtype

    def _vnni_product(self, xk: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        if widening_once():  # a chunked MLP: the matrix widened once for its chunks
            packed = widened(self, torch.bfloat16, self._packed_bf16, "vnni")
            return vnni_linear.linear_packed(xk, packed, self.out_features, None, out)
        return vnni_linear.linear_int4(
            xk,
            self.packed,
            self.group_size,
            self.scales_zeros,
            int4_row_block(),
            self.out_features,
            out,
        )

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Up to fused_ops.INT4_GEMV_MAX_ROWS rows on the CPU: the fused kernel over the same
        # codes (torch's is compute-bound; the same sums in another order; on AMX tiles where
        # the CPU has them, fused_ops.int4_amx), taking a float32 x as it is.
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = fused_ops.int4_gemv(
            x2, self.packed, self.group_size, self.scales_zeros, int4_row_block()
        )
        if y is not None:
            y = y[:, : self.out_features] if y.shape[1] != self.out_features else y
            return self._finish(y, x)
        kd = self.scales_zeros.dtype
        xk = self._kernel_input(x2, kd)
        dev = xk.device.type
        if xk.shape[0] > INT4_WIDEN_ABOVE_ROWS and dev == "cpu":
            y = self._widened_product(xk, lambda: self._dense(kd), self._packed_bf16)
        elif dev == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                xk, self.packed, self.group_size, self.scales_zeros
            )
        elif dev == "cuda" and kd == torch.bfloat16:
            y = torch.ops.aten._weight_int4pack_mm(
                xk, self._cuda_packed(), self.group_size, self.scales_zeros
            )
        else:  # no int4 kernel for this device/dtype: widen the weight for this call
            y = self._widened_product(xk, lambda: self._dense(kd))
        y = y[:, : self.out_features] if y.shape[1] != self.out_features else y
        return self._finish(y, x)

    def _kernel_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        # A float32 x of up to fused_ops.INT4_GEMV_MAX_ROWS rows: every logit in float32 from
        # the int4 kernel itself (nothing to rescore: with the top-k, rows, bmm and scatter of
        # the rescoring a 49152 x 576 int4 head took 1.41x as long at batch 1 on a Zen 5, 1.2-1.5x
        # for other heads and row counts; BENCHMARKS.md, issue 11, nineteenth pass). Otherwise
        # QuantizedLinear's rescoring, whose exact top logits come from the same kernel
        # (_exact_logits_at): the same bits whichever path a row took.
        y = fused_ops.int4_logits(
            x, self.packed, self.group_size, self.scales_zeros, int4_row_block()
        )
        return y if y is None or y.shape[1] == self.out_features else y[:, : self.out_features]

    def _exact_logits_at(self, x: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        exact = fused_ops.int4_logits_at(
            x, self.packed, self.group_size, self.scales_zeros, int4_row_block(), top
        )
        return super()._exact_logits_at(x, top) if exact is None else exact

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        q = unpack_int4_rows(self.packed, ids, self.in_features)  # [*ids, K] uint8
        sz = self.scales_zeros.index_select(1, ids.reshape(-1)).float()  # [K/g, R, 2]
        sz = sz.transpose(0, 1).repeat_interleave(self.group_size, dim=1)  # [R, K, 2]
        w = (q.reshape(-1, self.in_features).float() - 8) * sz[..., 0] + sz[..., 1]
        return w.reshape(*ids.shape, self.in_features).to(self.out_dtype)

    def dequantize(self) -> torch.Tensor:
        return self._dense(torch.float32).to(self.out_dtype)

    def _dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole (padded) weight ``[N', K]`` widened: to bf16 on the CPU in one fused pass
        (``fused_ops.int4_widen``, the same bits), otherwise in a few whole-tensor ops."""
        k, g = self.in_features, self.group_size
        if dtype == self.scales_zeros.dtype == torch.bfloat16:  # what a CPU prefill widens to
            fused = fused_ops.int4_widen(self.packed, g, self.scales_zeros, int4_row_block())
            if fused is not None:
                return fused[: self.out_features]
        w = _unpack_int4_all(self.packed, k).to(dtype).view(-1, k // g, g)  # [N', K/g, g]
        sz = self.scales_zeros.to(dtype).transpose(0, 1)  # [N', K/g, 2]
        # In place: the same ops in the same dtype (the same bits) with one weight-sized
        # temporary instead of four (a prefill widens every layer's weights).
        w.sub_(8).mul_(sz[..., :1]).add_(sz[..., 1:])
        return w.view(-1, k)[: self.out_features]

    def _packed_bf16(self) -> torch.Tensor:
        """``_dense(bf16)`` in ``vnni_linear``'s layout: one fused pass where the operator
        applies (``fused_ops.int4_widen_vnni``, the same bits), else packed after widening."""
        packed = fused_ops.int4_widen_vnni(
            self.packed, self.group_size, self.scales_zeros, int4_row_block(), self.out_features
        )
        return vnni_linear.pack(self._dense(torch.bfloat16)) if packed is None else packed

    def _cuda_packed(self) -> torch.Tensor:
        # CUDA's tensor-core layout differs from the CPU one; converted once, on first use.
        cached = getattr(self, "_cuda_pack", None)
        if cached is None:
            q = _unpack_int4_all(self.packed, self.in_features)
            nibbles = (q[:, 0::2] << 4) | q[:, 1::2]
            cached = torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), 8)
            self._cuda_pack = cached
        return cached


# Runs up to which a split step's rows are sliced and copied run by run; past them one
# index_select / index_copy_ each (a step of 16 short prompts holds 32 runs: 4,000 copies of
# slices a step took 35 ms of SmolLM2's 480, issue 11, forty-first pass).
_RUN_COPIES = 2


def _take(x: torch.Tensor, runs: tuple[tuple[int, int], ...], index: torch.Tensor) -> torch.Tensor:
    """The rows of ``runs`` (flat indices ``index``) of ``x`` ``[T, K]``, in order (a view where
    there is one run)."""
    if len(runs) == 1:
        a, b = runs[0]
        return x[a:b]
    if len(runs) <= _RUN_COPIES:
        return torch.cat([x[a:b] for a, b in runs])
    return x.index_select(0, index.to(x.device))


def _put_runs(
    out: torch.Tensor,
    runs: tuple[tuple[int, int], ...],
    index: torch.Tensor,
    y: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> None:
    """Copy ``y`` (the rows of ``runs``, flat indices ``index``, in order) into those rows of
    ``out``, cast to its dtype and then ``bias`` added (``_finish``'s order)."""
    assert y.shape[0] == index.shape[0], f"{y.shape[0]} rows for runs of {index.shape[0]}"
    if len(runs) > _RUN_COPIES:
        y = y if y.dtype == out.dtype else y.to(out.dtype)
        out.index_copy_(0, index.to(out.device), y if bias is None else y + bias)
        return
    at = 0
    for a, b in runs:
        rows = out[a:b]
        rows.copy_(y[at : at + b - a])
        if bias is not None:
            rows.add_(bias)
        at += b - a


@functools.cache
def int4_row_block() -> int:
    """Output rows per interleaved block of torch's CPU int4 packing on this machine.

    ``_convert_weight_to_int4pack_for_cpu`` packs for the kernels torch dispatches to here: four
    float vectors of output rows per block, 64 with AVX-512 and 32 with AVX2 or plain loops
    (an AMD EPYC without AVX-512 read a 64-row layout as garbage). Probed once: a small matrix
    packed by torch against the same codes packed by hand for each block."""
    n, k = 128, 64
    codes = (torch.arange(n)[:, None] * 7 + torch.arange(k)[None, :] * 3) % 16
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    for block in (64, 32):
        if torch.equal(_pack_int4_by_hand(codes.to(torch.uint8), block), packed):
            return block
    raise RuntimeError(
        "torch's CPU int4 packing is neither of the layouts carpool reads (64- or 32-row "
        f"blocks), torch {torch.__version__}: use --quantization int8 or a bf16 model"
    )


def _pack_int4_by_hand(codes: torch.Tensor, block: int) -> torch.Tensor:
    """``[N/B, K, B/2]`` bytes (as ``[N, K/2]``), byte j of (block, k) holding row j of the
    block in its low nibble and row B/2 + j in its high one."""
    n, k = codes.shape
    blocks = codes.reshape(n // block, block, k).transpose(1, 2)  # [N/B, K, B]
    half = block // 2
    packed = blocks[..., :half] | (blocks[..., half:] << 4)  # [N/B, K, B/2]
    return packed.reshape(n, k // 2).contiguous()


# Values per slice of rows (4 MiB of float32) that the loaders work on: quantized by
# from_float, decoded or re-rounded from a GGUF file's blocks (gguf_quant), packed into the
# int4 layout (pack_int4_rows). A vocabulary head's float32 copy and its temporaries were
# several times its bf16 bytes at once; 64 MiB slices of gguf-py's dequantizer set the medium
# Q4_K_M model's load peak, 13 MiB above the loaded size at 4 MiB, at the same load time.
_QUANTIZE_SLICE_VALUES = 1 << 20


def row_slices(n: int, k: int, align: int = 1) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` of an ``[n, k]`` matrix, ``_QUANTIZE_SLICE_VALUES`` a slice (a
    multiple of ``align`` rows, at least one such run)."""
    step = max(align, _QUANTIZE_SLICE_VALUES // max(k, 1) // align * align)
    return [(r, min(r + step, n)) for r in range(0, n, step)]


def row_abs_max(w: torch.Tensor) -> torch.Tensor:
    """Each row's largest magnitude, ``max |w|`` over the last dimension, without a ``|w|``
    temporary: the larger of the row's maximum and minus its minimum (exact). On the Zen 4,
    2 threads, ``[372, 2816]`` float32: 0.06 ms, ``abs().amax`` 0.08 ms and a whole temporary,
    ``linalg.vector_norm(w, inf)`` 1.4 ms."""
    return torch.maximum(w.amax(dim=-1), w.amin(dim=-1).neg_())


def int8_quantize(
    weight: torch.Tensor | StoredTensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` of ``Int8Linear.from_float``: int8 ``[N, K]`` and float32 ``[N]``
    (each row's ``max|w| / 127`` rounded to the kernel dtype of ``dtype``, the codes chosen for
    the rounded scale). Row by row, so shards quantized apart equal their fused matrix's rows
    (and a ``StoredTensor`` is read a slice of rows at a time)."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    for r0, r1 in row_slices(n, k):  # float32 temporaries of a slice only
        # One float32 copy of the slice, worked on in place (each temporary of a slice's size
        # was a block the allocator kept through the load: ~60 MiB of the medium model's peak).
        w = weight[r0:r1].to(torch.float32, copy=True)
        s = row_abs_max(w).clamp(min=1e-12) / 127.0
        # Codes chosen for the scale as stored (rounded to the kernel dtype).
        s = s.to(kernel_dtype(dtype)).float()
        q[r0:r1] = w.div_(s[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        scale[r0:r1] = s
    return q, scale


def int4_quantize(
    weight: torch.Tensor | StoredTensor, dtype: torch.dtype, packed: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, minimum)`` of ``Int4Linear.from_float`` (``w = scale q + minimum`` per
    group of 32 inputs; codes uint8 ``[N, K]`` in 0..15, scales and minima ``[N, K/32]`` in
    the kernel dtype of ``dtype``, what the kernel stores). Row by row, as ``int8_quantize``.

    ``packed``: the codes come in the CPU kernel's layout instead (``[N, K/2]``, ``_pack_int4``'s
    bytes; N must be ``int4_packable``), each slice packed as it is quantized
    (``pack_int4_rows``), so a matrix's one-byte codes are never whole (a Llama 3 head's at 1B's
    width: 263 MB)."""
    n, k = weight.shape
    kd = kernel_dtype(dtype)
    # In the kernel dtype: the values it stores (exact), at half float32's bytes.
    scale_s = torch.empty(n, k // GROUP_SIZE, dtype=kd, device=weight.device)
    lo_s = torch.empty_like(scale_s)

    def quantize(r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)``'s codes (their scales and minima written): one float32 copy of
        the slice, worked on in place (as ``int8_quantize``)."""
        g = weight[r0:r1].to(torch.float32, copy=True)
        g = g.view(r1 - r0, k // GROUP_SIZE, GROUP_SIZE)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        # Round the scale and zero to the storage dtype first, so codes are chosen for them.
        scale_s[r0:r1], lo_s[r0:r1] = scale, lo
        g.sub_(lo_s[r0:r1, :, None].float()).div_(scale_s[r0:r1, :, None].float())
        return g.round_().clamp_(0, 15).to(torch.uint8).view(r1 - r0, k)

    if packed:
        return pack_int4_rows(n, k, quantize, weight.device), scale_s, lo_s
    q = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    for r0, r1 in row_slices(n, k):  # float32 temporaries of a slice only
        q[r0:r1] = quantize(r0, r1)
    return q, scale_s, lo_s


def int4_packable(n: int) -> bool:
    """Whether ``n`` output rows can be held in the CPU kernel's packed int4 layout as they are
    (whole row blocks; ``Int4Linear`` pads other counts with zero rows first)."""
    return n % int4_row_block() == 0


def pack_int4_rows(
    n: int, k: int, codes: Callable[[int, int], torch.Tensor], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The packed layout ``[N, K/2]`` of an ``[N, K]`` matrix whose one-byte codes of rows
    ``[r0, r1)`` ``codes(r0, r1)`` gives, a slice of whole row blocks at a time (N
    ``int4_packable``): a decoder's codes are then never whole."""
    block = int4_row_block()
    assert n % block == 0, f"int4 codes need a multiple of {block} rows, got {n}"
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device=device)
    # Whole blocks of rows per slice: a slice's packed bytes are then rows [r0, r1) of the
    # [N, K/2] result (the layout is [N/B, K, B/2], block after block).
    for r0, r1 in row_slices(n, k, block):
        packed[r0:r1] = _pack_int4_by_hand(codes(r0, r1).to(torch.uint8), block)
    return packed


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[N, K]`` (N a multiple of 64) in the CPU kernel's packed layout ``[N, K/2]``:
    the bytes of torch's ``_convert_weight_to_int4pack_for_cpu`` (``int4_row_block`` checks the
    two agree), built by hand in slices of rows. torch's op takes int32 codes: a temporary of 4
    bytes a weight (131 MB for a 32,000 x 1,024 Q4_K embedding, 2.1 GB for a Llama 3 8B's), which
    set a GGUF load's peak resident memory; by hand it is also ~4x faster."""
    n, k = codes.shape
    return pack_int4_rows(n, k, lambda r0, r1: codes[r0:r1], codes.device)


def _unpack_int4_all(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Codes ``[N, K]`` of every row (the inverse of ``_pack_int4``)."""
    block = int4_row_block()
    blocks = packed.reshape(-1, k, block // 2)  # [N/B, K, B/2]
    both = torch.cat((blocks & 0xF, blocks >> 4), dim=-1)  # [N/B, K, B]
    return both.transpose(1, 2).reshape(-1, k)


def unpack_int4_rows(packed: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Codes of rows ``ids`` from the packed layout: ``[N/B, K, B/2]`` bytes, low nibbles
    holding rows 0..B/2-1 of each B-row block and high nibbles the rest."""
    block = int4_row_block()
    blocks = packed.reshape(-1, k, block // 2)
    ids = ids.reshape(-1)
    j = ids % block
    half = block // 2
    byte = blocks[ids // block, :, j % half]  # [R, K]
    return torch.where((j < half)[:, None], byte & 0xF, byte >> 4)


class QuantizedEmbedding(nn.Module):
    """An embedding that reads its rows from a ``QuantizedLinear`` (shared with a tied head)."""

    def __init__(self, source: QuantizedLinear) -> None:
        super().__init__()
        self.source = source
        self.num_embeddings, self.embedding_dim = source.out_features, source.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.source.rows(ids)


def quantize_linear(
    linear: nn.Linear, method: str, dtype: torch.dtype | None = None
) -> QuantizedLinear:
    """A quantized copy of a dense ``nn.Linear`` (``method``: ``int8`` or ``int4``)."""
    dtype = dtype or linear.weight.dtype  # the model's; scales go to its kernel dtype
    w, b = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    if method == "int8":
        return Int8Linear.from_float(w, b, dtype)
    if method == "int4":
        if w.shape[1] % GROUP_SIZE:
            raise ValueError(f"int4 needs in_features divisible by {GROUP_SIZE}, got {w.shape[1]}")
        return Int4Linear.from_float(w, b, dtype)
    raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {method!r}")
