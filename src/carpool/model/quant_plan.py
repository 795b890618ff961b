"""Which weight matrices of a LLaMA-family model are stored quantized, and their bytes.

A plan maps each of our weight-matrix modules (``model.layers.{i}.self_attn.qkv_proj``,
``...o_proj``, ``...mlp.gate_up_proj``, ``...mlp.down_proj``, ``model.embed_tokens`` and, when
untied, ``lm_head``) to ``"int8"``, ``"int4"`` or None (dense in the model dtype). The loader
builds the model from it and ``carpool.capacity.weight_bytes_for`` sizes it, so the engine and
``carpool memory`` count the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

from carpool.config import ModelConfig

QuantPlan = Mapping[str, str | None]

# llama.cpp block types whose weights are re-rounded to int8 with one scale per row (their own
# blocks fit no kernel's groups; see gguf_quant).
REROUNDED = ("Q6_K", "Q5_0", "Q5_1", "Q5_K", "Q3_K", "Q2_K")
# The "i-quants" of imatrix files (lattice codebooks, non-linear 4-bit levels) likewise.
REROUNDED += (
    "IQ4_NL",
    "IQ4_XS",
    "IQ3_S",
    "IQ3_XXS",
    "IQ2_S",
    "IQ2_XS",
    "IQ2_XXS",
    "IQ1_S",
    "IQ1_M",
)
# llama.cpp tensor types read into a kernel's terms.
GGUF_METHODS = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4"}
GGUF_METHODS.update({t: "int8" for t in REROUNDED})

_EMBED = "model.embed_tokens"
_ROW_BLOCK = 64  # int4 weights are padded to whole 64-row blocks (see quant.py)
_GROUP = 32
_SCALE_BYTES = 2  # quantized scales live in bfloat16 (float16 for float16 models)


def matrix_shapes(config: ModelConfig) -> dict[str, tuple[int, int, bool]]:
    """``module -> (out_features, in_features, has_bias)`` of every weight matrix we hold."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    o_bias = c.attention_bias and c.architecture != "qwen2"
    shapes: dict[str, tuple[int, int, bool]] = {_EMBED: (c.vocab_size, c.hidden_size, False)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.qkv_proj"] = (q + 2 * kv, c.hidden_size, c.attention_bias)
        shapes[p + "self_attn.o_proj"] = (c.hidden_size, q, o_bias)
        shapes[p + "mlp.gate_up_proj"] = (2 * c.intermediate_size, c.hidden_size, c.mlp_bias)
        shapes[p + "mlp.down_proj"] = (c.hidden_size, c.intermediate_size, c.mlp_bias)
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (c.vocab_size, c.hidden_size, False)
    return shapes


def uniform_plan(config: ModelConfig, method: str | None) -> dict[str, str | None]:
    """Every matrix (the embedding included) in ``method``; None keeps the model dense.

    int4 needs whole groups of 32 inputs: a matrix whose input size is not a multiple of 32
    falls back to int8.
    """
    return {
        name: "int8" if method == "int4" and k % _GROUP else method
        for name, (_n, k, _b) in matrix_shapes(config).items()
    }


def matrix_bytes(method: str | None, out_features: int, in_features: int, nbytes: int) -> int:
    """Resident bytes of one weight matrix (bias excluded) stored as ``method``.

    dense: ``N K nbytes``; int8: ``N K`` codes + ``N`` scales; int4: ``N' K / 2`` packed codes
    + ``N' K / 32`` (scale, zero) pairs, with ``N'`` rounded up to a multiple of 64. Scales take
    2 bytes whatever ``nbytes`` (they are kept in the 16-bit kernel dtype, see ``quant.py``).
    """
    n, k = out_features, in_features
    if method is None:
        return n * k * nbytes
    if method == "int8":
        return n * k + n * _SCALE_BYTES
    if method == "int4":
        n_pad = -(-n // _ROW_BLOCK) * _ROW_BLOCK
        return n_pad * k // 2 + n_pad * (k // _GROUP) * 2 * _SCALE_BYTES
    raise ValueError(f"unknown quantization method {method!r}")


def plan_weight_bytes(config: ModelConfig, nbytes: int, plan: QuantPlan | None) -> int:
    """Bytes of all weights (matrices, biases, norms) under ``plan`` (None: all dense)."""
    c = config
    total = 0
    for name, (n, k, bias) in matrix_shapes(c).items():
        total += matrix_bytes(None if plan is None else plan.get(name), n, k, nbytes)
        total += n * nbytes if bias else 0
    norms = 2 * c.num_hidden_layers + 1
    total += norms * c.hidden_size * nbytes
    if c.qk_norm:
        total += 2 * c.num_hidden_layers * c.head_dim * nbytes
    return total


def plan_summary(plan: QuantPlan | None) -> str:
    """``"120 int4, 1 int8"``: how many matrices each storage holds."""
    counts: dict[str, int] = {}
    for method in (plan or {}).values():
        counts[method or "dense"] = counts.get(method or "dense", 0) + 1
    return ", ".join(f"{n} {m}" for m, n in sorted(counts.items())) or "all dense"
