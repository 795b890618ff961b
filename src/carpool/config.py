"""Frozen engine configuration: ``EngineConfig``, the one source of every engine default.

The model's own description (``ModelConfig``) lives in ``carpool.model_config`` and the option
helpers (``option``, parsers, ``check_positive``) in ``carpool.options``; both are re-exported
here so ``from carpool.config import ModelConfig`` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass

from carpool.model_config import (
    HF_ARCHITECTURES,
    KV_CACHE_DTYPES,
    ModelConfig,
    RopeScaling,
    dtype_bytes,
    kv_row_bytes,
)
from carpool.options import check_positive, option, parse_bytes, parse_int_list

__all__ = [
    "BATCHING_STRATEGIES",
    "DEFAULT_BLOCK_SIZE",
    "HF_ARCHITECTURES",
    "KV_CACHE_DTYPES",
    "LAYOUTS",
    "QUANTIZATION_CHOICES",
    "SCHEDULING_POLICIES",
    "EngineConfig",
    "ModelConfig",
    "RopeScaling",
    "check_positive",
    "dtype_bytes",
    "kv_row_bytes",
    "option",
    "parse_bytes",
    "parse_int_list",
]

BATCHING_STRATEGIES = ("sequential", "static", "bucketed", "dynamic", "continuous")
# ``EngineConfig.quantization``: None (a GGUF file's own), or weight-only at load.
QUANTIZATION_CHOICES = (None, "none", "int8", "int4")
# How one step lays out sequences of different lengths (see ``carpool.worker.padded``).
LAYOUTS = ("ragged", "padded")
# Waiting-queue orders (see ``carpool.scheduling.priority``).
SCHEDULING_POLICIES = ("fcfs", "priority")
# ``EngineConfig.threads``' value for the physical cores of the machine the engine runs on
# (counted there: ``carpool.engine.threads.resolve_threads``).
AUTO_THREADS = "auto"


def parse_threads(text: str) -> int | str:
    """``--threads``: ``"2"`` -> 2, ``"auto"`` -> ``AUTO_THREADS``.

    Raises:
        ValueError: neither an int nor ``auto``.
    """
    if text.strip().lower() == AUTO_THREADS:
        return AUTO_THREADS
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not a thread count or {AUTO_THREADS!r}: {text!r}") from None


# Tokens per KV block: ``EngineConfig.block_size``'s default, and that of the planning functions
# and the BlockManager, which take a block size without an EngineConfig.
DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class EngineConfig:
    """Everything an ``LLMEngine`` needs to start: the one source of every engine default.

    Each field's ``help`` (and ``choices``/``parse``) in its metadata is also its command-line
    flag (``--field-name``, see ``carpool.entrypoints.config_args``), so an option is written
    once. The scheduling policies read their knobs from here too.
    """

    model: str | None = option(
        None,
        "local directory or .gguf file, Hugging Face Hub id ORG/NAME, or ORG/NAME:QUANT for a "
        "GGUF repository (None: SmolLM2-135M-Instruct when installed, else the embedded model; "
        "'embedded': the 4M test model)",
    )
    revision: str | None = option(None, "Hub branch, tag or commit of a Hub --model (None: main)")
    gguf_file: str | None = option(
        None, "the .gguf file to use in a Hub GGUF repository --model (None: safetensors)"
    )
    dtype: str = option(
        "auto",
        "weight and activation dtype (auto: the checkpoint's; float16 becomes bfloat16 on CPU)",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    device: str = option("cpu", "torch device for the weights and the KV cache")
    kv_cache_memory: int | None = option(
        None,
        "KV cache size in bytes, e.g. 256MiB (None: kv_cache_memory_fraction of the memory "
        "available now, capped at what max_num_seqs sequences of max_model_len tokens use)",
        parse=parse_bytes,
    )
    kv_cache_dtype: str = option(
        "auto",
        "KV cache storage: auto (the model's dtype, but bfloat16 for a float32 model with "
        "quantized matrices, e.g. a GGUF Q8_0/Q4 file), bfloat16 (a float32 model's cache at "
        "half the bytes, like llama.cpp's default f16 cache; attention math stays float32) or int8 "
        "(per-row int8 values with a float32 scale: about half the bytes of bfloat16, so ~1.9x "
        "the tokens per budget and half the bytes decode attention reads; with AVX-512 VNNI "
        "decode attention takes integer dot products, queries rounded to int8 per 64 values)",
        choices=KV_CACHE_DTYPES,
    )
    kv_cache_memory_fraction: float = option(
        0.2, "fraction of available memory for the KV cache when kv_cache_memory is not set"
    )
    block_size: int = option(DEFAULT_BLOCK_SIZE, "tokens per KV block")
    max_num_seqs: int = option(64, "most sequences in one forward pass")
    max_num_batched_tokens: int = option(
        512, "most tokens in one forward pass; longer prompts are prefilled in chunks"
    )
    max_model_len: int | None = option(
        None, "longest prompt + output (None: the model's own context; more is an error)"
    )
    allow_long_max_model_len: bool = option(
        False,
        "allow --max-model-len above the model's context (positions it was not trained on: "
        "output quality is not guaranteed; like vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN)",
    )
    threads: int | str | None = option(
        None,
        "torch threads of the forward pass (intra-op; inter-op alike): a count, or auto (the "
        "physical cores this process may run on, hyperthreads once, as llama.cpp's default) "
        "(None: DEFAULT_THREADS, capped at the CPU cores, safe on a shared machine; see "
        "BENCHMARKS.md)",
        parse=parse_threads,
    )
    seed: int = option(0, "seed of the engine's shared random generator (unseeded requests)")
    batching: str = option(
        "continuous", "batching strategy (scheduling policy)", choices=BATCHING_STRATEGIES
    )
    layout: str = option(
        "ragged",
        "variable lengths in one pass: ragged (tokens packed, no padding compute) or padded "
        "(a rectangle with a mask; pad tokens are really computed)",
        choices=LAYOUTS,
    )
    batch_size: int = option(
        8, "static/bucketed: requests per batch; dynamic: the largest batch launched"
    )
    max_wait_ms: float = option(
        50.0, "dynamic: launch a partial batch once its oldest request waited this long"
    )
    num_buckets: int = option(
        4, "bucketed: prompt-length buckets, log-spaced from block_size to max_model_len"
    )
    bucket_boundaries: tuple[int, ...] | None = option(
        None,
        "bucketed: ascending inclusive prompt-length bounds, e.g. 32,64,128 (overrides "
        "num_buckets; longer prompts go to one last bucket)",
        parse=parse_int_list,
    )
    quantization: str | None = option(
        None,
        "weight-only quantization at load (None: keep a GGUF file's quantized matrices "
        "quantized and a Hugging Face checkpoint dense; int8/int4: quantize every other matrix "
        "too; none: dequantize everything to dtype)",
        choices=("none", "int8", "int4"),
    )
    enable_prefix_caching: bool = option(
        True,
        "share the KV of full blocks between requests with the same prefix (continuous "
        "batching; the static family ignores it)",
    )
    scheduling_policy: str = option(
        "fcfs",
        "waiting order: fcfs, or priority (lower request priority first; may preempt "
        "worse-priority running requests)",
        choices=SCHEDULING_POLICIES,
    )
    priority_aging_s: float | None = option(
        10.0,
        "priority policy: each this many seconds waited improve a request's effective priority "
        "by 1, so none starves (None: no aging)",
    )

    def __post_init__(self) -> None:
        check_positive(
            self,
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "batch_size",
            "num_buckets",
            "kv_cache_memory",
            "max_model_len",
        )
        if self.threads != AUTO_THREADS:
            try:
                check_positive(self, "threads")
            except ValueError:
                raise ValueError(
                    f"threads must be an int >= 1 or {AUTO_THREADS!r}, got {self.threads!r}"
                ) from None
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(
                f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}"
            )
        if self.batching not in BATCHING_STRATEGIES:
            raise ValueError(
                f"batching must be one of {BATCHING_STRATEGIES}, got {self.batching!r}"
            )
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}"
            )
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(
                f"quantization must be one of {QUANTIZATION_CHOICES}, got {self.quantization!r}"
            )
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling_policy must be one of {SCHEDULING_POLICIES}, "
                f"got {self.scheduling_policy!r}"
            )
        if self.priority_aging_s is not None and not self.priority_aging_s > 0:
            raise ValueError(f"priority_aging_s must be > 0 or None, got {self.priority_aging_s!r}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms!r}")
        if self.bucket_boundaries is not None:
            bounds = tuple(self.bucket_boundaries)
            if (
                not bounds
                or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in bounds)
                or list(bounds) != sorted(set(bounds))
            ):
                raise ValueError(
                    "bucket_boundaries must be strictly ascending ints >= 1, "
                    f"got {self.bucket_boundaries!r}"
                )
            object.__setattr__(self, "bucket_boundaries", bounds)
