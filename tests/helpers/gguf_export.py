"""Write a Hugging Face checkpoint as a GGUF file the way llama.cpp's converter lays it out.

This mirrors ``convert_hf_to_gguf.py`` (``LlamaModel`` for Llama/Mistral, ``Qwen2Model`` and
``Qwen3Model``) closely enough for tests: the same tensor names, the q/k row permutation for the
``llama`` architecture, the same metadata keys, 1-D tensors and norms kept in F32, 2-D weights
quantized with ``gguf.quants.quantize`` (falling back to F16 when a row does not split into
blocks), Llama 3.1 rope scaling as a ``rope_freqs.weight`` tensor, and a ``gpt2``-kind vocabulary
from a ``tokenizer.json``.

It is deliberately independent of ``carpool.model.gguf_loader`` (its own name table and
permutation) so that a loader bug cannot cancel out against an exporter bug.

Differences from the real converter, all harmless for loading:
  * ``Q4_0`` is not a converter output type; it is written as ``llama-quantize --pure Q4_0``
    would (every 2-D weight Q4_0, norms F32). ``Q4_K`` likewise (``--pure Q4_K_S``), with its
    own quantizer (``quantize_q4_k``: gguf-py only reads K-quants), min/max per sub-block rather
    than llama.cpp's search, so its blocks are valid Q4_K but not llama-quantize's bytes.
    ``Q4_K_M`` is a simplified Q4_K_M: Q6_K (``quantize_q6_k``) for ``attn_v``, ``ffn_down``
    and ``output`` in every layer (llama.cpp's gives some layers' ``attn_v`` / ``ffn_down``
    Q4_K), Q4_K for the other matrices.
  * without a tokenizer the converter refuses to run; here the vocabulary is simply omitted and
    ``bos``/``eos`` ids are taken from ``config.json``.
  * the pre-tokenizer name (``tokenizer.ggml.pre``) is given by the caller, not hashed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",  # llama.cpp converts Mistral with LlamaModel
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

_FTYPES = {
    "F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "Q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "Q5_0": (gguf.GGMLQuantizationType.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "IQ4_NL": (gguf.GGMLQuantizationType.IQ4_NL, gguf.LlamaFileType.MOSTLY_IQ4_NL),
    "Q4_K": (gguf.GGMLQuantizationType.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_S),
    "Q4_K_M": (gguf.GGMLQuantizationType.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M),
}
# A K-quant's type for rows that are not a multiple of its 256-weight super-block, as
# llama-quantize falls back ("using fallback quantization q5_0").
_K_FALLBACK = {
    gguf.GGMLQuantizationType.Q4_K: gguf.GGMLQuantizationType.Q5_0,
    gguf.GGMLQuantizationType.Q6_K: gguf.GGMLQuantizationType.Q8_0,
}
# Q4_K_M's tensors of more bits (see the module docstring).
_Q6_K_NAMES = (".attn_v.weight", ".ffn_down.weight")  # in every layer; and output.weight

# Hugging Face module path inside a layer -> llama.cpp tensor stem (gguf's TensorNameMap).
_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def export_hf_to_gguf(
    source: str | Path | Mapping[str, torch.Tensor],
    out_path: str | Path,
    ftype: str = "F32",
    *,
    config: Mapping[str, Any] | Any | None = None,
    tokenizer: str | Path | None = None,
    tokenizer_pre: str = "default",
) -> Path:
    """Write ``source`` as a GGUF file.

    Args:
        source: a directory with ``config.json`` and ``*.safetensors`` (``save_pretrained``
            output), or a state dict under Hugging Face names (then ``config`` is required).
        out_path: the ``.gguf`` file to write.
        ftype: ``"F32"``, ``"F16"``, ``"BF16"``, ``"Q8_0"``, ``"Q4_0"``, ``"Q4_1"``,
            ``"Q5_0"``, ``"IQ4_NL"``, ``"Q4_K"`` or ``"Q4_K_M"``: the type of 2-D weights
            (where a row does not split into 256-weight super-blocks, a K-quant falls back as
            llama-quantize's: Q4_K to Q5_0, Q6_K to Q8_0; F16 where it does not split into
            blocks).
        config: the Hugging Face config as a dict (or an object with ``to_dict()``); read from
            ``source/config.json`` when omitted.
        tokenizer: a directory holding ``tokenizer.json`` (and optionally
            ``tokenizer_config.json``) to write as ``gpt2``-kind vocabulary metadata.
        tokenizer_pre: the value of ``tokenizer.ggml.pre`` (llama.cpp's pre-tokenizer name).

    Returns:
        ``out_path`` as a ``Path``.
    """
    if ftype not in _FTYPES:
        raise ValueError(f"ftype must be one of {sorted(_FTYPES)}, got {ftype!r}")
    hp, state, name = _read_source(source, config)
    arch = _arch_of(hp)
    qtype, file_type = _FTYPES[ftype]
    out_path = Path(out_path)
    writer = gguf.GGUFWriter(out_path, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _write_hparams(writer, hp, arch, file_type)
    for gguf_name, data in _gguf_tensors(hp, arch, state):
        if data.ndim <= 1 or gguf_name.endswith("_norm.weight"):
            tensor_type = gguf.GGMLQuantizationType.F32
        elif ftype == "Q4_K_M" and (
            gguf_name == "output.weight" or gguf_name.endswith(_Q6_K_NAMES)
        ):
            tensor_type = gguf.GGMLQuantizationType.Q6_K
        else:
            tensor_type = qtype
        if data.ndim == 2 and data.shape[1] % 256 and tensor_type in _K_FALLBACK:
            tensor_type = _K_FALLBACK[tensor_type]  # rows that do not split into super-blocks
        try:
            if tensor_type == gguf.GGMLQuantizationType.Q4_K:
                raw = quantize_q4_k(data)
            elif tensor_type == gguf.GGMLQuantizationType.Q6_K:
                raw = quantize_q6_k(data)
            elif tensor_type == gguf.GGMLQuantizationType.IQ4_NL:
                raw = quantize_iq4_nl(data)
            else:
                raw = gguf.quants.quantize(data, tensor_type)
        except gguf.QuantError:  # row length not a multiple of the block size
            tensor_type = gguf.GGMLQuantizationType.F16
            raw = gguf.quants.quantize(data, tensor_type)
        writer.add_tensor(gguf_name, raw, raw_dtype=tensor_type)
    if tokenizer is not None:
        _write_vocab(writer, Path(tokenizer), hp, tokenizer_pre)
    else:
        _write_special_ids(writer, hp, {})
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """``w`` ``[N, K]`` (K a multiple of 256) as Q4_K blocks, ``[N, K / 256 * 144]`` uint8.

    Per sub-block of 32: scale ``(max - min) / 15`` and minimum ``-min`` (min clamped to <= 0,
    as ggml's), each super-block's 6-bit ``sc`` / ``m`` relative to ``d = max scale / 63`` and
    ``dmin = max minimum / 63`` (fp16), codes rounded to the nearest of the 16 levels.

    Raises:
        gguf.QuantError: K is not a multiple of 256.
    """
    n, k = w.shape
    if k % 256:
        raise gguf.QuantError(f"Q4_K needs rows of a multiple of 256, got {k}")
    sub = w.astype(np.float32).reshape(n, k // 256, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0.0)
    scale = (sub.max(axis=-1) - lo) / 15.0  # [N, K/256, 8]
    minimum = -lo
    d = (scale.max(axis=-1) / 63.0).astype(np.float16)  # [N, K/256]
    dmin = (minimum.max(axis=-1) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[..., None], dmin.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.clip(np.rint(scale / d32), 0, 63), 0).astype(np.uint8)
        m = np.where(dmin32 > 0, np.clip(np.rint(minimum / dmin32), 0, 63), 0).astype(np.uint8)
        step = (d32 * sc)[..., None]
        q = np.where(step > 0, np.rint((sub + (dmin32 * m)[..., None]) / step), 0)
    q = np.clip(q, 0, 15).astype(np.uint8)  # [N, K/256, 8, 32]
    packed = np.empty((n, k // 256, 12), dtype=np.uint8)  # as ggml's get_scale_min_k4 reads
    packed[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    packed[..., 4:8] = (m[..., 0:4] & 63) | ((m[..., 4:8] >> 4) << 6)
    packed[..., 8:12] = (sc[..., 4:8] & 0xF) | ((m[..., 4:8] & 0xF) << 4)
    nibbles = q[..., 0::2, :] | (q[..., 1::2, :] << 4)  # [N, K/256, 4, 32]: pairs of sub-blocks
    blocks = np.concatenate(
        (
            d.view(np.uint8).reshape(n, k // 256, 2),
            dmin.view(np.uint8).reshape(n, k // 256, 2),
            packed,
            nibbles.reshape(n, k // 256, 128),
        ),
        axis=-1,
    )
    return blocks.reshape(n, -1)


def quantize_iq4_nl(w: np.ndarray) -> np.ndarray:
    """``w`` ``[N, K]`` (K a multiple of 32) as IQ4_NL blocks, ``[N, K / 32 * 18]`` uint8: per
    32 weights ``d = max |w| / 127`` (fp16) and each weight's nearest of the 16 non-linear
    levels ``d * kvalues``, nibbles laid out as Q4_0's.

    Raises:
        gguf.QuantError: K is not a multiple of 32.
    """
    n, k = w.shape
    if k % 32:
        raise gguf.QuantError(f"IQ4_NL needs rows of a multiple of 32, got {k}")
    levels = np.array(gguf.quants.IQ4_NL.kvalues, dtype=np.float32)
    blocks = w.astype(np.float32).reshape(n, k // 32, 32)
    d = (np.abs(blocks).max(axis=-1) / 127.0).astype(np.float16)  # [N, K/32]
    d32 = d.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(d32 > 0, blocks / d32, 0.0)
    q = np.abs(scaled[..., None] - levels).argmin(axis=-1).astype(np.uint8)  # [N, K/32, 32]
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    out = np.concatenate((d.view(np.uint8).reshape(n, k // 32, 2), nibbles), axis=-1)
    return out.reshape(n, -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """``w`` ``[N, K]`` (K a multiple of 256) as Q6_K blocks, ``[N, K / 256 * 210]`` uint8.

    Per sub-block of 16: scale ``max |w| / 32`` as an int8 multiple of ``d = max scale / 127``
    (fp16), 6-bit codes ``q = round(w / (d sc)) + 32`` in 0..63; laid out as ggml's
    ``dequantize_row_q6_K`` reads them (low nibbles, high bit pairs, scales, ``d``).

    Raises:
        gguf.QuantError: K is not a multiple of 256.
    """
    n, k = w.shape
    if k % 256:
        raise gguf.QuantError(f"Q6_K needs rows of a multiple of 256, got {k}")
    nb = k // 256
    sub = w.astype(np.float32).reshape(n, nb, 16, 16)
    scale = np.abs(sub).max(axis=-1) / 32.0  # [N, nb, 16]
    d = (scale.max(axis=-1) / 127.0).astype(np.float16)  # [N, nb]
    d32 = d.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.clip(np.rint(scale / d32), -128, 127), 0).astype(np.int8)
        step = (d32 * sc)[..., None]
        q = np.where(step != 0, np.rint(sub / step), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n, nb, 256)
    # Weight 128 h + 64 s + b: the low nibble (s = 0) or high one (s = 1) of ql[64 h + b];
    # weight 128 h + 32 t + c: bits 2t..2t+1 of qh[32 h + c] hold its top two bits.
    halves = q.reshape(n, nb, 2, 2, 64)  # [h, s, b]
    ql = (halves[:, :, :, 0] & 0xF) | ((halves[:, :, :, 1] & 0xF) << 4)  # [N, nb, 2, 64]
    top = (q >> 4).reshape(n, nb, 2, 4, 32)  # [h, t, c]
    qh = top[:, :, :, 0] | (top[:, :, :, 1] << 2) | (top[:, :, :, 2] << 4) | (top[:, :, :, 3] << 6)
    blocks = np.concatenate(
        (
            ql.reshape(n, nb, 128),
            qh.reshape(n, nb, 64),
            sc.view(np.uint8),
            d.view(np.uint8).reshape(n, nb, 2),
        ),
        axis=-1,
    )
    return blocks.reshape(n, -1)


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's ``LlamaModel.permute``: per head, "rotate halves" rows -> pairs."""
    # w: [n_head * head_dim, ...] as [n_head, 2, head_dim/2, ...] -> [n_head, head_dim/2, 2, ...]
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _read_source(
    source: str | Path | Mapping[str, torch.Tensor], config: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    if isinstance(source, Mapping):
        if config is None:
            raise ValueError("a state dict source needs config=")
        state, name = dict(source), "carpool-test"
    else:
        directory = Path(source)
        state = {}
        for part in sorted(directory.glob("*.safetensors")):
            state.update(load_file(part))
        name = directory.name
        if config is None:
            config = json.loads((directory / "config.json").read_text())
    hp = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    return hp, state, name


def _arch_of(hp: Mapping[str, Any]) -> str:
    for a in hp.get("architectures") or []:
        if a in _ARCHS:
            return _ARCHS[a]
    if hp.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[hp["model_type"]]
    raise ValueError(f"unsupported architecture {hp.get('architectures') or hp.get('model_type')}")


def _rope_params(hp: Mapping[str, Any]) -> dict[str, Any]:
    """Transformers 5 ``rope_parameters`` or older ``rope_scaling`` + ``rope_theta``, merged."""
    params = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    if "rope_theta" not in params and hp.get("rope_theta") is not None:
        params["rope_theta"] = hp["rope_theta"]
    return params


def _head_dim(hp: Mapping[str, Any]) -> int:
    return int(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])


def _write_hparams(writer: gguf.GGUFWriter, hp: Mapping[str, Any], arch: str, ftype: int) -> None:
    writer.add_block_count(hp["num_hidden_layers"])
    writer.add_context_length(hp["max_position_embeddings"])
    writer.add_embedding_length(hp["hidden_size"])
    writer.add_feed_forward_length(hp["intermediate_size"])
    writer.add_head_count(hp["num_attention_heads"])
    writer.add_head_count_kv(hp.get("num_key_value_heads") or hp["num_attention_heads"])
    rope = _rope_params(hp)
    kind, factor = rope.get("rope_type"), rope.get("factor")
    if kind == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.get("head_dim") is not None:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_file_type(ftype)
    if arch == "llama":
        writer.add_vocab_size(hp["vocab_size"])
        writer.add_rope_dimension_count(_head_dim(hp))


def _gguf_tensors(
    hp: Mapping[str, Any], arch: str, state: Mapping[str, torch.Tensor]
) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32/float16 array) in the converter's order: extra tensors first."""
    rope = _rope_params(hp)
    if arch == "llama" and rope.get("rope_type") == "llama3":
        yield "rope_freqs.weight", _llama3_rope_factors(rope, _head_dim(hp))
    n_head = hp["num_attention_heads"]
    n_kv = hp.get("num_key_value_heads") or n_head
    tied = bool(hp.get("tie_word_embeddings", False))
    for hf_name, tensor in state.items():
        if hf_name.endswith(".rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        data = tensor.detach().cpu()
        if data.dtype not in (torch.float16, torch.float32):
            data = data.to(torch.float32)
        data = data.numpy()
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = llama_permute(data, n_head)
        elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = llama_permute(data, n_kv)
        yield _gguf_name(hf_name), data


def _gguf_name(hf_name: str) -> str:
    module, _, suffix = hf_name.rpartition(".")
    if module in _GLOBAL:
        return f"{_GLOBAL[module]}.{suffix}"
    parts = module.split(".", 3)  # model, layers, i, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER:
        return f"blk.{parts[2]}.{_LAYER[parts[3]]}.{suffix}"
    raise ValueError(f"cannot map tensor {hf_name!r} to a GGUF name")


def _llama3_rope_factors(rope: Mapping[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors llama.cpp applies for Llama 3.1 rope scaling."""
    base = rope.get("rope_theta", 10000.0)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _write_vocab(writer: gguf.GGUFWriter, directory: Path, hp: Mapping[str, Any], pre: str) -> None:
    """``gpt2``-kind vocabulary from ``tokenizer.json``, padded to ``vocab_size`` as converted."""
    tok = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    cfg_path = directory / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    id_to_token = {i: t for t, i in tok["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    id_to_token.update({i: a["content"] for i, a in added.items()})
    vocab_size = int(hp.get("vocab_size") or len(id_to_token))
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in id_to_token:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(id_to_token[i])
            special = added[i].get("special", False)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(id_to_token[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    by_content = {t: i for i, t in id_to_token.items()}
    _write_special_ids(writer, hp, {k: by_content.get(_content(tok_cfg.get(f"{k}_token")))
                                    for k in ("bos", "eos")})  # fmt: skip
    for key, add in (("add_bos_token", writer.add_add_bos_token),
                     ("add_eos_token", writer.add_add_eos_token)):  # fmt: skip
        if isinstance(tok_cfg.get(key), bool):
            add(tok_cfg[key])
    if isinstance(tok_cfg.get("chat_template"), str):
        writer.add_chat_template(tok_cfg["chat_template"])


def _content(token: Any) -> str | None:
    """``tokenizer_config.json`` writes special tokens as strings or ``{"content": ...}``."""
    return token.get("content") if isinstance(token, dict) else token


def _write_special_ids(
    writer: gguf.GGUFWriter, hp: Mapping[str, Any], from_tokenizer: Mapping[str, int | None]
) -> None:
    """bos/eos ids: the tokenizer's own first, else ``config.json``'s (first eos of a list)."""
    bos = from_tokenizer.get("bos")
    eos = from_tokenizer.get("eos")
    if bos is None:
        bos = hp.get("bos_token_id")
    if eos is None:
        eos = hp.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
    if isinstance(bos, int):
        writer.add_bos_token_id(bos)
    if isinstance(eos, int):
        writer.add_eos_token_id(eos)
