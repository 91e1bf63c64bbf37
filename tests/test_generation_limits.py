"""Generation under hostile or careless input: nothing non-finite reaches an index, options are
checked by the library, prefill is chunked, a cancel flag is honoured, runaway frames are capped."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest

from mlx_speech import generate, stream_generate
from mlx_speech.longform import stream_generate_long
from mlx_speech.model import Model
from mlx_speech.prompt_cache import VoicePrefixCache, prefill, voice_prefix_length

TEXT = "Hello world, this is a test."
VOICE = "casual_male"


@pytest.fixture
def poisoned(model):
    """Replace one weight of the model by NaN for a test, and put it back afterwards."""
    saved = {}

    def poison(path: str):
        owner, name = path.rsplit(".", 1)
        module = model
        for part in owner.split("."):
            module = getattr(module, part)
        saved[path] = (module, name, getattr(module, name))
        setattr(module, name, mx.full(getattr(module, name).shape, float("nan")))

    yield poison
    for module, name, value in saved.values():
        setattr(module, name, value)


@pytest.fixture
def backbone_calls(monkeypatch):
    """The number of positions of every backbone call (prefill chunks and frame steps)."""
    calls, original = [], Model.__call__

    def spy(self, embeddings, cache=None):
        calls.append(embeddings.shape[1])
        return original(self, embeddings, cache)

    monkeypatch.setattr(Model, "__call__", spy)
    return calls


def assert_valid_codes(codes: np.ndarray, model) -> None:
    """Semantic codes are codebook entries (+2 offset), acoustic codes FSQ levels (+2)."""
    a = model.config.acoustic
    assert codes.ndim == 2 and codes.shape[1] == 1 + a.n_acoustic_codebook
    assert ((codes[:, 0] >= 2) & (codes[:, 0] < a.semantic_codebook_size + 2)).all()
    assert ((codes[:, 1:] >= 2) & (codes[:, 1:] < a.acoustic_codebook_size + 2)).all()


# ---- S2: nothing non-finite reaches an index ---------------------------------------------------
def test_fsq_levels_of_any_float_equal_numpy(model):
    head = model.acoustic_transformer
    x = np.random.default_rng(0).uniform(-1.5, 1.5, (4, 36)).astype(np.float32)
    x[0, :4] = [np.nan, np.inf, -np.inf, -0.0]
    expected = np.round((np.clip(np.nan_to_num(x, nan=0.0), -1, 1) + 1) / 2 * 20)
    np.testing.assert_array_equal(np.array(head.quantize_levels(mx.array(x))), expected.astype(np.int32))


def test_semantic_code_of_a_non_finite_hidden_state_is_in_range(model):
    head = model.acoustic_transformer
    dim = model.config.backbone.dim
    for value in (float("nan"), float("inf"), -float("inf")):
        code = int(head.semantic_code(mx.full((1, dim), value)).item())
        assert 1 <= code < head.config.semantic_codebook_size + 2, (value, code)


def test_nan_acoustic_weights_give_valid_codes_not_a_crash(model, poisoned):
    """The review's S2 repro: NaN velocity → once −2³¹ gathered from the embedding table."""
    poisoned("acoustic_transformer.acoustic_codebook_output.weight")
    result = generate(model, TEXT, VOICE, seed=1, max_frames=4)
    assert result.frames >= 1  # the tiny model happens to end after its first such frame
    assert_valid_codes(result.codes, model)
    assert (result.codes[:, 1:] == 10 + 2).all()  # NaN → 0.0 → the middle level of 0..20
    assert np.isfinite(result.audio).all()


def test_nan_semantic_weights_end_the_utterance(model, poisoned):
    poisoned("acoustic_transformer.semantic_codebook_output.weight")
    result = generate(model, TEXT, VOICE, seed=1, max_frames=4)
    assert result.frames == 0 and result.finish_reason == "stop"


@pytest.mark.parametrize(
    "option,value",
    [("cfg_alpha", float("nan")), ("cfg_alpha", float("inf")), ("cfg_alpha", -5.0), ("cfg_alpha", 10.5),
     ("flow_steps", 10**5), ("flow_steps", 0), ("flow_steps", 2.0), ("max_frames", 0), ("max_frames", True),
     ("seed", -1), ("seed", 2**64), ("prefill_step_size", 0), ("first_chunk_frames", 0), ("chunk_frames", 0)],
)
def test_bad_options_are_refused_by_the_library(model, option, value):
    if option not in ("first_chunk_frames", "chunk_frames"):
        with pytest.raises(ValueError, match=f"^{option} must be"):
            next(stream_generate_long(model, TEXT, VOICE, **{option: value}))
        if option != "prefill_step_size":
            with pytest.raises(ValueError, match=f"^{option} must be"):
                next(generate_step_for(model, **{option: value}))
    with pytest.raises(ValueError, match=f"^{option} must be"):
        next(stream_generate(model, TEXT, VOICE, **{option: value}))


def generate_step_for(model, **options):
    from mlx_speech.generation import generate_step

    ids = model.tokenizer.encode_speech(TEXT, VOICE)
    return generate_step(model, model.prompt_embeddings(mx.array(ids), model.voice(VOICE)), **options)


# ---- S3: chunked prefill and cancel ------------------------------------------------------------
def test_chunked_prefill_equals_one_call(model):
    ids = model.tokenizer.encode_speech(TEXT, VOICE)
    emb = model.prompt_embeddings(mx.array(ids), model.voice(VOICE))
    whole_cache = model.make_cache()
    whole = model(emb[None], whole_cache)[:, -1]
    for step in (1, 5, len(ids) - 1, len(ids)):
        cache = model.make_cache()
        h = prefill(model, emb, cache, step)
        np.testing.assert_allclose(np.array(h), np.array(whole), atol=1e-5)
        assert cache[0].offset == len(ids)
        for c, w in zip(cache, whole_cache):
            np.testing.assert_allclose(np.array(c.state[0]), np.array(w.state[0]), atol=1e-5)
            np.testing.assert_allclose(np.array(c.state[1]), np.array(w.state[1]), atol=1e-5)
    # A batch (B, L, dim) goes through the same chunks, row by row the same as alone.
    h = prefill(model, mx.stack([emb, emb]), model.make_cache(), 5)
    np.testing.assert_allclose(np.array(h), np.array(mx.concatenate([whole, whole])), atol=1e-5)


@pytest.mark.parametrize("use_voice_cache", [False, True])
def test_chunked_prefill_keeps_the_golden_codes(model, cases, backbone_calls, use_voice_cache):
    """g1's reference codes (official code, explicit noise) with a prompt split into 4-position chunks."""
    g = cases["g1_e2e"]
    model.voice_cache = VoicePrefixCache()
    n = g["codes"].shape[0]
    ref = generate(model, TEXT, VOICE, noise=g["noise"], max_frames=n, use_voice_cache=use_voice_cache)
    model.voice_cache = VoicePrefixCache()  # the voice prefix is prefilled again, chunked
    backbone_calls.clear()
    chunked = generate(model, TEXT, VOICE, noise=g["noise"], max_frames=n, prefill_step_size=4,
                       use_voice_cache=use_voice_cache)
    ids = model.tokenizer.encode_speech(TEXT, VOICE)
    parts = [voice_prefix_length(ids, model.config.audio_token_id)] if use_voice_cache else []
    parts.append(len(ids) - sum(parts))
    expected = [min(4, p - k) for p in parts for k in range(0, p, 4)]
    assert backbone_calls == expected + [1] * (n - 1)  # then one step per frame fed back
    np.testing.assert_array_equal(chunked.codes, np.array(g["codes"]))
    np.testing.assert_allclose(chunked.audio, ref.audio, atol=1e-4)


@pytest.mark.parametrize("use_voice_cache", [False, True])
def test_chunked_prefill_and_the_default_cap_keep_g2_exact(model, cases, use_voice_cache):
    """g2 ends with END_AUDIO: chunked prefill and max_frames=None (capped by the noise rows) stop
    there with the reference codes and waveform."""
    from conftest import assert_close

    g = cases["g2_e2e_eoa"]
    model.voice_cache = VoicePrefixCache()
    result = generate(model, TEXT, VOICE, noise=g["noise"], prefill_step_size=3, use_voice_cache=use_voice_cache)
    assert result.finish_reason == "stop" and result.frame_cap == g["noise"].shape[0]
    np.testing.assert_array_equal(result.codes, np.array(g["codes"])[:-1])
    assert_close(result.audio, g["waveform"])


@pytest.mark.parametrize("use_voice_cache", [False, True])
def test_cancel_during_prefill_stops_after_the_first_chunk(model, backbone_calls, monkeypatch, use_voice_cache):
    cancel = threading.Event()
    counted = Model.__call__

    def set_after_first_call(self, embeddings, cache=None):
        out = counted(self, embeddings, cache)
        cancel.set()  # as a server's client leaving while the first chunk runs
        return out

    monkeypatch.setattr(Model, "__call__", set_after_first_call)
    model.voice_cache = VoicePrefixCache()
    long_text = "word " * 200  # about 1000 prompt positions in the tiny byte-level vocabulary
    responses = list(stream_generate(model, long_text, VOICE, seed=0, max_frames=5, prefill_step_size=4,
                                     use_voice_cache=use_voice_cache, cancel=cancel))
    assert responses == [] and backbone_calls == [4]
    assert len(model.voice_cache) == 0  # a cancelled prefix is not kept


def test_cancel_between_frames_stops_the_stream(model):
    cancel = threading.Event()
    stream = stream_generate(model, TEXT, VOICE, seed=0, max_frames=20, first_chunk_frames=1, chunk_frames=1,
                             cancel=cancel)
    got = [next(stream), next(stream)]
    cancel.set()
    assert list(stream) == []
    assert [r.frames for r in got] == [1, 2] and all(r.finish_reason is None for r in got)


def test_cancel_stops_long_text_before_the_next_piece(model, backbone_calls):
    cancel = threading.Event()
    story = "The first sentence is here. " * 3 + "\n\n" + "A second paragraph follows. " * 3
    stream = stream_generate_long(model, story, VOICE, seed=0, max_frames=3, chunk_chars=40, cancel=cancel)
    first = next(stream)
    cancel.set()
    calls = len(backbone_calls)
    assert list(stream) == [] and first.piece == 0
    assert len(backbone_calls) - calls <= 1  # at most the frame step already queued, no new prefill


@pytest.mark.parametrize("text", ["\U0001F600" * 1024, "".join(chr(0x4E00 + i * 37 % 20000) for i in range(1024))],
                         ids=["emoji", "cjk"])
def test_long_text_without_spaces_is_bounded_work(model, backbone_calls, text):
    """The review's S3 repro (2048 emoji, 4096 CJK: one prompt, L × L attention): now every piece is
    at most chunk_chars characters (so its prompt at most 4 tokens per character, one per UTF-8
    byte), and no backbone call takes more than prefill_step_size positions."""
    from mlx_speech.longform import DEFAULT_CHUNK_CHARS, plan_pieces
    from mlx_speech.options import DEFAULT_PREFILL_STEP

    planned = plan_pieces(model, text, VOICE, max_frames=1)
    fixed = len(model.tokenizer.encode_speech("x", VOICE)) - 1  # voice rows and specials
    assert "".join(t for t, _ in planned) == text and len(planned) == -(-len(text) // DEFAULT_CHUNK_CHARS)
    assert all(n <= fixed + 4 * DEFAULT_CHUNK_CHARS for _, n in planned)
    last = list(stream_generate_long(model, text, VOICE, seed=0, max_frames=1))[-1]
    assert last.pieces == len(planned) and max(backbone_calls) <= DEFAULT_PREFILL_STEP
    assert sum(c for c in backbone_calls if c > 1) >= sum(n for _, n in planned) - len(planned) * fixed


# ---- the runaway cap ---------------------------------------------------------------------------
@pytest.fixture
def never_ends(monkeypatch):
    """A model that misses its END frame: the loop no longer recognizes END_AUDIO (the END code
    itself is a valid index, so the frames go on as a runaway model's would)."""
    import mlx_speech.frame_decoder as frame_decoder

    monkeypatch.setattr(frame_decoder, "END_AUDIO", -1)


def text_tokens_of(model, text: str) -> int:
    """Tokens of the text alone (no voice rows, no specials)."""
    return len(model.tokenizer.encode(text))


@pytest.fixture
def small_caps(model, monkeypatch):
    """frame_cap's constants made small, to keep runaway tests short: cap = 2 + ceil(1.5 x tokens)."""
    import mlx_speech.options as options

    monkeypatch.setattr(options, "FRAME_CAP_BASE", 2)
    monkeypatch.setattr(options, "FRAME_CAP_PER_TOKEN", 1.5)
    return lambda text: 2 + int(np.ceil(1.5 * text_tokens_of(model, text)))


def test_frame_cap_formula():
    from mlx_speech.options import DEFAULT_MAX_FRAMES, frame_cap

    assert [frame_cap(n) for n in (0, 1, 10, 101)] == [25, 45, 225, 2045]
    assert frame_cap(102) == frame_cap(10**6) == DEFAULT_MAX_FRAMES


def test_frame_cap_keeps_twice_the_slowest_reading():
    """The justification in benchmarks/measure_frame_cap.py holds for the constants in use."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import measure_frame_cap as m
    finally:
        sys.path.pop(0)
    from mlx_speech.options import frame_cap

    tok = m.tekken()
    for lang, text, spoken in m.SAMPLES:
        n = len(tok.encode(text, bos=False, eos=False))
        slowest = m.FRAME_RATE * (m.syllables(spoken or text) / m.SLOW_RATE + m.SILENCE_S)
        assert frame_cap(n) >= 2 * slowest, (lang, text)


def test_text_tokens_count_the_text_only(model):
    from mlx_speech.generation import text_tokens

    for text in ("Hi.", TEXT, "  spaced\tout  ", "[AUDIO] is text here"):
        assert text_tokens(model, model.tokenizer.encode_speech(text, VOICE)) == text_tokens_of(model, text)


def test_without_max_frames_a_runaway_stops_at_the_cap(model, never_ends):
    from mlx_speech.options import frame_cap

    result = generate(model, "Hi.", VOICE, seed=0)  # the real cap: 25 + 20 x tokens
    n = text_tokens_of(model, "Hi.")
    assert result.frame_cap == frame_cap(n) == 25 + 20 * n
    assert result.frames == result.frame_cap and result.finish_reason == "length"
    assert result.codes.shape == (result.frame_cap, 37)


def test_without_max_frames_a_normal_end_is_a_stop(model, small_caps):
    # With the real END check, an utterance that ends before its cap reports "stop" and the cap.
    for seed in range(20):
        r = generate(model, TEXT, VOICE, seed=seed)
        assert r.frame_cap == small_caps(TEXT) and r.frames <= r.frame_cap
        assert r.finish_reason == ("length" if r.frames == r.frame_cap else "stop")
        if r.finish_reason == "stop":
            break
    else:
        pytest.fail("no seed ended before the cap")


def test_explicit_max_frames_is_kept_exactly(model, never_ends, small_caps):
    chunks = list(stream_generate(model, TEXT, VOICE, seed=2, max_frames=50, chunk_frames=7))
    assert chunks[-1].frames == 50 and chunks[-1].finish_reason == "length"
    assert {c.frame_cap for c in chunks} == {50} and small_caps(TEXT) != 50


def test_long_text_caps_each_piece_and_says_which(model, never_ends, small_caps):
    story = "First piece here.\n\nA second, longer piece follows it."
    chunks = list(stream_generate_long(model, story, VOICE, seed=0, chunk_chars=40, first_chunk_chars=None))
    caps = [small_caps("First piece here."), small_caps("A second, longer piece follows it.")]
    last = chunks[-1]
    assert last.finish_reason == "length" and last.frames == sum(caps)
    assert last.capped_pieces == ((0, caps[0]), (1, caps[1])) and last.frame_cap == caps[1]
    assert [c.frame_cap for c in chunks if c.piece == 0] == [caps[0]] * sum(c.piece == 0 for c in chunks)


@pytest.mark.parametrize("value", [10**400, -(10**400), float("nan"), "1.2", True])
def test_numbers_no_float_can_hold_are_refused_in_one_short_line(value):
    from mlx_speech.options import check_options

    with pytest.raises(ValueError) as e:
        check_options(cfg_alpha=value)
    assert str(e.value).startswith("cfg_alpha must be a finite number") and len(str(e.value)) < 200
    with pytest.raises(ValueError) as e:
        check_options(seed=value if not isinstance(value, float) else 10**400)
    assert str(e.value).startswith("seed must be an integer") and len(str(e.value)) < 200
