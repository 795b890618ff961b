"""Activation memory: an estimate of one forward pass's peak transient memory."""

from __future__ import annotations

import math

from carpool.model_config import ModelConfig


def activation_bytes(
    config: ModelConfig,
    batch_size: int,
    seq_len: int,
    nbytes: int,
    max_num_batched_tokens: int | None = None,
) -> int:
    """Estimated peak transient memory of one forward pass (the prefill of the batch).

    The pass computes ``T = min(B x L, max_num_batched_tokens)`` tokens, ``Q = min(L, T)`` of
    them per sequence for ``b = ceil(T / Q)`` sequences, each attending to up to ``L`` keys.
    Layers run one after another and free their intermediates, so the peak is one layer's:

        nbytes x ( 2 T h                                  hidden states + residual stream
                   + max( T (q + 2 kv)                    fused q/k/v projection
                          + 2 b L kv                      K and V gathered from the cache
                          + b H Q L,                      scores of the padded [b, H, Q, L]
                                                          attention (not flash: materialised)
                          3 T i ) )                       MLP: gate/up (2i) and their product
        + Q L (1 + nbytes)                                the bool attention mask and its
                                                          additive copy (one [Q, L] for every
                                                          sequence: a mask of positions alone)
        + B V (nbytes + 8)                                logits of the sampled rows, their
                                                          float32 copy and probabilities

    where ``h`` = hidden size, ``q`` = heads x head_dim, ``kv`` = kv_heads x head_dim, ``H`` =
    heads, ``i`` = intermediate size and ``V`` = vocabulary. This is an estimate: kernels'
    workspaces, the allocator's rounding and fragmentation come on top.

    Args:
        config: the model.
        batch_size: sequences B.
        seq_len: tokens per sequence L (prompt + output).
        nbytes: bytes per activation element.
        max_num_batched_tokens: the engine's token budget per pass (chunked prefill); None for
            the whole ``B x L`` batch in one pass (static batching's worst case).
    """
    c = config
    tokens = batch_size * seq_len
    if max_num_batched_tokens is not None:
        tokens = min(tokens, max_num_batched_tokens)
    q_len = min(seq_len, tokens)
    seqs = math.ceil(tokens / q_len)
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    attention = tokens * (q + 2 * kv) + 2 * seqs * seq_len * kv
    attention += seqs * c.num_attention_heads * q_len * seq_len
    mlp = 3 * tokens * c.intermediate_size
    per_pass = nbytes * (2 * tokens * c.hidden_size + max(attention, mlp))
    mask = q_len * seq_len * (1 + nbytes)
    logits = batch_size * c.vocab_size * (nbytes + 8)
    return per_pass + mask + logits
