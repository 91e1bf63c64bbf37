"""The generation API on the golden tiny model: options change behaviour, streaming == one-shot."""

from __future__ import annotations


import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY

from mlx_speech import generate, load, stream_generate

TEXT = "Hello world, this is a test."
VOICE = "casual_male"


def test_same_seed_same_speech_other_seed_other_speech(model):
    a = generate(model, TEXT, VOICE, seed=7, max_frames=6)
    b = generate(model, TEXT, VOICE, seed=7, max_frames=6)
    c = generate(model, TEXT, VOICE, seed=8, max_frames=6)
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.audio, b.audio)
    assert not np.array_equal(a.codes[:, 1:], c.codes[:, 1:])


def test_noise_rows_are_used_in_order(model):
    noise = mx.random.normal((4, 36), key=mx.random.key(3))
    whole = generate(model, TEXT, VOICE, noise=noise, max_frames=4)
    # A frame's acoustic codes depend on its own noise row: changing row 2 changes frame 2 on.
    changed = mx.concatenate([noise[:2], -noise[2:3], noise[3:]])
    other = generate(model, TEXT, VOICE, noise=changed, max_frames=4)
    assert np.array_equal(whole.codes[:2], other.codes[:2])
    assert not np.array_equal(whole.codes[2, 1:], other.codes[2, 1:])


@pytest.mark.parametrize("option", [{"cfg_alpha": 1.0}, {"cfg_alpha": 2.5}, {"flow_steps": 3}])
def test_flow_options_change_the_output(model, option):
    base = generate(model, TEXT, VOICE, seed=11, max_frames=5)
    changed = generate(model, TEXT, VOICE, seed=11, max_frames=5, **option)
    assert not np.array_equal(base.codes[:, 1:], changed.codes[:, 1:])


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_batched_cfg_solve_equals_plain_passes(model, alpha):
    """The solve (CFG branches batched, the first layer's repeated rows shared across branches and
    steps) equals plain ``velocity`` passes for a batch of two: at α = 1 the conditional velocity
    alone (spec §13.10), otherwise α·v_cond + (1 − α)·v_uncond."""
    head = model.acoustic_transformer
    h = mx.random.normal((2, model.config.backbone.dim), key=mx.random.key(1))
    x0 = mx.random.normal((2, 36), key=mx.random.key(2))
    dts, time_tokens, _ = head._schedule(7)
    cond, x = head.llm_projection(h), x0
    for k, dt in enumerate(dts):
        tt = mx.broadcast_to(time_tokens[k], cond.shape)
        v = head.velocity(x, tt, cond)
        if alpha != 1.0:
            v = alpha * v + (1 - alpha) * head.velocity(x, tt, mx.zeros_like(cond))
        x = x + v * dt
    np.testing.assert_allclose(np.array(head.sample_acoustic(h, x0, 7, alpha)), np.array(x), atol=1e-5)


def test_one_utterance_runs_the_plain_decode_loop(model):
    """A batch of one is the loop as it was before batching: prefill, then per frame the flow
    solve on the last hidden state and one backbone step on the frame's codes, in a plain KV
    cache (written out here independently); same codes, same samples, bit for bit."""
    from mlx_speech.prompt_cache import prefill

    ids = model.tokenizer.encode_speech(TEXT, VOICE)
    emb = model.prompt_embeddings(mx.array(ids), model.voice(VOICE))
    cache = model.make_cache()
    h, key, frames = prefill(model, emb, cache), mx.random.key(21), []
    for _ in range(7):
        key, sub = mx.random.split(key)
        codes = model.acoustic_transformer(h, mx.random.normal((1, 36), key=sub), 7, 1.2)
        if codes[0, 0].item() == 1:
            break
        frames.append(codes[0])
        h = model(model.audio_code_embeddings(codes)[:, None], cache)[:, -1]
    expected = mx.stack(frames)
    result = generate(model, TEXT, VOICE, seed=21, max_frames=7, use_voice_cache=False, chunk_frames=7)
    np.testing.assert_array_equal(result.codes, np.array(expected))
    np.testing.assert_array_equal(result.audio, np.array(model.audio_tokenizer.decode(expected[None])[0]))


def test_max_frames_ends_with_length(model):
    result = generate(model, TEXT, VOICE, seed=5, max_frames=3)
    assert result.finish_reason == "length"
    assert result.codes.shape == (3, 37)
    assert result.audio.shape == (3 * 1920,)
    assert result.frames == 3 and result.audio_seconds == pytest.approx(0.24)


@pytest.mark.parametrize("first,chunk", [(1, 1), (2, 3), (1, 10)])
def test_streamed_chunks_equal_one_shot(model, first, chunk):
    whole = generate(model, TEXT, VOICE, seed=3, max_frames=9)
    chunks = list(stream_generate(model, TEXT, VOICE, seed=3, max_frames=9,
                                  first_chunk_frames=first, chunk_frames=chunk))
    sizes = [len(c.codes) for c in chunks]
    assert sizes[0] == min(first, 9) and sum(sizes) == 9
    assert all(s <= max(first, chunk) for s in sizes)
    assert [c.frames for c in chunks] == list(np.cumsum(sizes))
    np.testing.assert_array_equal(np.concatenate([c.codes for c in chunks]), whole.codes)
    np.testing.assert_allclose(np.concatenate([c.audio for c in chunks]), whole.audio, atol=1e-5)


def test_request_errors_name_the_value(model):
    with pytest.raises(ValueError, match="unknown voice 'nobody'.*casual_male, neutral_female"):
        generate(model, TEXT, "nobody")
    with pytest.raises(ValueError, match="empty"):
        generate(model, "   \n", VOICE)
    with pytest.raises(ValueError, match="text too long.*context of 65536"):
        generate(model, TEXT, VOICE, max_frames=65536)
    with pytest.raises(ValueError, match=r"noise must have shape \(>= max_frames=5, 36\); got \(3, 36\)"):
        generate(model, TEXT, VOICE, noise=mx.zeros((3, 36)), max_frames=5)


def test_load_reads_an_original_release_directly_and_writes_nothing(tmp_path, monkeypatch, tiny_mlx):
    """One copy on disk: the release itself is read; every parameter and voice equals our
    conversion of it (same dtype), and nothing is written anywhere."""
    from mlx.utils import tree_flatten

    monkeypatch.setenv("HOME", str(tmp_path))  # any cache under ~ would show up here
    direct = load(TINY, dtype="float32")
    assert list(tmp_path.iterdir()) == []
    assert direct.source == "original release tiny-voxtral (read directly, float32)"
    converted = load(tiny_mlx)
    a, b = dict(tree_flatten(direct.parameters())), dict(tree_flatten(converted.parameters()))
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), k
    assert direct.voices == converted.voices == ["casual_male", "neutral_female"]
    for v in direct.voices:
        assert mx.array_equal(direct.voice(v), converted.voice(v)).item()
    assert load(TINY).backbone.norm.weight.dtype == mx.bfloat16  # the default dtype


def test_load_rejects_a_folder_without_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no model: neither an MLX model"):
        load(tmp_path)


def test_voice_prefix_cache_gives_the_same_speech(model, cases):
    from mlx_speech.prompt_cache import VoicePrefixCache

    g = cases["g1_e2e"]
    model.voice_cache = VoicePrefixCache(max_voices=1)
    cold = generate(model, TEXT, VOICE, noise=g["noise"], max_frames=5, use_voice_cache=False)
    first = generate(model, TEXT, VOICE, noise=g["noise"], max_frames=5)  # computes the prefix
    again = generate(model, "Another sentence.", VOICE, seed=1, max_frames=2)  # reuses it
    warm = generate(model, TEXT, VOICE, noise=g["noise"], max_frames=5)
    assert (model.voice_cache.misses, model.voice_cache.hits) == (1, 2)
    assert again.frames == 2
    for r in (first, warm):
        np.testing.assert_array_equal(r.codes, np.array(g["codes"]))
        np.testing.assert_allclose(r.audio, cold.audio, atol=1e-4)


def test_voice_prefix_cache_is_bounded_and_cleared_with_the_voices(model):
    from mlx_speech.prompt_cache import VoicePrefixCache

    model.voice_cache = cache = VoicePrefixCache(max_voices=1)
    generate(model, TEXT, "casual_male", seed=0, max_frames=1)
    generate(model, TEXT, "neutral_female", seed=0, max_frames=1)
    assert len(cache) == 1 and cache.misses == 2  # the older voice was dropped
    generate(model, TEXT, "casual_male", seed=0, max_frames=1)
    assert cache.misses == 3 and cache.nbytes > 0
    model.set_voices({name: model.voice(name) for name in model.voices})
    assert len(cache) == 0
    model.voice_cache = VoicePrefixCache()


def test_bfloat16_model_computes_in_bfloat16(tmp_path, monkeypatch):
    """Activations follow the weights: float32 noise or latents must not promote every matmul of
    the flow transformer or the codec to float32 (the main speed gap to other ports)."""
    from mlx_speech.acoustic import Block
    from mlx_speech.codec_layers import TransformerStage
    from mlx_speech.convert import convert

    m = load(convert(hf_path=str(TINY), mlx_path=str(tmp_path / "bf16"), dtype="bfloat16", verbose=False))
    seen = {}
    for cls, name in ((Block, "flow"), (TransformerStage, "codec")):
        original = cls.__call__

        def spy(self, x, *args, _original=original, _name=name, **kwargs):
            seen.setdefault(_name, set()).add(x.dtype)
            return _original(self, x, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", spy)
    m.acoustic_transformer.sample_acoustic(mx.zeros((1, 64)), mx.ones((1, 36)), 2, 1.2)
    m.audio_tokenizer.decode(mx.full((1, 2, 37), 3, dtype=mx.int32))
    assert seen == {"flow": {mx.bfloat16}, "codec": {mx.bfloat16}}
    result = generate(m, TEXT, VOICE, seed=0, max_frames=2)
    assert result.audio.dtype == np.float32 and result.codes.shape == (2, 37)
