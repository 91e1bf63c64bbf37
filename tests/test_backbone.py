"""The mlx-lm backbone we build on: the API we rely on, RoPE layout, cached == full forward.

mlx-lm's LlamaModel is not a documented API, so these tests pin exactly what we use of it
(parameter names, the ``input_embeddings`` keyword, KVCache, traditional RoPE) and fail loudly
if a new mlx-lm release changes it.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_speech.backbone import BackboneConfig, backbone_key, make_backbone, make_backbone_cache

SMALL = BackboneConfig(dim=48, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2,
                       vocab_size=64)  # n_heads·head_dim = 64 ≠ dim, GQA 2, like the real model


def _model(seed=0):
    mx.random.seed(seed)
    m = make_backbone(SMALL)
    mx.eval(m.parameters())
    return m


def test_every_mistral_name_maps_onto_an_mlx_lm_parameter():
    params = {k: v.shape for k, v in tree_flatten(_model().parameters())}
    mistral = {
        "mm_audio_embeddings.tok_embeddings.weight": (64, 48),
        "norm.weight": (48,),
    }
    for i in range(SMALL.n_layers):
        mistral.update({
            f"layers.{i}.attention.wq.weight": (64, 48), f"layers.{i}.attention.wk.weight": (32, 48),
            f"layers.{i}.attention.wv.weight": (32, 48), f"layers.{i}.attention.wo.weight": (48, 64),
            f"layers.{i}.attention_norm.weight": (48,), f"layers.{i}.ffn_norm.weight": (48,),
            f"layers.{i}.feed_forward.w1.weight": (96, 48), f"layers.{i}.feed_forward.w2.weight": (48, 96),
            f"layers.{i}.feed_forward.w3.weight": (96, 48),
        })
    mapped = {backbone_key(k): s for k, s in mistral.items()}
    assert None not in mapped
    assert mapped == params


def test_input_embeddings_path_equals_token_path():
    m = _model()
    ids = mx.array([[1, 5, 9, 3, 7]])
    np.testing.assert_allclose(np.array(m(ids)), np.array(m(None, input_embeddings=m.embed_tokens(ids))),
                               atol=1e-6)


def test_incremental_decode_equals_full_forward():
    m = _model()
    x = mx.random.normal((1, 9, SMALL.dim), key=mx.random.key(1))
    full = m(None, input_embeddings=x)
    cache = make_backbone_cache(SMALL)
    parts = [m(None, cache=cache, input_embeddings=x[:, :5])]
    parts += [m(None, cache=cache, input_embeddings=x[:, i : i + 1]) for i in range(5, 9)]
    np.testing.assert_allclose(np.array(mx.concatenate(parts, axis=1)), np.array(full), atol=1e-5)


def _rope_interleaved(x: np.ndarray, pos: np.ndarray, base: float) -> np.ndarray:
    """Mistral RoPE by hand: rotate adjacent pairs (2i, 2i+1) by pos·base^(−2i/d)."""
    d = x.shape[-1]
    freqs = base ** (-np.arange(0, d, 2) / d)
    ang = pos[:, None] * freqs[None]
    out = x.copy()
    out[..., 0::2] = x[..., 0::2] * np.cos(ang) - x[..., 1::2] * np.sin(ang)
    out[..., 1::2] = x[..., 0::2] * np.sin(ang) + x[..., 1::2] * np.cos(ang)
    return out


def test_rope_rotates_adjacent_pairs_with_theta_1e6():
    """The checkpoint's wq/wk are Mistral-native (interleaved); mlx-lm must rotate pairs (T2)."""
    m = make_backbone(BackboneConfig(n_layers=1, vocab_size=64, dim=256, hidden_dim=64))  # real head_dim, θ
    rope = m.layers[0].self_attn.rope
    x = np.random.default_rng(0).standard_normal((1, 1, 6, 128)).astype(np.float32)
    ours = np.array(rope(mx.array(x), offset=3))[0, 0]
    ref = _rope_interleaved(x[0, 0].astype(np.float64), np.arange(3, 9), 1e6)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
