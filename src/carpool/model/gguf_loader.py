"""Load a llama.cpp GGUF file as a ``ModelConfig`` and a Hugging Face state dict.

GGUF keeps llama.cpp's own names (``blk.3.attn_q.weight``) and, for the ``llama`` architecture,
q/k projections whose rows llama.cpp's converter (``convert_hf_to_gguf.py``) permuted from
Hugging Face's "rotate halves" rotary layout to its own "rotate pairs" one. This module maps the
names back and undoes that permutation, so the result feeds the same model code as a safetensors
checkpoint. ``GGUFCheckpoint`` yields quantized tensors as ``QuantWeight``s (kept
quantized, see ``gguf_quant``) and dequantizes the others one at a time; ``load_gguf``
dequantizes everything. Qwen2/Qwen3 use "rotate halves" in llama.cpp too (``NEOX`` rope), so
their converter does not permute and neither do we.

Mistral checkpoints are written by llama.cpp under architecture ``llama``; they load as
``llama`` (same computation; GGUF does not record Mistral's sliding window).

The file is parsed by ``gguf_file.GGUFFile`` (metadata as Python values, tensor data as views of
one memory map); only memory maps and ``numpy`` views are used: nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, LlamaFileType
from gguf.quants import dequantize

from carpool.config import ModelConfig
from carpool.errors import ModelLoadError
from carpool.model.gguf_file import GGUFFile, GGUFTensorInfo
from carpool.model.gguf_quant import QuantWeight, decode_blocks
from carpool.model.gguf_rope import ROPE_FREQS, f32, gguf_rope_scaling
from carpool.model.pages import trim_heap
from carpool.model.quant_plan import GGUF_METHODS

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

_Q = GGMLQuantizationType
# Dense types, and every block type read into a kernel's terms (quant_plan.GGUF_METHODS).
SUPPORTED_TENSOR_TYPES = frozenset({_Q.F32, _Q.F16, _Q.BF16, *(_Q[t] for t in GGUF_METHODS)})

# Per-layer GGUF name stem -> Hugging Face module path inside ``model.layers.{i}``.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


# ``dtype="auto"`` per file type. Quantized files compute in float32 (a bfloat16 residual stream
# broke SmolLM2-135M-Instruct Q4_1's greedy answers), their quantized matmuls in the kernels'
# bf16 (``quant.kernel_dtype``). F16 -> bfloat16 on CPU.
_FILE_TYPE_DTYPES = {LlamaFileType.ALL_F32: "float32", LlamaFileType.MOSTLY_BF16: "bfloat16"}
_FILE_TYPE_DTYPES[LlamaFileType.MOSTLY_F16] = "float16"


def read_gguf_config(path: str | Path) -> ModelConfig:
    """Read the model description from a GGUF file's metadata (no tensor data is read).

    Args:
        path: the ``.gguf`` file.

    Returns:
        The ``ModelConfig``; ``tie_word_embeddings`` is true when the file has no
        ``output.weight``, and a ``rope_freqs.weight`` tensor becomes a llama3 ``rope_scaling``.

    Raises:
        ModelLoadError: the file is missing, not GGUF, truncated, or describes an unsupported
            model.
    """
    path = Path(path)
    with GGUFFile(path) as reader:
        return _config_from_reader(reader, path)


def load_gguf(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load a GGUF checkpoint as a config and a Hugging Face-named, dequantized state dict.

    Args:
        path: the ``.gguf`` file.
        dtype: dtype of the returned tensors (dequantization itself runs in float32).

    Returns:
        ``(config, state_dict)``: tensors under Hugging Face names in Hugging Face orientation
        (``lm_head.weight`` absent when tied); ``config.torch_dtype`` names ``dtype``.

    Raises:
        ModelLoadError: as ``read_gguf_config``, or a tensor is missing, unexpected, of the
            wrong shape, or in a quantization type that cannot be dequantized.
    """
    path = Path(path)
    with GGUFFile(path) as reader:
        config = _config_from_reader(reader, path)
        weights = _iter_weights(reader, config, path, quantized=())
        state = {name: t.to(dtype) for name, t in weights}
    config = dataclasses.replace(config, torch_dtype=str(dtype).removeprefix("torch."))
    return config, state  # type: ignore[return-value]


class GGUFCheckpoint:
    """A GGUF file opened for loading one tensor at a time: ``config`` (as
    ``read_gguf_config``) and ``types`` (Hugging Face tensor name -> GGUF type name).

    The file's memory map is released once ``weights()`` has been consumed (or on ``close``):
    every tensor handed over owns its memory, so no page of the file stays mapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reader = GGUFFile(self.path)
        self.config = _config_from_reader(self._reader, self.path)
        self.types = {
            name: t.tensor_type.name
            for t in self._reader.tensors
            if (name := gguf_to_hf_name(t.name)) is not None
        }

    def weights(
        self, quantized: Collection[str] = ()
    ) -> Iterator[tuple[str, torch.Tensor | QuantWeight]]:
        """Yield ``(name, value)``: a ``QuantWeight`` for names in ``quantized`` (tensors of a
        type in ``quant_plan.GGUF_METHODS`` only), otherwise a float32 tensor dequantized on
        the way; q/k rows un-permuted. Errors are raised as by ``load_gguf``."""
        yield from _iter_weights(self._reader, self.config, self.path, frozenset(quantized))
        self.close()

    def close(self) -> None:
        """Release the file (its memory map goes once no tensor view is left)."""
        self._reader.close()


def _iter_weights(
    reader: GGUFFile, config: ModelConfig, path: Path, quantized: Collection[str]
) -> Iterator[tuple[str, torch.Tensor | QuantWeight]]:
    """Checked tensors under Hugging Face names: float32, or ``QuantWeight`` for ``quantized``."""
    expected = expected_shapes(config)
    seen: set[str] = set()
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue
        hf_name = gguf_to_hf_name(t.name)
        if hf_name is None or hf_name not in expected:
            raise ModelLoadError(
                f"{path}: unexpected tensor {t.name!r} for a plain {config.architecture} decoder"
            )
        # GGUF lists dimensions fastest-first (ggml's ne[]); reversed they are the row-major
        # Hugging Face shape, which is also how the bytes are laid out.
        shape = t.shape
        if shape != expected[hf_name]:
            raise ModelLoadError(
                f"{path}: tensor {t.name!r} has shape {list(shape)}, expected "
                f"{list(expected[hf_name])} for {hf_name}"
            )
        if t.tensor_type not in SUPPORTED_TENSOR_TYPES:
            raise ModelLoadError(
                f"{path}: tensor {t.name!r} has unsupported type {t.tensor_type.name}; "
                f"supported: {sorted(q.name for q in SUPPORTED_TENSOR_TYPES)}"
            )
        n_head = None
        if config.architecture == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            n_head = config.num_attention_heads
        elif config.architecture == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            n_head = config.num_key_value_heads
        seen.add(hf_name)
        raw = reader.tensor_data(t)  # a view of the file's memory map
        if hf_name in quantized:
            if n_head is not None:  # reorder the packed block rows: one copy of the file bytes
                raw = raw[_unpermute(np.arange(shape[0]), n_head)]
            # decode_blocks copies what it keeps: the weight holds no view of the map. Int4
            # codes come packed (a slice at a time: never a matrix's one-byte codes whole).
            value: torch.Tensor | QuantWeight = decode_blocks(
                raw,  # type: ignore[arg-type]
                t.tensor_type.name,
                shape,
                pack=True,
            )
        else:
            bf16 = t.tensor_type == _Q.BF16
            if bf16 or t.tensor_type == _Q.F16:
                # As they are (2 bytes a weight): gguf-py widens them to float32 through
                # temporaries of several times that (small's BF16 embedding set its load
                # peak, 128 MiB over the loaded size); the consumer's copy into the model's
                # dtype rounds as from the widened values (the widening is exact).
                data = np.asarray(raw).view(np.uint16 if bf16 else np.float16).reshape(shape)
            else:
                data = dequantize(raw, t.tensor_type).reshape(shape).astype(np.float32, copy=False)
            if n_head is not None:
                data = _unpermute(data, n_head)
            data = np.ascontiguousarray(data)
            if np.may_share_memory(data, raw):
                data = data.copy()  # a view of the map: own it before the file closes
            value = torch.from_numpy(data)
            if bf16:
                value = value.view(torch.bfloat16)
        del raw  # data, when set, is the value itself or a copy
        reader.release(t)  # its file pages leave the RSS; the next tensor's come in
        yield hf_name, value
        del value
        # The consumer has packed it: its temporaries back to the OS. Without a trim per tensor
        # they piled up to ~2x the weights before the loader's final trim (SmolLM2-135M Q4_1,
        # measured: BENCHMARKS.md, "GGUF loading: time and peak memory").
        trim_heap()
    missing = [n for n in expected if n not in seen]
    if missing:
        raise ModelLoadError(f"{path}: missing tensors {missing[:5]} ({len(missing)} in all)")


def gguf_to_hf_name(name: str) -> str | None:
    """Hugging Face parameter name of a GGUF tensor name, or None when there is none."""
    stem, dot, suffix = name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdecimal() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter the model consumes, by Hugging Face name, with its shape."""
    h, i, v, d = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })  # fmt: skip
        if config.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})  # fmt: skip
            if config.architecture != "qwen2":  # Llama/Qwen3 `attention_bias` covers o_proj too
                shapes[p + "self_attn.o_proj.bias"] = (h,)
        if config.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        if config.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (i,), p + "mlp.up_proj.bias": (i,),
                           p + "mlp.down_proj.bias": (h,)})  # fmt: skip
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's q/k row permutation (per head: halves -> interleaved pairs)."""
    # w: [n_head * head_dim, ...], stored as [n_head, head_dim/2, 2, ...];
    # HF order is [n_head, 2, head_dim/2, ...].
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _config_from_reader(reader: GGUFFile, path: Path) -> ModelConfig:
    meta = reader.get

    def required(key: str) -> Any:
        value = meta(key)
        if value is None:
            raise ModelLoadError(f"{path}: required metadata key {key!r} is missing")
        return value

    arch = meta("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: unsupported architecture {arch!r}; supported: {list(SUPPORTED_ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    try:
        hidden = int(required(f"{arch}.embedding_length"))
        heads = int(required(f"{arch}.attention.head_count"))
        head_dim = int(
            meta(f"{arch}.attention.key_length")
            or meta(f"{arch}.rope.dimension_count")
            or hidden // heads
        )
        theta = f32(meta(f"{arch}.rope.freq_base") or 10000.0)
        eos = [meta(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        file_type = meta("general.file_type")
        return ModelConfig(
            architecture=arch,
            vocab_size=_vocab_size(reader, arch, tensors),
            hidden_size=hidden,
            intermediate_size=int(required(f"{arch}.feed_forward_length")),
            num_hidden_layers=int(required(f"{arch}.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(meta(f"{arch}.attention.head_count_kv") or heads),
            head_dim=head_dim,
            rms_norm_eps=f32(meta(f"{arch}.attention.layer_norm_rms_epsilon") or 1e-6),
            rope_theta=theta,
            rope_scaling=gguf_rope_scaling(reader, arch, theta, head_dim, path),
            max_position_embeddings=int(meta(f"{arch}.context_length") or 2048),
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
            qk_norm=arch == "qwen3",
            mlp_bias="blk.0.ffn_up.bias" in tensors,
            sliding_window=None,
            bos_token_id=meta("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
            torch_dtype=_FILE_TYPE_DTYPES.get(file_type, "float32"),
        )
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: inconsistent GGUF metadata ({e})") from None


def _vocab_size(reader: GGUFFile, arch: str, tensors: dict[str, GGUFTensorInfo]) -> int:
    """``{arch}.vocab_size``, else the tokenizer's token count, else the embedding's rows."""
    size = reader.get(f"{arch}.vocab_size")
    if size is not None:
        return int(size)
    tokens = reader.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens)
    if "token_embd.weight" in tensors:
        return int(tensors["token_embd.weight"].dims[-1])  # ne[1] = rows = vocab
    raise ValueError("no vocab_size, tokenizer.ggml.tokens or token_embd.weight")
