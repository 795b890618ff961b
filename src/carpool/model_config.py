"""The model's description: ``ModelConfig`` (and its rotary scaling) read from config.json or GGUF.

``ModelConfig`` is the one description of a decoder that every other stage reads: the model
builds its layers from it, the KV-cache planner sizes blocks from it, and the loaders produce it
from a Hugging Face ``config.json`` or from GGUF metadata.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carpool.errors import ModelLoadError

# Hugging Face ``architectures`` names -> our family name. The registry in
# ``carpool.model.registry`` maps family names to model classes.
HF_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling (``rope_scaling`` in config.json).

    Only ``rope_type="llama3"`` (Llama 3.1+) and ``"linear"`` change the frequencies;
    ``"default"`` leaves them alone.
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"unsupported rope_scaling type {self.rope_type!r}")

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None) -> RopeScaling | None:
        kind = (d or {}).get("rope_type", (d or {}).get("type", "default"))
        if not d or kind == "default":
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and k != "rope_type"}
        return cls(rope_type=kind, **kw)


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a LLaMA-family decoder.

    ``architecture`` is the family name (``llama``, ``mistral``, ``qwen2``, ``qwen3``); the
    per-family differences are expressed as flags (``attention_bias``, ``qk_norm``) so one model
    file serves them all.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2 always has it)
    qk_norm: bool = False  # RMSNorm on each head of q and k before rotary (Qwen3)
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + generated) served exactly.

        Sliding-window attention is not implemented, so a model with a window is limited to it:
        within the window, full attention and sliding-window attention are the same computation.
        """
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token takes in ``torch_dtype`` (see ``kv_bytes_per_token_for``)."""
        return self.kv_bytes_per_token_for(dtype_bytes(self.torch_dtype))

    def kv_bytes_per_token_for(self, kv: int | str) -> int:
        """KV bytes per token: ``2 (K and V) x layers x kv_heads x row bytes``.

        ``kv``: bytes per element (a row is ``head_dim x kv``), or a cache dtype by name, where
        ``"int8"`` is the engine's quantized cache (``kv_cache_dtype="int8"``: a row is
        ``head_dim`` int8 values + a 4-byte float32 scale, see ``kv_row_bytes``). Every KV size
        in the engine and the planners goes through here, so they agree. With grouped-query
        attention this is ``heads / kv_heads`` times below the classic ``2 x layers x hidden``.
        """
        row = kv_row_bytes(self.head_dim, kv)
        return 2 * self.num_hidden_layers * self.num_key_value_heads * row

    @property
    def num_parameters(self) -> int:
        """Parameter count computed from the shapes (embedding and head counted once if tied)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        if self.qk_norm:
            attn += 2 * self.head_dim
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        layer = attn + mlp + 2 * h
        embed = v * h
        head = 0 if self.tie_word_embeddings else v * h
        return self.num_hidden_layers * layer + embed + head + h

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dictionary.

        Raises:
            ModelLoadError: the architecture is not supported or a required key is missing.
        """
        archs = d.get("architectures") or []
        family = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
        if family is None:
            family = {
                "llama": "llama",
                "mistral": "mistral",
                "qwen2": "qwen2",
                "qwen3": "qwen3",
            }.get(d.get("model_type", ""))
        if family is None:
            raise ModelLoadError(
                f"{source}: unsupported architecture {archs or d.get('model_type')!r}; "
                f"supported: {sorted(HF_ARCHITECTURES)}"
            )
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            use_window = d.get("use_sliding_window", family == "mistral")
            # transformers >= 5 folds rope_theta and the scaling into ``rope_parameters``.
            rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
            theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
            return cls(
                architecture=family,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=RopeScaling.from_hf(rope),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=family == "qwen2" or bool(d.get("attention_bias", False)),
                qk_norm=family == "qwen3",
                mlp_bias=bool(d.get("mlp_bias", False)),
                sliding_window=(d.get("sliding_window") or None) if use_window else None,
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
                torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            )
        except KeyError as e:
            raise ModelLoadError(f"{source}: required key {e.args[0]!r} is missing") from None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        """Read a ``config.json`` file (see ``from_hf_dict``)."""
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"{path}: config file not found")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ModelLoadError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(d, source=str(path))


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1, "fp8": 1, "int8": 1}


# ``EngineConfig.kv_cache_dtype``: the model's dtype, bfloat16 (a float32 model's cache at half
# the bytes, as llama.cpp's default f16 cache), or int8 rows with a float32 scale each.
KV_CACHE_DTYPES = ("auto", "bfloat16", "int8")
KV_INT8_SCALE_BYTES = 4


def kv_row_bytes(head_dim: int, kv: int | str) -> int:
    """Bytes of one (token, K or V, kv head) row of the cache.

    Args:
        head_dim: values per row.
        kv: bytes per element, or a dtype name; ``"int8"`` is the quantized layout of
            ``carpool.model.kv_quant``: ``head_dim`` int8 values then the row's float32 scale.
    """
    if kv == "int8":
        return head_dim + KV_INT8_SCALE_BYTES
    nbytes = dtype_bytes(kv) if isinstance(kv, str) else kv
    return head_dim * nbytes


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype given by name (``float32``, ``bfloat16``, ``float16``...)."""
    key = name.replace("torch.", "")
    if key not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[key]
