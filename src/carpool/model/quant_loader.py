"""Build a model whose weight matrices are quantized, from a plan and checkpoint tensors.

Every planned matrix becomes an ``Int8Linear`` / ``Int4Linear`` module (the embedding a
``QuantizedEmbedding``) as its tensors arrive, and is never materialised dense:

- a GGUF file's Q8_0/Q4_x/K-quant tensors arrive as ``QuantWeight``s (``gguf_quant``), so a
  98 MB file does not pass through gigabytes of float32;
- a dense tensor of a matrix quantized at load (a Hugging Face checkpoint under
  ``--quantization``) is quantized as it is read (``quantized_as_read``), so the dense
  model is never whole in memory (the medium model's bf16 checkpoint under int4: a load peak
  of the quantized model plus one tensor, not of the dense model);
- ``load_planned_weights`` packs each module once all its shards are there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from carpool.config import ModelConfig
from carpool.errors import ModelLoadError
from carpool.model.gguf_quant import QuantWeight, as_int8, gguf_method
from carpool.model.quant import (
    QUANTIZATION_METHODS,
    Int4Linear,
    Int8Linear,
    QuantizedEmbedding,
    QuantizedLinear,
    int4_packable,
    int4_quantize,
    int4_row_block,
    int8_quantize,
)
from carpool.model.quant_plan import REROUNDED, QuantPlan, matrix_shapes, uniform_plan
from carpool.model.registry import model_class_for

logger = logging.getLogger(__name__)

_EMBED = "model.embed_tokens"
_FUSED = ("qkv_proj", "gate_up_proj")
# Values of ``--quantization``: None keeps a GGUF file's own quantization (dense otherwise).
QUANTIZATION_ARGS = ("none", *QUANTIZATION_METHODS)


class _Pending(nn.Module):
    """Stands in for a planned quantized module until its tensors arrive (holds no memory)."""


def gguf_plan(config: ModelConfig, types: dict[str, str]) -> dict[str, str | None]:
    """Plan of a GGUF file: a matrix is quantized when all its checkpoint shards map onto a
    kernel: int4 or int8 where they all map onto it, int8 where some map onto each (a Q4_K_M
    file's q/k in Q4_K beside v in Q6_K: the int4 shards re-rounded, ``gguf_quant.as_int8``);
    otherwise it is dequantized to the model dtype, with a log line naming the types."""
    mapping = model_class_for(config).weight_mapping
    by_module: dict[str, set[str]] = {}
    for name, t in types.items():
        if name.endswith(".weight"):
            by_module.setdefault(_locate(name, mapping)[0], set()).add(t)
    plan: dict[str, str | None] = {}
    rerounded: set[str] = set()
    for module in matrix_shapes(config):
        shard_types = sorted(by_module.get(module, ()))
        methods = {gguf_method(t) for t in shard_types}
        if len(methods) == 1:
            plan[module] = methods.pop()
        else:  # a kernel for each shard: one int8 matrix; a dense shard: all dense
            plan[module] = "int8" if methods == {"int4", "int8"} else None
        if plan[module] is None and any(t not in ("F32", "F16", "BF16") for t in shard_types):
            logger.info("%s: GGUF types %s have no kernel here; dequantized", module, shard_types)
        elif plan[module] is not None:
            # REROUNDED types, and int4 shards held in an int8 matrix beside int8 ones
            rerounded.update(
                t
                for t in shard_types
                if t in REROUNDED or (plan[module] == "int8" and gguf_method(t) == "int4")
            )
    if rerounded:
        logger.info(
            "GGUF types %s re-rounded to int8 with one scale per row (no kernel for their "
            "blocks, or a fused matrix's shards in both kernels)",
            sorted(rerounded),
        )
    return plan


def resolve_plan(
    config: ModelConfig, gguf_types: dict[str, str] | None, quantization: str | None
) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """``(native, requantized)`` plans of a checkpoint under ``--quantization``.

    ``native``: matrices read quantized from a GGUF file's own blocks (empty for a Hugging
    Face checkpoint and under ``quantization="none"``, which dequantizes everything).
    ``requantized``: matrices quantized at load from dense weights (``int8``/``int4``: every
    matrix not already native). Each maps every matrix, None where the other plan (or neither)
    holds it.
    """
    if quantization not in (None, "none", *QUANTIZATION_METHODS):
        raise ValueError(f"quantization must be one of {QUANTIZATION_ARGS}, got {quantization!r}")
    use_file = gguf_types is not None and quantization != "none"
    native = gguf_plan(config, gguf_types) if use_file else uniform_plan(config, None)  # type: ignore[arg-type]
    method = quantization if quantization in QUANTIZATION_METHODS else None
    wanted = uniform_plan(config, method)
    requantized = {m: None if native[m] else wanted[m] for m in native}
    return native, requantized


def checkpoint_plan(
    path: str | Path, config: ModelConfig, quantization: str | None
) -> dict[str, str | None]:
    """The plan ``load_model(path, quantization=...)`` follows, read without loading weights
    (a GGUF file's header only); ``carpool memory`` sizes weights from it."""
    types = None
    if Path(path).is_file() and Path(path).suffix == ".gguf":
        from carpool.model.gguf_loader import GGUFCheckpoint

        types = GGUFCheckpoint(path).types
    return combined_plan(*resolve_plan(config, types, quantization))


def natively_quantized_names(
    config: ModelConfig, types: dict[str, str], native: QuantPlan
) -> list[str]:
    """Checkpoint weight names read as ``QuantWeight`` under the ``native`` plan."""
    mapping = model_class_for(config).weight_mapping
    return [n for n in types if n.endswith(".weight") and native.get(_locate(n, mapping)[0])]


def combined_plan(native: QuantPlan, requantized: QuantPlan) -> dict[str, str | None]:
    """The method each matrix ends up in."""
    return {m: native[m] or requantized[m] for m in native}


def prepare_planned_model(model: nn.Module, plan: QuantPlan) -> None:
    """Replace the planned modules of a model still on the meta device by placeholders."""
    for name, method in plan.items():
        if method is not None:
            model.set_submodule(name, _Pending())
            if name == _EMBED and model.config.tie_word_embeddings:
                model.set_submodule("lm_head", _Pending())


def load_planned_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor | QuantWeight]],
    dtype: torch.dtype,
    device: str,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pack each ``QuantWeight`` into its planned module; pass the dense tensors through.

    A generator, consumed by ``loader.load_weights``: a module is packed as soon as all its
    shards (and biases, collected here since the module does not exist before) have arrived,
    so at most one matrix's codes and one dense tensor are held at a time.

    Raises:
        ModelLoadError: a quantized tensor for an unplanned module, or a planned module whose
            tensors never arrived.
    """
    mapping: dict[str, tuple[str, int]] = model.weight_mapping
    shapes = matrix_shapes(model.config)
    pending = {n for n, m in model.named_modules() if isinstance(m, _Pending)}
    shards: dict[str, dict[int, QuantWeight]] = {}
    biases: dict[str, dict[int, torch.Tensor]] = {}
    # A fused matrix's shards are written into one matrix as they arrive (made on the first,
    # in its kernel's terms; None: they do not fit one), instead of held until the last and
    # joined: a shard less and no second copy of the matrix at once.
    fused: dict[str, QuantWeight | None] = {}
    written: dict[str, set[int]] = {}
    for name, value in weights:
        module, shard, suffix = _locate(name, mapping)
        if module not in pending:
            if isinstance(value, QuantWeight):
                raise ModelLoadError(f"{name}: quantized tensor for an unplanned module {module}")
            yield name, value
            continue
        if suffix == "bias":
            assert isinstance(value, torch.Tensor), name
            biases.setdefault(module, {})[shard] = value
        else:
            assert isinstance(value, QuantWeight), name
            if module.endswith(_FUSED):
                sizes = model.fused_shard_sizes(module)
                if module not in fused:
                    fused[module] = _fused_matrix(value, sizes)
                matrix = fused[module]
                if matrix is not None and _fits(matrix, value, sizes, shard):
                    r0 = sum(sizes[:shard])
                    value = _write_rows(matrix, r0, value)  # the matrix's rows now
                    written.setdefault(module, set()).add(shard)
            shards.setdefault(module, {})[shard] = value
        count = len(model.fused_shard_sizes(module)) if module.endswith(_FUSED) else 1
        parts, bias_parts = shards.get(module, {}), biases.get(module, {})
        if len(parts) == count and (not shapes[module][2] or len(bias_parts) == count):
            matrix = fused.pop(module, None)
            if matrix is not None and len(written.pop(module, ())) == count:
                qw = matrix
            elif count == 1:  # not fused: the one matrix as it came (a join would copy it)
                (qw,) = parts.values()
            else:  # shards that did not fit one matrix: of two kinds, or packed ragged
                ordered = [parts[i] for i in sorted(parts)]
                if len({p.method for p in ordered}) > 1:  # int4 and int8 shards: int8
                    ordered = [as_int8(p) for p in ordered]
                qw = QuantWeight.concat(ordered)
                del ordered
            bias = torch.cat([bias_parts[i] for i in sorted(bias_parts)]) if bias_parts else None
            # The shards go before the module is built (they are the matrix's rows, or joined).
            del parts, matrix
            shards.pop(module), biases.pop(module, None), written.pop(module, None)
            _install(model, module, _build(qw, bias, dtype, device))
            pending.discard(module)
    left = sorted(n for n, m in model.named_modules() if isinstance(m, _Pending))
    if left:
        raise ModelLoadError(f"no quantized tensors arrived for {left}")


def _fused_matrix(part: QuantWeight, sizes: list[int]) -> QuantWeight | None:
    """An empty fused matrix of ``sizes`` rows in the terms of its first shard to arrive
    (method, code layout, dtypes), or None where packed shards would not start on whole row
    blocks of the layout."""
    if part.packed and any(sum(sizes[:i]) % int4_row_block() for i in range(len(sizes))):
        return None
    n = sum(sizes)

    def like(t: torch.Tensor) -> torch.Tensor:
        return t.new_empty((n, *t.shape[1:]))

    minimum = None if part.minimum is None else like(part.minimum)
    return QuantWeight(part.method, like(part.codes), like(part.scale), minimum, part.packed)


def _fits(matrix: QuantWeight, part: QuantWeight, sizes: list[int], shard: int) -> bool:
    """Whether shard ``shard`` can be written into ``matrix`` as it is (the same method, code
    layout, dtypes and widths, and its rows)."""

    def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
        if a is None or b is None:
            return a is b
        return a.dtype == b.dtype and a.shape[1:] == b.shape[1:]

    return (
        part.method == matrix.method
        and part.packed == matrix.packed
        and part.shape[0] == sizes[shard]
        and same(part.codes, matrix.codes)
        and same(part.scale, matrix.scale)
        and same(part.minimum, matrix.minimum)
    )


def _write_rows(matrix: QuantWeight, r0: int, part: QuantWeight) -> QuantWeight:
    """Copy ``part`` into rows ``r0 ..`` of ``matrix``; returns those rows (views)."""
    r1 = r0 + part.shape[0]
    rows = QuantWeight(
        matrix.method,
        matrix.codes[r0:r1],
        matrix.scale[r0:r1],
        None if matrix.minimum is None else matrix.minimum[r0:r1],
        matrix.packed,
    )
    rows.codes.copy_(part.codes)
    rows.scale.copy_(part.scale)
    if rows.minimum is not None and part.minimum is not None:
        rows.minimum.copy_(part.minimum)
    return rows


def quantized_as_read(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor | QuantWeight]],
    plan: QuantPlan,
    dtype: torch.dtype,
    source: str,
) -> Iterator[tuple[str, torch.Tensor | QuantWeight]]:
    """Checkpoint tensors (of the file ``source``) with each dense weight of a matrix ``plan``
    quantizes turned into a ``QuantWeight`` as it arrives, for ``load_planned_weights``.

    A weight is first cast to the model ``dtype`` (what a dense load's copy does), then
    quantized row by row as ``quantize_linear`` quantizes a dense module, so shards quantized
    one by one equal their fused matrix's rows: the codes and scales of quantizing the loaded
    dense model, without ever holding it.

    Raises:
        ModelLoadError: a weight whose shape is not its matrix's (or shard's).
    """
    mapping: dict[str, tuple[str, int]] = model.weight_mapping
    shapes = matrix_shapes(model.config)
    for name, value in weights:
        module, shard, suffix = _locate(name, mapping)
        method = plan.get(module)
        if module == "lm_head" and model.config.tie_word_embeddings and plan.get(_EMBED):
            # A tied model's head is its quantized embedding; a checkpoint that also stores
            # the head stores the same values (a dense load writes them into the same tensor).
            continue
        if method is None or suffix != "weight" or isinstance(value, QuantWeight):
            yield name, value
            continue
        rows, cols, _ = shapes[module]
        if module.endswith(_FUSED):
            rows = model.fused_shard_sizes(module)[shard]
        if tuple(value.shape) != (rows, cols):
            raise ModelLoadError(
                f"{source}: tensor {name!r} has shape {tuple(value.shape)}, expected {(rows, cols)}"
            )
        w = value.to(dtype)
        if method == "int8":
            yield name, QuantWeight("int8", *int8_quantize(w, dtype))
        else:
            # Packed a slice at a time where the rows allow (never the one-byte codes whole).
            packed = int4_packable(rows)
            yield name, QuantWeight("int4", *int4_quantize(w, dtype, packed), packed=packed)


def _install(model: nn.Module, name: str, module: QuantizedLinear) -> None:
    """Put a quantized matrix in place; the embedding's also serves a tied head."""
    if name != _EMBED:
        model.set_submodule(name, module)
        return
    model.model.embed_tokens = QuantizedEmbedding(module)
    if model.config.tie_word_embeddings:
        model.lm_head = module


def _build(
    qw: QuantWeight, bias: torch.Tensor | None, dtype: torch.dtype, device: str
) -> QuantizedLinear:
    bias = None if bias is None else bias.to(device=device, dtype=dtype)
    if qw.method == "int8":
        return Int8Linear(qw.codes.to(device), qw.scale.to(device), bias, dtype)
    minimum = qw.minimum
    assert minimum is not None
    return Int4Linear.from_codes(
        qw.codes.to(device), qw.scale.to(device), minimum.to(device), bias, dtype, qw.packed
    )


def _locate(name: str, mapping: dict[str, tuple[str, int]]) -> tuple[str, int, str]:
    """``model.layers.0.self_attn.k_proj.weight`` -> ``(...qkv_proj, 1, "weight")``."""
    module, _, suffix = name.rpartition(".")
    for ckpt, (ours, index) in mapping.items():
        if module.endswith("." + ckpt):
            return module[: -len(ckpt)] + ours, index, suffix
    return module, 0, suffix
