"""Random weights in the original release naming, and our model built from them.

Speed does not depend on weight values, so the benchmark never downloads the release: it draws
every tensor of ``expected_tensors(config)`` (the names and shapes of the release's
``consolidated.safetensors``) from a seeded normal pool, scaled so activations stay finite. The same
seed gives the same tensors, so two implementations loaded from two calls run identical weights.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_speech.checkpoint import expected_tensors
from mlx_speech.model import Model, ModelConfig

SEMANTIC_HEAD = "acoustic_transformer.semantic_codebook_output.weight"
END_AUDIO_ROW = 1  # semantic code that stops generation


POOL_SIZE = (1 << 24) + 7  # odd length, so tiled rows of a large table do not line up


def _normal(pool: mx.array, shape: tuple[int, ...], offset: int, dtype: mx.Dtype) -> mx.array:
    """N(0, 1) values of ``shape``: the pool read cyclically from ``offset``.

    Drawing 4 B fresh normals with MLX's CPU generator takes minutes; cycling a 16 M pool takes
    seconds, and matmul speed does not depend on the values.
    """
    n = math.prod(shape)
    start = offset % pool.size
    flat = mx.concatenate([pool[start:], pool[:start]])
    reps = -(-n // pool.size)
    if reps > 1:
        flat = mx.broadcast_to(flat, (reps, pool.size)).reshape(-1)
    return flat[:n].reshape(shape).astype(dtype)


def random_tensor(name: str, shape: tuple[int, ...], dtype: mx.Dtype, pool: mx.array, offset: int) -> mx.array:
    """One tensor: norms and gains 1, LayerScale 0.01, matrices N(0, 1/fan_in)."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith(("norm.weight", ".original0", "cluster_usage")):
        return mx.ones(shape, dtype=dtype)
    if leaf in ("attention_scale", "ffn_scale"):
        return mx.full(shape, 0.01, dtype=dtype)
    if name.endswith("embedding_sum"):
        return _normal(pool, shape, offset, dtype)
    # Linear [out, in], conv [out, in, k] / [in, out, k], embedding [rows, dim]: the last axes
    # are what a row is dotted with, so scale by their size.
    fan_in = math.prod(shape[1:])
    return _normal(pool, shape, offset, dtype) * (1.0 / math.sqrt(fan_in))


def random_release_weights(config: ModelConfig, dtype: mx.Dtype, seed: int = 0) -> dict[str, mx.array]:
    """Every release tensor (original names and shapes), evaluated, in ``dtype``.

    The semantic head's END_AUDIO row is zero, so its logit (0) never wins the argmax against
    8192 random logits and generation never stops early on random weights.
    """
    rng = np.random.default_rng(seed)
    pool = mx.array(rng.standard_normal(POOL_SIZE, dtype=np.float32))
    weights = {}
    for name, shape in sorted(expected_tensors(config).items()):
        w = random_tensor(name, shape, dtype, pool, int(rng.integers(POOL_SIZE)))
        if name == SEMANTIC_HEAD:
            w[END_AUDIO_ROW] = 0
        weights[name] = w
        mx.eval(w)  # bound the graph and the transient float32 copies
    return weights


def random_voice(config: ModelConfig, rows: int, seed: int = 0) -> mx.array:
    """(rows, dim) voice embedding, float32 like the release's voice files."""
    dim = config.backbone.dim
    return mx.random.normal((rows, dim), key=mx.random.key(seed + 1)) * (1.0 / math.sqrt(dim))


def random_text_ids(config: ModelConfig, n: int, seed: int = 0) -> list[int]:
    """``n`` fixed text token ids, clear of the special tokens."""
    vocab = config.backbone.vocab_size
    low = 1000 if vocab > 2000 else 40
    return [int(i) for i in np.random.default_rng(seed).integers(low, vocab, size=n)]


def prompt_ids(config: ModelConfig, voice_rows: int, text_ids: list[int]) -> list[int]:
    """The speech prompt (spec §4.1): BOS, BEGIN_AUDIO, voice slots, NEXT_AUDIO_TEXT, text,
    REPEAT_AUDIO_TEXT, BEGIN_AUDIO."""
    begin, audio = config.begin_audio_token_id, config.audio_token_id
    return [config.bos_token_id, begin] + [audio] * voice_rows + [36] + list(text_ids) + [35, begin]


def quantization_recipe(bits: int | None, group_size: int, acoustic: bool) -> dict | None:
    if bits is None:
        return None
    return {"bits": bits, "group_size": group_size, "acoustic": acoustic}


def build_ours(
    config: ModelConfig, dtype: mx.Dtype, quantization: dict | None, seed: int = 0
) -> Model:
    """Our model with random weights, loaded the way ``load`` and ``convert`` do it."""
    model = Model(config)
    raw = random_release_weights(config, dtype, seed)
    weights = model.cast(model.sanitize(raw), dtype)
    del raw
    model.load_weights(list(weights.items()), strict=True)
    del weights
    if quantization:
        model.config.quantization = dict(quantization)
        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            class_predicate=model.quant_predicate,
        )
    mx.eval(model.parameters())
    model.eval()
    return model


def parameter_bytes(module: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))
