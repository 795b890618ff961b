"""carpool: an LLM inference engine built around parallel inference.

The public surface::

    from carpool import LLM, SamplingParams

The torch-backed names (``LLM``, ``LLMEngine``, ``SamplingParams``...) are imported on first use
(PEP 562), so that ``carpool --help`` and the tokenizer-only front ends do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from carpool.config import EngineConfig, ModelConfig
from carpool.errors import CarpoolError, InvalidRequestError, ModelLoadError

if TYPE_CHECKING:
    from carpool.engine.llm_engine import LLMEngine
    from carpool.llm import LLM
    from carpool.outputs import CompletionOutput, RequestOutput
    from carpool.sampling_params import SamplingParams

__version__ = "0.1.0"

_LAZY = {
    "LLM": "carpool.llm",
    "LLMEngine": "carpool.engine.llm_engine",
    "CompletionOutput": "carpool.outputs",
    "RequestOutput": "carpool.outputs",
    "SamplingParams": "carpool.sampling_params",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'carpool' has no attribute {name!r}")


__all__ = [
    "LLM",
    "CarpoolError",
    "CompletionOutput",
    "EngineConfig",
    "InvalidRequestError",
    "LLMEngine",
    "ModelConfig",
    "ModelLoadError",
    "RequestOutput",
    "SamplingParams",
]
