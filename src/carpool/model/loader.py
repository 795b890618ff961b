"""Load a model from a Hugging Face directory (config.json + safetensors) or a GGUF file.

The model is built on the meta device (no memory, no random init), materialised empty on the
target device, and every parameter is then filled from the checkpoint with its shape checked.
Only safetensors and GGUF are read: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from carpool.config import ModelConfig
from carpool.errors import ModelLoadError
from carpool.model import cpu_allocator
from carpool.model.pages import trim_heap
from carpool.model.quant_plan import plan_summary
from carpool.model.registry import model_class_for
from carpool.model.stored_tensor import DTYPES, StoredTensor

logger = logging.getLogger(__name__)

# Checkpoint tensors that carry no weights we use (buffers some exporters save).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig, device: str) -> torch.dtype:
    """Turn ``"auto"`` or a dtype name into a ``torch.dtype``.

    ``auto`` takes the checkpoint's dtype, except that float16 becomes bfloat16 on a CPU
    (torch has no fast float16 matmul on CPUs, while bfloat16 has the same size).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        name = config.torch_dtype.replace("torch.", "")
        if name == "float16" and torch.device(device).type == "cpu":
            name = "bfloat16"
        return _DTYPES.get(name, torch.float32)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {['auto', *_DTYPES]}, got {dtype!r}")
    return _DTYPES[dtype]


def build_empty_model(
    config: ModelConfig,
    dtype: torch.dtype,
    device: str,
    quantized: dict[str, str | None] | None = None,
) -> nn.Module:
    """Instantiate the architecture's class with uninitialised weights on ``device``.

    Modules planned in ``quantized`` are left as empty placeholders (never materialised), for
    ``quant_loader.load_planned_weights`` to fill.
    """
    from carpool.model.quant_loader import prepare_planned_model

    cls = model_class_for(config)
    with torch.device("meta"):
        model = cls(config)
        prepare_planned_model(model, quantized or {})
    # Not ``to_empty(...).to(dtype)``: ``to_empty``'s ``empty_like`` of a meta tensor runs
    # torch's Python reference ops, which import sympy (32 MiB of resident memory and ~0.3 s,
    # measured), and allocating float32 first then converting held both copies at once.
    model = model._apply(
        lambda t: torch.empty(
            t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device
        )
    )
    if isinstance(model.lm_head, nn.Linear):
        model.tie_weights()
    model.model.rotary.reset_tables()
    return model.eval()


def load_weights(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor | StoredTensor]], source: str
) -> None:
    """Copy checkpoint tensors (Hugging Face names and layout) into ``model`` (a
    ``StoredTensor`` a slice of rows at a time).

    Fused parameters (``qkv_proj``, ``gate_up_proj``) are filled shard by shard. Every
    parameter must be written exactly once (a tied head may be written twice).

    Raises:
        ModelLoadError: unknown tensor, wrong shape, or a parameter left unfilled.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    mapping: dict[str, tuple[str, int]] = model.weight_mapping
    filled: set[tuple[str, int]] = set()
    for name, tensor in weights:
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        target, shard = name, -1
        for ckpt, (ours, index) in mapping.items():
            if f".{ckpt}." in name:
                target, shard = name.replace(f".{ckpt}.", f".{ours}."), index
                break
        param = params.get(target)
        if param is None:
            raise ModelLoadError(f"{source}: unexpected tensor {name!r} for this architecture")
        dest = param.data
        if shard >= 0:
            sizes = model.fused_shard_sizes(target.rsplit(".", 1)[0])
            dest = dest.narrow(0, sum(sizes[:shard]), sizes[shard])
        if tuple(tensor.shape) != tuple(dest.shape):
            raise ModelLoadError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(dest.shape)}"
            )
        if isinstance(tensor, StoredTensor):
            tensor.copy_into(dest)
        else:
            with torch.no_grad():
                dest.copy_(tensor)
        filled.add((target, shard))
    # Unique parameters only: a tied head is the embedding and needs no tensor of its own.
    expected: set[tuple[str, int]] = set()
    for name, _ in model.named_parameters():
        fused = name.rsplit(".", 1)[0]
        if fused.endswith(("qkv_proj", "gate_up_proj")):
            expected.update((name, i) for i in range(len(model.fused_shard_sizes(fused))))
        else:
            expected.add((name, -1))
    missing = sorted(n if s < 0 else f"{n}[shard {s}]" for n, s in expected - filled)
    if missing:
        raise ModelLoadError(
            f"{source}: missing tensors: {', '.join(missing[:8])}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        )


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint files of a directory: the sharded index's files, or ``model.safetensors``."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from None
        files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights found")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"{f}: weight shard listed in the index is missing")
    return files


# Bytes of tensors read through one opening of a safetensors file before it is closed and
# opened again (see iter_safetensors): the medium model's bf16 checkpoint under int4 peaked
# at 656 MiB with 64 MiB, 617 with 16. A reopening costs a few ms (closing drops the pages):
# the medium checkpoint's 31 took its dense load_model from 0.33 to 0.35 s.
_MAPPED_BYTES = 16 << 20


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor | StoredTensor]]:
    """Yield ``(name, tensor)`` from safetensors files, wrapping format errors.

    ``safe_open`` maps the whole file, and a tensor it gives is a view of that mapping (its
    pages come in as they are read): every page read stays resident (file-backed) while the
    mapping lives, so a checkpoint loaded in one opening held the weights twice at its peak
    (the medium model's bf16 file: 1,181 MiB peak for 715 MiB loaded). So the file is closed
    and opened again after every ``_MAPPED_BYTES`` handed over; an opening's mapping goes once
    it is closed and its tensors are dropped (the consumers copy or quantize each at once).
    A tensor of two or more dimensions larger than that comes as a ``StoredTensor``, which
    its consumer reads a slice of rows at a time.
    """
    for f in files:
        try:
            done, names = 0, None
            while names is None or done < len(names):
                with safe_open(str(f), framework="pt") as st:
                    if names is None:
                        names = list(st.keys())
                    read = 0
                    while done < len(names) and read < _MAPPED_BYTES:
                        name = names[done]
                        done += 1
                        stored = _stored(f, name, st.get_slice(name))
                        if stored is not None:  # read by its consumer a slice at a time
                            yield name, stored
                            continue
                        tensor = st.get_tensor(name)
                        read += tensor.numel() * tensor.element_size()
                        yield name, tensor
                        del tensor
                # The consumers' temporaries (quantizing, packing) of sizes that did not come
                # again: the block allocator's lists otherwise kept up to 256 MiB of them (the
                # medium checkpoint under int4: a load peak of 615 MiB, 508 with this, in
                # 0.64 -> 0.75 s; unmapping every list each time took 1.1-1.2 s).
                cpu_allocator.end_step()
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{f}: cannot read safetensors file ({e})") from None


def _stored(path: Path, name: str, view: Any) -> StoredTensor | None:
    """A ``StoredTensor`` for a tensor of at least two dimensions over ``_MAPPED_BYTES``
    (``view``: its ``safe_open`` slice), else None (read whole)."""
    shape = tuple(int(d) for d in view.get_shape())
    dtype = DTYPES.get(view.get_dtype())
    if dtype is None or len(shape) < 2 or math.prod(shape) * dtype.itemsize <= _MAPPED_BYTES:
        return None
    return StoredTensor(path, name, shape, dtype)


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    quantization: str | None = None,
) -> tuple[nn.Module, ModelConfig]:
    """Load a model from a Hugging Face directory or a ``.gguf`` file.

    Args:
        path: model directory (config.json + safetensors) or GGUF file.
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"`` (or a torch dtype):
            activations, dense weights and quantization scales.
        device: torch device string.
        quantization: None keeps a GGUF file's quantized matrices quantized (a Hugging
            Face checkpoint dense); ``"int8"``/``"int4"`` also quantize every dense matrix
            (weight-only, at load); ``"none"`` dequantizes everything to ``dtype``.

    On the CPU, carpool's block allocator (``cpu_allocator``) is installed first, for the rest
    of the process: the load's large temporaries and a step's then come from reused blocks.

    Returns:
        The model in eval mode and its ``ModelConfig``.

    Raises:
        ModelLoadError: naming the file and what is wrong with it.
    """
    from carpool.model.quant_loader import (
        combined_plan,
        load_planned_weights,
        natively_quantized_names,
        quantized_as_read,
        resolve_plan,
    )
    from carpool.model.quant_plan import plan_weight_bytes

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model directory or file")
    if torch.device(device).type == "cpu":
        cpu_allocator.install()
    if path.is_file():
        from carpool.model.gguf_loader import GGUFCheckpoint

        ckpt = GGUFCheckpoint(path)
        config = ckpt.config
        native, requantized = resolve_plan(config, ckpt.types, quantization)
        quantized = natively_quantized_names(config, ckpt.types, native)
        weights: Iterable[tuple[str, torch.Tensor]] = ckpt.weights(quantized)  # type: ignore[assignment]
    else:
        config = ModelConfig.from_json_file(path / "config.json")
        native, requantized = resolve_plan(config, None, quantization)
        weights = iter_safetensors(safetensors_files(path))
    torch_dtype = resolve_dtype(dtype, config, device)
    plan = combined_plan(native, requantized)
    # Every quantized matrix, the file's own and those quantized at load, is built as its
    # tensors arrive; the rest load dense.
    model = build_empty_model(config, torch_dtype, device, plan)
    if any(requantized.values()):
        weights = quantized_as_read(model, weights, requantized, torch_dtype, str(path))  # type: ignore[assignment]
    if any(plan.values()):
        weights = load_planned_weights(model, weights, torch_dtype, device)  # type: ignore[arg-type]
    load_weights(model, weights, str(path))
    # Decoding a GGUF file allocates many block-sized temporaries; without a trim the process
    # kept ~2x the model's bytes resident (SmolLM2-135M Q4_1: 387 -> 203 MB over the
    # interpreter's baseline, measured).
    trim_heap()
    logger.info(
        "weights: %.1f MB (matrices: %s)",
        plan_weight_bytes(config, torch_dtype.itemsize, plan) / 1e6,
        plan_summary(plan),
    )
    return model, config
