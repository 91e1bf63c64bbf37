"""The autoregressive backbone: a Ministral decoder, run by mlx-lm's Llama model.

Voxtral's backbone is a plain Mistral/Llama pre-norm decoder, so we reuse mlx-lm's
``LlamaModel`` rather than writing another one. Two details matter (spec §3.6, §11 T2/T32):
``rope_traditional=True`` because the checkpoint's wq/wk rows are in Mistral's interleaved
RoPE order (we never permute them), and an explicit ``head_dim`` because
n_heads·head_dim (4096) ≠ dim (3072).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlx_lm.models.cache import KVCache
from mlx_lm.models.llama import LlamaModel, ModelArgs

from .config import FromDict


@dataclass
class BackboneConfig(FromDict):
    dim: int = 3072
    n_layers: int = 26
    head_dim: int = 128
    hidden_dim: int = 9216
    n_heads: int = 32
    n_kv_heads: int = 8
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-5
    vocab_size: int = 131072


def make_backbone(config: BackboneConfig) -> LlamaModel:
    """The decoder without an LM head: returns final-RMSNorm hidden states (B, L, dim)."""
    args = ModelArgs(
        model_type="llama",
        hidden_size=config.dim,
        num_hidden_layers=config.n_layers,
        intermediate_size=config.hidden_dim,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps,
        vocab_size=config.vocab_size,
        rope_theta=config.rope_theta,
        rope_traditional=True,  # Mistral-native interleaved q/k rows, left unpermuted
        tie_word_embeddings=True,
    )
    return LlamaModel(args)


def make_backbone_cache(config: BackboneConfig) -> list[KVCache]:
    return [KVCache() for _ in range(config.n_layers)]


# Mistral checkpoint names → mlx-lm module names, per layer.
_LAYER_RENAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")


def backbone_key(name: str) -> str | None:
    """Map a checkpoint backbone tensor name to its name under the model's ``backbone``.

    Returns None for names that are not backbone tensors.
    """
    if name == "mm_audio_embeddings.tok_embeddings.weight":
        return "embed_tokens.weight"
    if name == "norm.weight":
        return "norm.weight"
    m = _LAYER_KEY.match(name)
    if m and m.group(2) in _LAYER_RENAMES:
        return f"layers.{m.group(1)}.{_LAYER_RENAMES[m.group(2)]}.weight"
    return None
