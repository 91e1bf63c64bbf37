"""Codec decoder: golden parity per block, weight folding, padding math, exact streaming."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import GOLDEN

from mlx_speech.codec import Codec, CodecConfig, derive_window_sizes, sanitize_codec
from mlx_speech.codec_layers import alibi_slopes, alibi_window_bias, pad_left

PREFIX = "audio_tokenizer."

# params.json["multimodal"]["audio_tokenizer_args"] of the real model (spec §2.1, voices omitted)
REAL_ARGS = {
    "channels": 1, "sampling_rate": 24000, "pretransform_patch_size": 240,
    "patch_proj_kernel_size": 7, "semantic_codebook_size": 8192, "semantic_dim": 256,
    "acoustic_codebook_size": 21, "acoustic_dim": 36, "conv_weight_norm": True, "causal": True,
    "attn_sliding_window_size": 16, "half_attn_window_upon_downsampling": True, "dim": 1024,
    "hidden_dim": 4096, "head_dim": 128, "n_heads": 8, "n_kv_heads": 8, "qk_norm_eps": 1e-06,
    "qk_norm": True, "use_biases": False, "norm_eps": 0.01, "layer_scale": True,
    "layer_scale_init": 0.01, "decoder_transformer_lengths_str": "2,2,2,2",
    "decoder_convs_kernels_str": "3,4,4,4", "decoder_convs_strides_str": "1,2,2,2",
}  # fmt: skip

# The real stage structure at small width, with GQA to exercise the kv-head path.
SMALL = CodecConfig(
    dim=64, hidden_dim=96, head_dim=8, n_heads=8, n_kv_heads=4,
    semantic_codebook_size=50, semantic_dim=16,
)  # fmt: skip
HOP = SMALL.samples_per_frame


def assert_close(actual, ref, name=""):
    actual, ref = np.asarray(actual), np.asarray(ref)
    assert actual.shape == ref.shape, (name, actual.shape, ref.shape)
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(actual - ref).max())
    assert err <= tol, f"{name}: max|a-b| = {err:.3g} > {tol:.3g}"


def raw_weights(model: Codec, seed: int = 0) -> dict[str, mx.array]:
    """Random weights for `model` in the raw checkpoint layout: weight-norm g/v in PyTorch conv
    layouts ([O, I, K]; [I, O, K] for transposed convs) and the EMA semantic codebook."""
    rng = np.random.default_rng(seed)
    raw = {}
    for name, p in tree_flatten(model.parameters()):
        if name.endswith(".conv.weight"):
            o, k, i = p.shape
            base = name[: -len(".weight")] + ".parametrizations.weight.original"
            transposed = not name.startswith(("decoder_blocks.0.", "output_proj."))
            v_shape = (i, o, k) if transposed else (o, i, k)
            raw[base + "1"] = rng.normal(size=v_shape)
            raw[base + "0"] = rng.uniform(0.5, 1.5, size=(v_shape[0], 1, 1))
        elif name == "quantizer.semantic_codebook.embedding":
            usage = rng.uniform(0.5, 4.0, size=p.shape[0])
            usage[0] = 0.0  # exercises the 1e-5 clamp
            embedding_sum = rng.normal(size=p.shape) * usage[:, None]
            raw["quantizer.semantic_codebook.embedding_sum"] = embedding_sum
            raw["quantizer.semantic_codebook.cluster_usage"] = usage
        elif name.endswith("norm.weight"):
            raw[name] = 1.0 + 0.1 * rng.normal(size=p.shape)
        elif name.endswith("_scale"):
            raw[name] = rng.uniform(0.5, 1.5, size=p.shape)  # large: distant context shows
        else:
            raw[name] = rng.normal(size=p.shape) / np.sqrt(p.shape[-1])
    return {k: mx.array(v.astype(np.float32)) for k, v in raw.items()}


def load_codec(config: CodecConfig, raw: dict[str, mx.array]) -> Codec:
    model = Codec(config)
    weights = {k: v.astype(mx.float32) for k, v in sanitize_codec(raw).items()}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def decode_chunked(model: Codec, codes: mx.array, sizes: list[int]) -> np.ndarray:
    assert sum(sizes) == codes.shape[1]
    cache, parts, start = model.make_cache(), [], 0
    for n in sizes:
        audio = model.decode(codes[:, start : start + n], cache=cache)
        assert audio.shape == (codes.shape[0], n * model.config.samples_per_frame)
        mx.eval(audio, cache.state)
        parts.append(np.array(audio))
        start += n
    assert cache.frames == codes.shape[1]
    windows = [kv for block in cache.blocks if isinstance(block, list) for kv in block]
    assert windows and all(kv.size <= kv.window for kv in windows)  # state stays O(window)
    return np.concatenate(parts, axis=1)


def random_codes(config: CodecConfig, batch: int, frames: int, seed: int) -> mx.array:
    rng = np.random.default_rng(seed)
    semantic = rng.integers(2, 2 + config.semantic_codebook_size, size=(batch, frames, 1))
    levels, n = config.acoustic_codebook_size, config.acoustic_dim
    acoustic = rng.integers(2, 2 + levels, size=(batch, frames, n))
    return mx.array(np.concatenate([semantic, acoustic], axis=-1))


@pytest.fixture(scope="module")
def small_codec():
    return load_codec(SMALL, raw_weights(Codec(SMALL), seed=1))


@pytest.fixture(scope="module")
def golden():
    args = json.loads((GOLDEN / "tiny-voxtral" / "params.json").read_text())
    config = CodecConfig.from_params(args["multimodal"]["audio_tokenizer_args"])
    checkpoint = mx.load(str(GOLDEN / "tiny-voxtral" / "consolidated.safetensors"))
    raw = {k[len(PREFIX) :]: v for k, v in checkpoint.items() if k.startswith(PREFIX)}
    return load_codec(config, raw), raw, mx.load(str(GOLDEN / "cases.safetensors"))


# ---- config ------------------------------------------------------------------------------------


def test_window_sizes_are_derived_through_the_encoder():
    real = CodecConfig.from_params(REAL_ARGS)
    assert real == CodecConfig()  # the defaults are the real model
    assert real.window_sizes == [2, 4, 8, 16]
    assert real.samples_per_frame == 1920
    tiny = json.loads((GOLDEN / "tiny-voxtral" / "params.json").read_text())
    tiny_config = CodecConfig.from_params(tiny["multimodal"]["audio_tokenizer_args"])
    assert tiny_config.window_sizes == [2, 4, 8, 16]
    no_halving = CodecConfig.from_params({**REAL_ARGS, "half_attn_window_upon_downsampling": False})
    assert no_halving.window_sizes == [16, 16, 16, 16]
    assert derive_window_sizes(16, [2, 2, 1, 1], [1, 2, 2, 2]) == [4, 8, 16, 32]


def test_config_dicts():
    config = CodecConfig.from_dict({"dim": 32, "not_a_field": 1, "window_sizes": [3, 3, 3, 3]})
    assert (config.dim, config.window_sizes, config.hidden_dim) == (32, [3, 3, 3, 3], 4096)
    with pytest.raises(ValueError, match="causal"):
        CodecConfig.from_params({**REAL_ARGS, "causal": False})


# ---- padding, masks, weight folding ------------------------------------------------------------


def test_pad_left():
    x = mx.array([0.0, 1.0, 2.0])[None, :, None]
    assert pad_left(x, 3, "reflect")[0, :, 0].tolist() == [0, 2, 1, 0, 1, 2]  # short-input rule
    assert pad_left(x, 2, "replicate")[0, :, 0].tolist() == [0, 0, 0, 1, 2]
    y = mx.arange(8, dtype=mx.float32)[None, :, None]
    assert pad_left(y, 6, "reflect")[0, :, 0].tolist() == [6, 5, 4, 3, 2, 1, *range(8)]


def test_alibi_window_bias():
    np.testing.assert_allclose(np.array(alibi_slopes(8)), [2.0**-h for h in range(8)])
    bias = np.array(alibi_window_bias(mx.array([1.0, 0.5]), n_queries=2, n_keys=5, window=2))
    inf = -np.inf  # queries are positions 3 and 4; each sees itself and 2 keys back
    np.testing.assert_array_equal(bias[0], [[inf, -2, -1, 0, inf], [inf, inf, -2, -1, 0]])
    np.testing.assert_array_equal(bias[1], [[inf, -1, -0.5, 0, inf], [inf, inf, -1, -0.5, 0]])


def _sanitized(raw: dict[str, np.ndarray]) -> dict[str, mx.array]:
    return sanitize_codec({n: mx.array(a.astype(np.float32)) for n, a in raw.items()})


def _numpy_weight_norm(g, v):
    return g * v / np.sqrt((v**2).sum(axis=(1, 2), keepdims=True))


def test_weight_norm_fold_conv1d_matches_numpy():
    rng = np.random.default_rng(0)
    c_out, c_in, k, length = 3, 5, 4, 9
    g, v = rng.uniform(0.5, 2, (c_out, 1, 1)), rng.normal(size=(c_out, c_in, k))
    raw = {"output_proj.conv.parametrizations.weight.original0": g,
           "output_proj.conv.parametrizations.weight.original1": v}  # fmt: skip
    w = _sanitized(raw)["output_proj.conv.weight"]
    assert w.shape == (c_out, k, c_in) and w.dtype == mx.float32
    x = rng.normal(size=(length, c_in))
    y = np.array(mx.conv1d(mx.array(x[None].astype(np.float32)), w))[0]
    wn = _numpy_weight_norm(g, v)  # PyTorch Conv1d: y[t, o] = Σ_i,j w[o, i, j] · x[t + j, i]
    ref = np.stack([np.einsum("oij,ji->o", wn, x[t : t + k]) for t in range(length - k + 1)])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_weight_norm_fold_conv_transpose_matches_numpy():
    rng = np.random.default_rng(1)
    c_in, c_out, k, stride, length = 5, 3, 4, 2, 6
    # g is per *input* channel: axis 0 of the PyTorch ConvTranspose1d weight
    g, v = rng.uniform(0.5, 2, (c_in, 1, 1)), rng.normal(size=(c_in, c_out, k))
    raw = {"decoder_blocks.2.conv.parametrizations.weight.original0": g,
           "decoder_blocks.2.conv.parametrizations.weight.original1": v}  # fmt: skip
    w = _sanitized(raw)["decoder_blocks.2.conv.weight"]
    assert w.shape == (c_out, k, c_in)
    x = rng.normal(size=(length, c_in))
    y = np.array(mx.conv_transpose1d(mx.array(x[None].astype(np.float32)), w, stride=stride))[0]
    wn = _numpy_weight_norm(g, v)  # PyTorch: y[t·s + j, o] += Σ_i x[t, i] · w[i, o, j]
    ref = np.zeros(((length - 1) * stride + k, c_out))
    for t in range(length):
        ref[t * stride : t * stride + k] += np.einsum("i,ioj->jo", x[t], wn)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


# ---- golden parity -----------------------------------------------------------------------------


def test_sanitize_golden_names_and_idempotence(golden):
    model, raw, _ = golden
    clean = sanitize_codec(raw)
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    assert {k: tuple(v.shape) for k, v in clean.items()} == shapes
    assert clean["quantizer.semantic_codebook.embedding"].dtype == mx.float32
    assert not any(part.startswith("_") for k in shapes for part in k.split("."))  # constants
    again = sanitize_codec(clean)
    assert again.keys() == clean.keys()
    for k in clean:
        assert again[k].dtype == clean[k].dtype
        assert mx.array_equal(again[k], clean[k]).item()
    # The raw-layout generator used by the random tests produces the checkpoint's names and shapes.
    assert {k: tuple(v.shape) for k, v in raw_weights(model).items()} == {
        k: tuple(v.shape) for k, v in raw.items()
    }


def test_golden_f1_every_block(golden):
    model, _, cases = golden
    outputs = model.decode_blocks(cases["f1_codec/codes"][None])
    names = ["quantizer_out", *(f"decoder_block_{i}" for i in range(8)), "output_proj"]
    assert len(outputs) == len(names)
    for name, out in zip(names, outputs):
        assert_close(out[0], cases[f"f1_codec/{name}"], name)
    audio = model.decode(cases["f1_codec/codes"][None])
    assert audio.dtype == mx.float32
    assert_close(audio[0], cases["f1_codec/waveform"], "waveform")


def test_golden_f2_cut_at_end_audio(golden):
    model, _, cases = golden
    codes = np.array(cases["f2_codec_eoa_cut/codes"])
    end = int(np.argmax(codes[:, 0] == 1))  # callers cut at the first END_AUDIO frame
    assert end == 4
    audio = model.decode(mx.array(codes[None, :end]))
    assert_close(audio[0], cases["f2_codec_eoa_cut/waveform"], "waveform")


@pytest.mark.parametrize("sizes", [[1] * 6, [2, 3, 1], [1, 5], [0, 4, 0, 2], [6]])
def test_golden_streaming_equals_one_shot(golden, sizes):
    model, _, cases = golden
    codes = cases["f1_codec/codes"][None]
    streamed = decode_chunked(model, codes, sizes)
    np.testing.assert_allclose(streamed, np.array(model.decode(codes)), atol=1e-5, rtol=0)
    assert_close(streamed[0], cases["f1_codec/waveform"], "waveform")


# ---- random codec with the real stage structure -----------------------------------------------


@pytest.mark.parametrize("sizes", [[1] * 30, [2, 3, 1, 7, 4, 13], [17, 13], [30]])
def test_streaming_equals_one_shot_random(small_codec, sizes):
    codes = random_codes(SMALL, batch=2, frames=30, seed=2)
    one_shot = np.array(small_codec.decode(codes))
    streamed = decode_chunked(small_codec, codes, sizes)
    np.testing.assert_allclose(streamed, one_shot, atol=1e-5, rtol=0)


def test_internal_chunking_is_exact(small_codec):
    codes = random_codes(SMALL, batch=1, frames=20, seed=3)
    default = small_codec.chunk_frames
    try:
        small_codec.chunk_frames = 7
        chunked = np.array(small_codec.decode(codes))
        small_codec.chunk_frames = 10**9
        single = np.array(small_codec.decode(codes))
    finally:
        small_codec.chunk_frames = default
    np.testing.assert_allclose(chunked, single, atol=1e-5, rtol=0)


def test_batch_rows_are_independent(small_codec):
    codes = random_codes(SMALL, batch=2, frames=5, seed=4)
    both = np.array(small_codec.decode(codes))
    assert both.shape == (2, 5 * HOP)
    for b in range(2):
        alone = np.array(small_codec.decode(codes[b : b + 1]))[0]
        np.testing.assert_allclose(both[b], alone, atol=1e-5, rtol=0)
    assert small_codec.decode(codes[:, :0]).shape == (2, 0)
    with pytest.raises(ValueError, match="shape"):
        small_codec.decode(codes[..., :5])


def test_receptive_field_is_21_frames(small_codec):
    """A window with ≥21 frames of left context reproduces the full decode; 16 does not (§8.1)."""
    total, new = 40, 4
    codes = random_codes(SMALL, batch=1, frames=total, seed=5)
    full = np.array(small_codec.decode(codes))[0]

    def window_error(context: int, first: int) -> float:
        window = codes[:, first - context : first + new]
        audio = np.array(small_codec.decode(window))[0, context * HOP :]
        return float(np.abs(audio - full[first * HOP : (first + new) * HOP]).max())

    tol = 1e-5 * max(1.0, float(np.abs(full).max()))  # 10x below the golden tolerance
    for first in (21, 30, 36):
        assert window_error(21, first) <= tol
    assert max(window_error(16, first) for first in (21, 30, 36)) > 10 * tol


def test_bf16_weights_run(small_codec):
    model = Codec(SMALL)
    model.load_weights(tree_flatten(small_codec.parameters()))
    model.set_dtype(mx.bfloat16)
    codes = random_codes(SMALL, batch=1, frames=3, seed=6)
    audio = model.decode(codes)
    assert audio.dtype == mx.float32
    ref = np.array(small_codec.decode(codes))
    assert np.isfinite(np.array(audio)).all()
    assert np.abs(np.array(audio) - ref).max() < 0.1 * max(1.0, np.abs(ref).max())
