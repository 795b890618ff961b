"""Which model class serves which architecture.

``config.json``'s ``architectures`` (through ``ModelConfig.architecture``) and GGUF's
``general.architecture`` both resolve to a family name; the family name picks the class.
"""

from __future__ import annotations

from torch import nn

from carpool.config import ModelConfig
from carpool.errors import ModelLoadError
from carpool.model.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
}

# GGUF ``general.architecture`` -> family. llama.cpp writes Mistral checkpoints as "llama".
GGUF_ARCHITECTURES: dict[str, str] = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def model_class_for(config: ModelConfig, source: str = "config") -> type[nn.Module]:
    """Return the class that implements ``config.architecture``.

    Raises:
        ModelLoadError: no class implements it.
    """
    cls = MODEL_CLASSES.get(config.architecture)
    if cls is None:
        raise ModelLoadError(
            f"{source}: unsupported architecture {config.architecture!r}; "
            f"supported: {sorted(MODEL_CLASSES)}"
        )
    return cls
