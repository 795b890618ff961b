"""The LLaMA-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) over a paged KV cache.

The families differ only in flags of ``ModelConfig``: q/k/v bias (Qwen2), per-head q/k RMSNorm
(Qwen3), tied embeddings, rope scaling. Parameter names follow the Hugging Face checkpoints
except for two fusions (``qkv_proj`` and ``gate_up_proj``); ``weight_mapping`` tells the loader
where each checkpoint tensor goes.
"""

from __future__ import annotations

import torch
from torch import nn

from carpool.config import ModelConfig
from carpool.model import decode_stack, kv_layout, row_paths
from carpool.model.attention import Attention, AttentionMetadata, GatherBuffer
from carpool.model.kv_quant import check_head_dim, row_width
from carpool.model.layers import GatedMLP, Linear, RMSNorm, RotaryEmbedding
from carpool.model.pages import zeroed_lazily
from carpool.model.quant import QuantizedLinear


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(
        self, config: ModelConfig, rotary: RotaryEmbedding, gather: GatherBuffer | None = None
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, rotary, gather)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer over the residual stream, with each residual add fused into the norm after
        it: ``x`` is the previous layer's MLP output still to be added into ``residual`` (for
        the first layer, ``x`` is the embedding and ``residual`` is None). Returns this layer's
        MLP output and the residual stream before it; their sum is the layer's output.

        The layers call their sub-modules' ``forward`` directly: ``nn.Module.__call__``'s hook
        machinery (never used here) costs ~2-3 us a call, and a decode step makes ~10 calls per
        layer (at batch 1 on the small model, ~0.2-0.3 ms of a ~6 ms step)."""
        if residual is None:
            residual, h = x, self.input_layernorm.forward(x)
        else:
            h, residual = self.input_layernorm.forward(x, residual)
        h = self.self_attn.forward(h, rope, meta, kv_cache)
        h, residual = self.post_attention_layernorm.forward(h, residual)
        return self.mlp.forward(h), residual


def _embedding(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(num, dim)``, without its random init on the meta device (the loader's
    empty model): that init imports ``torch._dynamo``, 1.8 s of a 4.5 s GGUF load, for nothing."""
    if torch.empty(0).is_meta:
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (the ``model.`` prefix of HF checkpoints)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = _embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        # Shared by all layers: they run one after another (see GatherBuffer).
        self.gather = GatherBuffer()
        self.layers = nn.ModuleList(
            DecoderLayer(config, self.rotary, self.gather) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """A LLaMA-family causal LM whose forward runs one ragged batch step.

    ``forward`` takes flat token ids and positions of every sequence in the step, the attention
    metadata, one KV-cache tensor per layer, and the flat indices of the rows whose next-token
    logits are wanted (the last token of each sequence that samples this step).
    """

    # checkpoint suffix -> (our parameter suffix, shard index within the fused tensor)
    weight_mapping: dict[str, tuple[str, int]] = {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0),
        "self_attn.k_proj": ("self_attn.qkv_proj", 1),
        "self_attn.v_proj": ("self_attn.qkv_proj", 2),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0),
        "mlp.up_proj": ("mlp.gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # The layers as one C++ operator's arguments, for decode steps (decode_stack.attach).
        self.decode_plan: decode_stack.StackPlan | None = None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # ``.to()`` etc. replace the tensors the plan refers to.
        self.decode_plan = None
        return super()._apply(fn, recurse)

    def tie_weights(self) -> None:
        """Share the embedding with the head when the checkpoint ties them.

        Called again after ``to_empty``, which materialises each module's parameters apart.
        """
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fused_shard_sizes(self, fused_name: str) -> list[int]:
        """Output rows of each checkpoint tensor inside a fused parameter, in shard order."""
        c = self.config
        if fused_name.endswith("qkv_proj"):
            kv = c.num_key_value_heads * c.head_dim
            return [c.num_attention_heads * c.head_dim, kv, kv]
        if fused_name.endswith("gate_up_proj"):
            return [c.intermediate_size, c.intermediate_size]
        raise KeyError(fused_name)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],  # per layer [num_blocks, block_size, 2, kv_heads, D]
        logits_indices: torch.Tensor,  # [R]
    ) -> torch.Tensor:  # [R, vocab]
        plan = self.decode_plan
        every_row = logits_indices.shape[0] == input_ids.shape[0]
        if plan is not None and plan.head is not None and every_row:
            # A decode step where every row samples: ids to logits in one C++ call, when the
            # step applies.
            rope_table = self.model.rotary.cast_table(plan.dtype)
            logits = decode_stack.run_logits(
                plan, input_ids, positions, rope_table, meta, kv_caches
            )
            if logits is not None:
                return logits
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        rope = self.model.rotary.table(positions, x.dtype)  # [T, 2, D]
        residual: torch.Tensor | None = None
        stacked = None
        if plan is not None:  # a decode step's layers in one C++ call, when it applies
            stacked = decode_stack.run(plan, x, rope, meta, kv_caches)
        if stacked is not None:
            x, residual = stacked
        else:
            # A prompt's rows take the quantized linears' widened weight (row_paths).
            with row_paths.use(meta.wide_rows):
                for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
                    x, residual = layer.forward(x, residual, rope, meta, kv_cache)
        if logits_indices.shape[0] == 0:
            # No row samples (a step of a long prompt's chunks before its last): no head. A
            # quantized head's float32 rescoring handed zero rows to its int8 or int4 kernel,
            # which refused them: every prompt longer than max_num_batched_tokens failed on
            # a model with a quantized head (the default SmolLM2 Q4_1 GGUF: its Q8_0 head).
            return x.new_empty((0, self.config.vocab_size), dtype=torch.float32)
        # Only rows that sample need the last residual add, the final norm and the (large)
        # vocabulary projection. As many sampling rows as rows means every row samples, each
        # the last of a one-token chunk (indices ascend), so the gather would copy x as it is:
        # skipped (a pure decode step's two ops, each a pass through cold code).
        if logits_indices.shape[0] != x.shape[0]:
            x = x[logits_indices]
            residual = None if residual is None else residual[logits_indices]
        if residual is None:  # no layers
            x = self.model.norm(x)
        else:
            x, _ = self.model.norm(x, residual)
        if isinstance(self.lm_head, QuantizedLinear):  # float32 top logits (see its docstring)
            return self.lm_head.logits(x)
        return self.lm_head(x).float()

    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str
    ) -> list[torch.Tensor]:
        """One ``[num_blocks, block_size, 2, kv_heads, head_dim]`` tensor per layer.

        K and V of a token sit side by side (the ``2``), so a block is one contiguous run of
        both: the step writes a token's K and V in one copy and gathers a block's in one row.
        ``dtype=torch.int8`` is the quantized cache of ``carpool.model.kv_quant``: each row
        is ``head_dim + 4`` bytes (the int8 values and their float32 scale), and a block's
        bytes follow that module's block layout (a region per kv head, K word-major). A
        ``torch.bfloat16`` cache's blocks follow ``carpool.model.kv_layout``'s (a region per kv
        head, K pair-major).
        """
        c = self.config
        if dtype == torch.int8:
            check_head_dim(c.head_dim)
        if dtype == torch.bfloat16:
            kv_layout.check_head_dim(c.head_dim)
        row = row_width(c.head_dim, dtype)
        shape = (num_blocks, block_size, 2, c.num_key_value_heads, row)
        return [zeroed_lazily(shape, dtype, device) for _ in range(c.num_hidden_layers)]
