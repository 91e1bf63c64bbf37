"""Batched generation on the golden tiny model (float32): every row of a batch equals its solo run.

Rows differ in text (prompt length), voice (two presets and a custom ``Voice``), seed, and where
they stop (their own END frame at different frames, or their frame cap); rows join a running
batch and leave it. Each is compared with ``generate`` of that row alone (codes exactly, audio
within the golden tolerance), and the explicit-noise golden cases with the official outputs.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_close

from mlx_speech import batch_generate, generate, stream_batch_generate
from mlx_speech.codec import Codec
from mlx_speech.frame_decoder import FrameDecoder
from mlx_speech.generation import generate_step
from mlx_speech.prompt_cache import ChunkedPrefill, prefill
from mlx_speech.voice_file import Voice

GOLDEN_TEXT = "Hello world, this is a test."
GOLDEN_VOICE = "casual_male"


@pytest.fixture(scope="module")
def custom_voice():
    return Voice(np.array(mx.random.normal((7, 64), key=mx.random.key(5))) * 0.05, name="seven_rows")


@pytest.fixture(scope="module")
def rows(custom_voice):
    """Five utterances: prompts of 3 lengths and 3 voices; seeds chosen so that alone they stop
    at frames 8, 10, 6 and 1, and one more that runs into its max_frames of 7."""
    return dict(
        texts=[GOLDEN_TEXT, "Short.", "Two words", "A somewhat longer sentence that goes on for a while.", "Yes"],
        voices=["casual_male", "casual_male", custom_voice, "neutral_female", "neutral_female"],
        seeds=[0, 6, 4, 1, 3],
        max_frames=[None, None, 7, None, None],
    )


@pytest.fixture
def codec_batches(monkeypatch):
    """The batch size of every codec decode call."""
    sizes, original = [], Codec.decode

    def spy(self, codes, cache=None):
        sizes.append(codes.shape[0])
        return original(self, codes, cache)

    monkeypatch.setattr(Codec, "decode", spy)
    return sizes


def solo(model, rows):
    return [generate(model, t, v, seed=s, max_frames=f)
            for t, v, s, f in zip(rows["texts"], rows["voices"], rows["seeds"], rows["max_frames"])]


def assert_same(got, ref):
    assert (got.frames, got.finish_reason, got.frame_cap) == (ref.frames, ref.finish_reason, ref.frame_cap)
    np.testing.assert_array_equal(got.codes, ref.codes)
    assert_close(got.audio, ref.audio)


def test_every_row_of_a_batch_equals_its_solo_run(model, rows, codec_batches):
    ref = solo(model, rows)
    # What the batch has to cope with: rows ending at different frames, one at its cap.
    assert sorted(r.frames for r in ref) == [1, 6, 7, 8, 10]
    assert [r.finish_reason for r in ref] == ["stop", "stop", "length", "stop", "stop"]
    codec_batches.clear()
    got = batch_generate(model, rows["texts"], rows["voices"], seeds=rows["seeds"], max_frames=rows["max_frames"])
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert_same(g, r)
    assert max(codec_batches) > 1  # rows in step were decoded by one codec call


def test_golden_noise_cases_in_a_batch_keep_the_reference_outputs(model, cases):
    g1, g2 = cases["g1_e2e"], cases["g2_e2e_eoa"]
    texts = ["Short.", GOLDEN_TEXT, "Another row, longer than the others are.", GOLDEN_TEXT]
    got = batch_generate(model, texts, ["neutral_female", GOLDEN_VOICE, "casual_male", GOLDEN_VOICE],
                         seeds=[2, None, 5, None], noise=[None, g1["noise"], None, g2["noise"]],
                         max_frames=[4, g1["codes"].shape[0], 9, None])
    assert got[1].finish_reason == "length"
    np.testing.assert_array_equal(got[1].codes, np.array(g1["codes"]))
    assert_close(got[1].audio, g1["waveform"])
    ref_codes = np.array(g2["codes"])
    assert got[3].finish_reason == "stop" and ref_codes[-1, 0] == 1  # stopped at the reference's END
    np.testing.assert_array_equal(got[3].codes, ref_codes[:-1])
    assert_close(got[3].audio, g2["waveform"])
    for i, seed, frames in ((0, 2, 4), (2, 5, 9)):
        assert_same(got[i], generate(model, texts[i], ["neutral_female", "casual_male"][i // 2], seed=seed,
                                     max_frames=frames))


def test_rows_join_as_others_finish_and_equal_their_solo_runs(model, rows):
    ref = solo(model, rows)
    kwargs = dict(seeds=rows["seeds"], max_frames=rows["max_frames"], first_chunk_frames=1, chunk_frames=2)
    order = []
    chunks = {i: [] for i in range(5)}
    for i, r in stream_batch_generate(model, rows["texts"], rows["voices"], batch_size=2, **kwargs):
        order.append(i)
        chunks[i].append(r)
    # Row 2 joined while row 1 was still speaking (row 0 ends first), and so on down the list.
    assert order.index(2) < len(order) - 1 - order[::-1].index(1)
    for i, r in enumerate(ref):
        np.testing.assert_array_equal(np.concatenate([c.codes for c in chunks[i]]), r.codes)
        assert_close(np.concatenate([c.audio for c in chunks[i]]), r.audio)
        assert chunks[i][-1].finish_reason == r.finish_reason


def test_rows_with_their_own_guidance_and_step_count_equal_their_solo_runs(model):
    """Requests differ in cfg_alpha (one solve, a per-row factor) and flow_steps (a solve per
    step count, one backbone step for all)."""
    texts = [GOLDEN_TEXT, "Short.", "Two words", "Yes please"]
    alphas, steps = [1.2, 2.0, 1.0, 1.2], [7, 7, 3, 3]
    got = batch_generate(model, texts, "neutral_female", seeds=[1, 2, 3, 4], max_frames=6, cfg_alpha=alphas,
                         flow_steps=steps)
    for text, seed, alpha, n, g in zip(texts, [1, 2, 3, 4], alphas, steps, got):
        assert_same(g, generate(model, text, "neutral_female", seed=seed, max_frames=6, cfg_alpha=alpha,
                                flow_steps=n))


def prefilled(model, text, voice):
    ids = model.tokenizer.encode_speech(text, voice)
    cache = model.make_cache()
    return cache, prefill(model, model.prompt_embeddings(mx.array(ids), model.voice(voice)), cache)


def test_decoder_rows_join_mid_batch_and_leave_without_changing_the_others(model):
    """The server's pattern: a row joins at a frame boundary, another is removed (a client gone)."""
    texts = {"a": (GOLDEN_TEXT, "casual_male", 11), "b": ("Short.", "neutral_female", 12),
             "c": ("A third utterance joins later.", "neutral_female", 13)}
    frames = 9

    def alone(text, voice, seed):
        ids = model.tokenizer.encode_speech(text, voice)
        emb = model.prompt_embeddings(mx.array(ids), model.voice(voice))
        return np.array(mx.stack(list(generate_step(model, emb, max_frames=frames, seed=seed))))

    expected = {k: alone(*v) for k, v in texts.items()}
    decoder = FrameDecoder(model)
    for key in "ab":
        decoder.add(key, *prefilled(model, *texts[key][:2]), frame_cap=frames, seed=texts[key][2])
    got = {k: [] for k in texts}
    step = 0
    while len(decoder):
        if step == 3:
            decoder.add("c", *prefilled(model, *texts["c"][:2]), frame_cap=frames, seed=texts["c"][2])
        if step == 5:
            assert decoder.remove("b") and not decoder.remove("b")
        for frame in decoder.step():
            if frame.codes is not None:
                got[frame.key].append(np.array(frame.codes))
        step += 1
    for key in texts:
        n = len(got[key])
        assert n == {"a": len(expected["a"]), "b": 5, "c": len(expected["c"])}[key] and n > 0
        np.testing.assert_array_equal(np.stack(got[key]), expected[key][:n])


def test_a_short_row_joining_a_long_running_one_equals_its_solo_run(model, monkeypatch):
    """The joining row is left-padded to the running row's 40 frames of history; when the long
    row leaves, the padding is trimmed; the short row's codes stay its own throughout."""
    import mlx_speech.frame_decoder as frame_decoder

    monkeypatch.setattr(frame_decoder, "END_AUDIO", -1)  # neither row may end early

    def alone(text, voice, seed, frames):
        ids = model.tokenizer.encode_speech(text, voice)
        emb = model.prompt_embeddings(mx.array(ids), model.voice(voice))
        return np.array(mx.stack(list(generate_step(model, emb, max_frames=frames, seed=seed))))

    long_text, short_text = "A long running utterance goes first.", "Hi."
    decoder = FrameDecoder(model)
    decoder.add("long", *prefilled(model, long_text, "neutral_female"), frame_cap=45, seed=3)
    got = {"long": [], "short": []}
    step = 0
    while len(decoder):
        if step == 40:
            decoder.add("short", *prefilled(model, short_text, "casual_male"), frame_cap=12, seed=4)
        for frame in decoder.step():
            got[frame.key].append(np.array(frame.codes))
        step += 1
    np.testing.assert_array_equal(np.stack(got["long"]), alone(long_text, "neutral_female", 3, 45))
    np.testing.assert_array_equal(np.stack(got["short"]), alone(short_text, "casual_male", 4, 12))


def test_chunked_prefill_one_chunk_per_call_equals_prefill(model):
    ids = model.tokenizer.encode_speech(GOLDEN_TEXT, GOLDEN_VOICE)
    emb = model.prompt_embeddings(mx.array(ids), model.voice(GOLDEN_VOICE))
    run = ChunkedPrefill(model, emb, model.make_cache(), 5)
    calls = 1
    while not run.advance():
        calls += 1
    assert calls == -(-len(ids) // 5) and run.remaining == 0 and run.advance()
    whole = prefill(model, emb, model.make_cache())
    np.testing.assert_allclose(np.array(run.hidden), np.array(whole), atol=1e-5)


def test_streamed_rows_chunk_on_their_own_schedule(model, rows):
    ref = solo(model, rows)
    chunks = {i: [] for i in range(5)}
    for i, r in stream_batch_generate(model, rows["texts"], rows["voices"], seeds=rows["seeds"],
                                      max_frames=rows["max_frames"], first_chunk_frames=2, chunk_frames=3):
        chunks[i].append(r)
    for i, r in enumerate(ref):
        sizes = [len(c.codes) for c in chunks[i]]
        assert sizes[0] == min(2, r.frames) and all(s <= 3 for s in sizes[1:]) and sum(sizes) == r.frames
        assert [c.frames for c in chunks[i]] == list(np.cumsum(sizes))
        assert [c.finish_reason for c in chunks[i]] == [None] * (len(sizes) - 1) + [r.finish_reason]
        np.testing.assert_array_equal(np.concatenate([c.codes for c in chunks[i]]), r.codes)


def test_cancel_stops_every_row(model, rows):
    cancel = threading.Event()
    stream = stream_batch_generate(model, rows["texts"], rows["voices"], seeds=rows["seeds"], cancel=cancel)
    first = next(stream)
    cancel.set()
    assert list(stream) == [] and first[1].finish_reason is None
    with pytest.raises(RuntimeError, match=r"cancelled before texts \[0, 1, 2, 3, 4\] were finished"):
        batch_generate(model, rows["texts"], rows["voices"], cancel=cancel)


def test_errors_name_the_row(model):
    with pytest.raises(ValueError, match="^voices has 3 values for 2 texts"):
        batch_generate(model, ["a", "b"], ["casual_male"] * 3)
    with pytest.raises(ValueError, match=r"^texts\[1\]: seed must be"):
        batch_generate(model, ["a", "b"], seeds=[1, -1])
    with pytest.raises(ValueError, match=r"^texts\[0\]: unknown voice 'nobody'"):
        batch_generate(model, ["a"], "nobody")
    with pytest.raises(ValueError, match=r"^texts\[1\]: text is empty"):
        batch_generate(model, ["a", " "])
    with pytest.raises(ValueError, match=r"^texts\[0\]: noise must have shape \(>= max_frames=5, 36\)"):
        batch_generate(model, ["a"], noise=[mx.zeros((3, 36))], max_frames=5)
    with pytest.raises(ValueError, match="^batch_size must be"):
        batch_generate(model, ["a"], batch_size=0)
    with pytest.raises(TypeError, match="texts must be a list of strings"):
        batch_generate(model, "a")
    assert batch_generate(model, []) == []
