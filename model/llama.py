"""The Llama-family decoder (Llama 2/3, Qwen2, Mistral) as one readable torch module.

Structure and parameter names follow transformers' LlamaForCausalLM (`model.layers.{i}.
self_attn.q_proj`, ...), so Hugging Face checkpoints map onto it one to one (see weights.py).
Qwen2's q/k/v bias, tied embeddings, rope scaling and sliding windows are config fields.

The KV cache is static and owned by the caller: forward takes the cache tensors and returns
the updated ones. Traced, that is one pure function (new cache tensors out); run eagerly, the
caller's buffers are updated in place and returned, so a step never copies the cache.

Shapes: B batch, S new tokens, T cache capacity, E hidden size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmexport import LLMExportError

from . import attention as _attention  # also registers torch.ops.llmexport.attention
from .config import ModelConfig
from .rope import rope_tables


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, scaled in the model dtype (as transformers)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Projections around the fused attention op (RoPE + cache write + masked GQA)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        e, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(e, config.num_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(e, config.num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(e, config.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_heads * d, e, bias=config.o_bias)
        self.scale = d**-0.5
        self.window = config.layer_window(layer)

    def forward(self, x, position_ids, seq_lens, k_cache, v_cache, cos, sin):
        # x (B, S, E) -> out (B, S, E); caches (B, Hkv, T, D) in, updated caches out
        args = (self.q_proj(x), self.k_proj(x), self.v_proj(x), k_cache, v_cache,
                position_ids, seq_lens, cos, sin, self.scale, self.window)
        if torch.compiler.is_compiling():  # tracing: one pure op, new caches as outputs
            out, k_cache, v_cache = torch.ops.llmexport.attention(*args)
        else:  # eager: write the caller's buffers in place and hand the same tensors back
            out = torch.ops.llmexport.attention_in_place(*args)
        return self.o_proj(out), k_cache, v_cache


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, position_ids, seq_lens, k_cache, v_cache, cos, sin):
        h, k_cache, v_cache = self.self_attn(
            self.input_layernorm(x), position_ids, seq_lens, k_cache, v_cache, cos, sin
        )
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k_cache, v_cache


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaModel(nn.Module):
    """Causal LM over a static KV cache of capacity `max_seq_len`.

    Create with `LlamaModel(config, max_seq_len)`; weights come from weights.load_model.
    """

    def __init__(self, config: ModelConfig, max_seq_len: int | None = None):
        super().__init__()
        max_seq_len = max_seq_len or config.max_position_embeddings
        if not 0 < max_seq_len <= config.max_position_embeddings:
            raise LLMExportError(
                f"max_seq_len={max_seq_len} is outside 1..{config.max_position_embeddings} "
                f"(the model's max_position_embeddings); pass a smaller --max-seq-len"
            )
        self.config = config
        self.max_seq_len = max_seq_len
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        half = config.head_dim // 2
        self.register_buffer("rope_cos", torch.empty(max_seq_len, half), persistent=False)
        self.register_buffer("rope_sin", torch.empty(max_seq_len, half), persistent=False)
        if self.rope_cos.device.type != "meta":
            self.reset_rope()

    def reset_rope(self) -> None:
        """Fill the rope tables (float32 math, then the buffers' dtype), e.g. after to_empty()."""
        cos, sin = rope_tables(self.config, self.max_seq_len)
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        seq_lens: Tensor,
        k_caches: list[Tensor],
        v_caches: list[Tensor],
        logits_index: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """input_ids, position_ids (B, S) int64; seq_lens (B,) int64 valid tokens after this step.

        Returns float32 logits and the updated caches. Logits are (B, S, V) for every position;
        with `logits_index` (B,) of positions in this step, (B, V) at those; with (B, K), (B, K, V)
        at those K positions of each row (the LM head runs on the picked positions only).
        """
        layers = self.config.num_layers
        if len(k_caches) != layers or len(v_caches) != layers:
            raise LLMExportError(f"got {len(k_caches)} key and {len(v_caches)} value cache buffers for a model of "
                                 f"{layers} layers; pass one of each per layer")
        if not _attention.static_mode():  # the check reads values on the host
            self._check_positions(position_ids, seq_lens)
        x = self.model.embed_tokens(input_ids)  # (B, S, E)
        new_k, new_v = [], []
        for layer, k_cache, v_cache in zip(self.model.layers, k_caches, v_caches, strict=True):
            x, k_cache, v_cache = layer(x, position_ids, seq_lens, k_cache, v_cache, self.rope_cos, self.rope_sin)
            new_k.append(k_cache)
            new_v.append(v_cache)
        x = self.model.norm(x)
        rows = torch.arange(x.shape[0], device=x.device)
        if logits_index is not None and logits_index.dim() == 2:
            # (B*K, E) into the head: a 2-D product, traced as Gemm on the stored (V, E) table
            # like the (B, E) case (a 3-D one would transpose a tied table the gather also reads)
            picked = x[rows[:, None], logits_index].flatten(0, 1)  # (B*K, E)
            return self.lm_head(picked).float().unflatten(0, logits_index.shape), new_k, new_v  # (B, K, V)
        if logits_index is not None:
            x = x[rows, logits_index]  # (B, E)
        return self.lm_head(x).float(), new_k, new_v

    def _check_positions(self, position_ids: Tensor, seq_lens: Tensor) -> None:
        if position_ids.numel() and (int(position_ids.max()) >= self.max_seq_len or int(position_ids.min()) < 0):
            raise LLMExportError(
                f"position {int(position_ids.max())} is outside the KV cache of max_seq_len={self.max_seq_len}; "
                f"shorten the prompt or generation, or build with a larger max_seq_len"
            )
        if seq_lens.numel() and int(seq_lens.max()) > self.max_seq_len:
            raise LLMExportError(f"seq_len {int(seq_lens.max())} exceeds max_seq_len={self.max_seq_len}")
