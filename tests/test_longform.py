"""Long text: splitting rules, per-piece seeds, crossfaded joins, and equality with stream_generate."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_speech import generate, stream_generate
from mlx_speech.longform import (
    batch_generate_long,
    chunk_seed,
    crossfade,
    generate_long,
    plan_pieces,
    stream_batch_generate_long,
    stream_generate_long,
)
from mlx_speech.text_split import split_text

VOICE = "casual_male"
TEXT = "Hello world, this is a test."
SENTENCES = [f"Sentence number {i} is here, with a clause." for i in range(40)]
STORY = (
    "The first paragraph opens the story. It has a second sentence.\n\n"
    "A second paragraph follows. It is short.\n\n"
    "The third and last paragraph ends here."
)


def words(pieces):
    return " ".join(pieces).split()


# ---- splitting ---------------------------------------------------------------------------------
def test_short_text_is_one_piece_unchanged():
    assert split_text("  One. Two! Three?  ", 100, 5) == ["One. Two! Three?"]


def test_sentences_are_packed_up_to_the_limit_and_no_word_is_lost():
    text = " ".join(SENTENCES)
    pieces = split_text(text, chunk_chars=200, first_chunk_chars=None)
    assert words(pieces) == text.split()
    assert all(len(p) <= 200 and p.endswith(".") for p in pieces)
    # Greedy packing: a piece plus the next sentence would not have fitted.
    assert all(len(p) + 1 + len(SENTENCES[0]) > 200 for p in pieces[:-1])


def test_first_piece_is_short_and_ends_a_sentence():
    pieces = split_text(" ".join(SENTENCES), chunk_chars=200, first_chunk_chars=60)
    assert pieces[0] == SENTENCES[0]
    assert len(pieces[1]) > 150
    # A first sentence longer than first_chunk_chars is kept whole rather than cut mid-sentence.
    long_first = "This opening sentence is quite a bit longer than the first limit. " + " ".join(SENTENCES)
    assert split_text(long_first, 200, 20)[0] == "This opening sentence is quite a bit longer than the first limit."


def test_paragraph_breaks_always_cut_and_closing_quotes_stay():
    text = 'He said "Stop." Then he left.\n\n' + "Next paragraph. " * 20
    pieces = split_text(text, chunk_chars=120, first_chunk_chars=None)
    assert pieces[0] == 'He said "Stop." Then he left.'
    assert words(pieces) == text.split()


def test_lower_case_after_a_dot_is_not_a_sentence_end():
    text = "Use a tool, e.g. this one here. " * 6
    pieces = split_text(text, chunk_chars=40, first_chunk_chars=None)
    assert all(p.endswith("here.") for p in pieces)


def test_without_sentence_ends_cuts_fall_back_to_commas_then_spaces():
    commas = ", ".join(f"item {i}" for i in range(60))
    pieces = split_text(commas, chunk_chars=50, first_chunk_chars=20)
    assert words(pieces) == commas.split()
    assert all(len(p) <= 50 and p.endswith(",") for p in pieces[:-1])
    spaces = " ".join(f"word{i}" for i in range(60))
    pieces = split_text(spaces, chunk_chars=50, first_chunk_chars=20)
    assert words(pieces) == spaces.split() and all(len(p) <= 50 for p in pieces)


def test_a_word_longer_than_the_limit_is_cut_between_characters():
    text = "short " + "x" * 30 + " tail end"
    pieces = split_text(text, chunk_chars=10, first_chunk_chars=None)
    assert pieces == ["short", "x" * 10, "x" * 10, "x" * 10, "tail end"]


# Character clusters that must stay whole: a skin-toned emoji, a ZWJ family, a flag (two regional
# indicators), a keycap (digit, VS16, enclosing mark), a subdivision flag (tag characters), a
# decomposed accent, a Devanagari conjunct (virama) with a vowel sign, a CJK character, a letter.
CLUSTERS = ["\U0001F44D\U0001F3FD", "\U0001F468\u200d\U0001F469\u200d\U0001F467", "\U0001F1EB\U0001F1F7",
            "1\ufe0f\u20e3", "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F",
            "e\u0301", "\u0915\u094d\u0937\u093f", "\u4e2d", "a"]


@pytest.mark.parametrize("limit", [1, 7, 37, 400])
def test_text_without_spaces_is_cut_between_clusters_never_inside(limit):
    rng = np.random.default_rng(limit)
    clusters = [CLUSTERS[i] for i in rng.integers(0, len(CLUSTERS), 600)]
    text = "".join(clusters)
    boundaries = set(np.cumsum([len(c) for c in clusters]).tolist())
    pieces = split_text(text, chunk_chars=limit, first_chunk_chars=None)
    assert "".join(pieces) == text  # nothing lost, nothing added
    longest = max(map(len, CLUSTERS))
    assert all(len(p) <= max(limit, longest) for p in pieces)
    ends = np.cumsum([len(p) for p in pieces]).tolist()
    if limit >= longest:  # a cut inside a cluster only where one cluster exceeds the limit
        assert set(ends) <= boundaries
    # Greedy: each piece but the last ends at the last boundary that fits (within one cluster).
    assert all(len(p) > limit - longest for p in pieces[:-1])


def test_flags_pair_regional_indicators_from_the_start_of_the_run():
    flags = "\U0001F1EB\U0001F1F7\U0001F1E9\U0001F1EA\U0001F1EE\U0001F1F9" * 10  # FR DE IT, 30 flags
    pieces = split_text(flags, chunk_chars=5, first_chunk_chars=None)
    assert "".join(pieces) == flags and all(len(p) in (2, 4) for p in pieces)


def test_one_cluster_longer_than_the_limit_is_still_bounded():
    zalgo = "a" + "\u0301" * 100 + "b"
    pieces = split_text(zalgo, chunk_chars=10, first_chunk_chars=None)
    assert "".join(pieces) == zalgo and all(len(p) <= 10 for p in pieces)


def test_long_cjk_without_punctuation_is_split_into_bounded_pieces():
    cjk = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(4096))
    pieces = split_text(cjk)  # the defaults: 400 characters, a short first piece
    assert "".join(pieces) == cjk and len(pieces) == 11
    assert all(len(p) <= 400 for p in pieces) and len(pieces[0]) == 400  # no sentence end to cut at


def test_other_scripts_sentence_marks():
    assert split_text("这是第一句。这是第二句。这是第三句。", 8, None) == ["这是第一句。", "这是第二句。", "这是第三句。"]
    hindi = "यह पहला वाक्य है। यह दूसरा वाक्य है। यह तीसरा है।"
    assert split_text(hindi, 20, None) == ["यह पहला वाक्य है।", "यह दूसरा वाक्य है।", "यह तीसरा है।"]


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="at least 1 character"):
        split_text("Some text.", 0)


def test_chunk_seeds_are_deterministic_and_distinct():
    assert chunk_seed(None, 3) is None
    assert chunk_seed(7, 0) == 7
    seeds = [chunk_seed(7, i) for i in range(1, 50)]
    assert seeds == [chunk_seed(7, i) for i in range(1, 50)]
    assert len(set(seeds + [7])) == 50 and chunk_seed(8, 1) != chunk_seed(7, 1)


def test_crossfade_is_equal_power():
    n = 960
    a, b = np.ones(2000, np.float32), np.ones(1500, np.float32)
    out = crossfade(a, b, n)
    assert len(out) == 2000 + 1500 - n
    gain_out, gain_in = crossfade(np.ones(n, np.float32), np.zeros(n, np.float32), n), \
        crossfade(np.zeros(n, np.float32), np.ones(n, np.float32), n)
    np.testing.assert_allclose(gain_out**2 + gain_in**2, 1.0, atol=1e-6)
    assert gain_out[0] > 0.99 and gain_in[-1] > 0.99  # starts on a, ends on b


# ---- generation --------------------------------------------------------------------------------
def test_one_piece_is_exactly_stream_generate(model):
    ref = list(stream_generate(model, TEXT, VOICE, seed=3, max_frames=9))
    got = list(stream_generate_long(model, TEXT, VOICE, seed=3, max_frames=9))
    assert len(got) == len(ref)
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(g.audio, r.audio)
        np.testing.assert_array_equal(g.codes, r.codes)
        assert (g.frames, g.finish_reason, g.piece, g.pieces) == (r.frames, r.finish_reason, 0, 1)
    whole = generate_long(model, TEXT, VOICE, seed=3, max_frames=9)
    np.testing.assert_array_equal(whole.audio, generate(model, TEXT, VOICE, seed=3, max_frames=9).audio)


def test_paragraphs_make_one_continuous_crossfaded_signal(model):
    kwargs = dict(chunk_chars=45, first_chunk_chars=30, max_frames=3)
    planned = plan_pieces(model, STORY, VOICE, chunk_chars=45, first_chunk_chars=30, max_frames=3)
    texts = [t for t, _ in planned]
    assert texts == ["The first paragraph opens the story.", "It has a second sentence.",
                     "A second paragraph follows. It is short.", "The third and last paragraph ends here."]

    chunks = list(stream_generate_long(model, STORY, VOICE, seed=5, crossfade_ms=40, **kwargs))
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "length" and chunks[-1].frames == 4 * 3
    assert sorted({c.piece for c in chunks}) == list(range(4)) and chunks[-1].prompt_tokens == sum(n for _, n in planned)
    audio = np.concatenate([c.audio for c in chunks])

    # Each piece on its own, with its derived seed; the joins overlap by 40 ms (960 samples).
    pieces = [generate(model, t, VOICE, seed=chunk_seed(5, i), max_frames=3).audio for i, t in enumerate(texts)]
    overlap = 960
    assert len(audio) == sum(map(len, pieces)) - (len(pieces) - 1) * overlap
    expected = pieces[0]
    for p in pieces[1:]:
        expected = crossfade(expected, p, overlap)
    np.testing.assert_allclose(audio, expected, atol=1e-6)
    assert chunks[-1].audio_seconds == pytest.approx(len(audio) / 24000)
    np.testing.assert_array_equal(np.concatenate([c.codes for c in chunks]),
                                  np.concatenate([generate(model, t, VOICE, seed=chunk_seed(5, i), max_frames=3).codes
                                                  for i, t in enumerate(texts)]))

    butt = generate_long(model, STORY, VOICE, seed=5, crossfade_ms=0, **kwargs)
    np.testing.assert_allclose(butt.audio, np.concatenate(pieces), atol=1e-6)


def test_pieces_in_parallel_give_the_same_samples_in_order(model):
    # Seed 6: pieces of 162, 3, 49 and 6 frames, so pieces 1-3 finish while piece 0 still speaks.
    kwargs = dict(seed=6, chunk_chars=45, first_chunk_chars=30, max_frames=None, chunk_frames=2)
    one = list(stream_generate_long(model, STORY, VOICE, **kwargs))
    four = list(stream_generate_long(model, STORY, VOICE, batch_size=4, **kwargs))
    # Same pieces, same chunks in the same order (the first piece first), same samples.
    assert [c.piece for c in four] == [c.piece for c in one] and four[0].piece == 0
    assert len({c.piece for c in one}) == 4 and len({len(c.codes) for c in one}) > 1
    for a, b in zip(one, four):
        np.testing.assert_array_equal(b.codes, a.codes)
        np.testing.assert_array_equal(b.audio, a.audio)
        assert (b.frames, b.finish_reason, b.capped_pieces) == (a.frames, a.finish_reason, a.capped_pieces)
    short = dict(kwargs, max_frames=2)
    np.testing.assert_array_equal(generate_long(model, STORY, VOICE, batch_size=3, **short).audio,
                                  generate_long(model, STORY, VOICE, **short).audio)
    with pytest.raises(ValueError, match="^batch_size must be"):
        next(stream_generate_long(model, STORY, VOICE, batch_size=0))


def test_many_long_texts_at_once_each_equal_its_own_run(model):
    """A batch file: every piece of every text through one batch, each text's chunks in its own
    order and the same samples as that text alone."""
    texts = [STORY, "One more text follows here. It has two sentences, both short.", "Short."]
    kwargs = dict(chunk_chars=45, first_chunk_chars=30, chunk_frames=3, max_frames=12)
    voices, seeds = ["casual_male", "neutral_female", "casual_male"], [2, 9, 4]
    streamed = {t: [] for t in range(3)}
    for t, r in stream_batch_generate_long(model, texts, voices, seeds=seeds, batch_size=3, **kwargs):
        streamed[t].append(r)
    for t, (text, voice, seed) in enumerate(zip(texts, voices, seeds)):
        alone = list(stream_generate_long(model, text, voice, seed=seed, **kwargs))
        assert [c.piece for c in streamed[t]] == [c.piece for c in alone]
        np.testing.assert_array_equal(np.concatenate([c.audio for c in streamed[t]]),
                                      np.concatenate([c.audio for c in alone]))
        assert streamed[t][-1].finish_reason == alone[-1].finish_reason
    results = batch_generate_long(model, texts[1:], voices[1:], seeds=seeds[1:], batch_size=2, **kwargs)
    np.testing.assert_array_equal(results[0].audio, np.concatenate([c.audio for c in streamed[1]]))
    with pytest.raises(ValueError, match=r"^texts\[1\]: text is empty"):
        next(stream_batch_generate_long(model, [STORY, " "]))


def test_same_seed_same_audio_other_seed_other_audio(model):
    kwargs = dict(chunk_chars=45, first_chunk_chars=30, max_frames=2)
    a = generate_long(model, STORY, VOICE, seed=11, **kwargs)
    b = generate_long(model, STORY, VOICE, seed=11, **kwargs)
    c = generate_long(model, STORY, VOICE, seed=12, **kwargs)
    np.testing.assert_array_equal(a.audio, b.audio)
    assert not np.array_equal(a.codes[:, 1:], c.codes[:, 1:])


def test_pieces_are_cut_again_to_fit_a_small_context(model, monkeypatch):
    monkeypatch.setattr(model.config, "max_seq_len", 64)
    text = " ".join(SENTENCES[:6])
    planned = plan_pieces(model, text, VOICE, max_frames=20)
    assert len(planned) > 1 and all(n + 20 <= 64 for _, n in planned)
    assert words([t for t, _ in planned]) == text.split()


@pytest.mark.parametrize(
    "text,kwargs,message",
    [
        ("word " * 30, {"max_chars": 100}, "text is 150 characters, over the limit of 100"),
        ("  \n ", {}, "text is empty"),
        (TEXT, {"voice": "nobody"}, "unknown voice 'nobody'; choose one of: casual_male, neutral_female"),
        (TEXT, {"max_frames": 70000}, "text too long: max_frames is 70000"),
        (TEXT, {"crossfade_ms": -1}, "crossfade_ms must be >= 0"),
        (TEXT, {"max_chars": 0}, "max_chars must be at least 1"),
    ],
)
def test_errors_name_the_value(model, text, kwargs, message):
    voice = kwargs.pop("voice", VOICE)
    with pytest.raises(ValueError, match=message):
        next(stream_generate_long(model, text, voice, **kwargs))


def test_a_long_word_is_cut_to_fit_a_small_context(model, monkeypatch):
    monkeypatch.setattr(model.config, "max_seq_len", 40)
    planned = plan_pieces(model, "x" * 200, VOICE, max_frames=10)
    assert "".join(t for t, _ in planned) == "x" * 200 and all(n + 10 <= 40 for _, n in planned)


def test_text_that_cannot_fit_even_cut_to_characters_is_a_clear_error(model, monkeypatch):
    monkeypatch.setattr(model.config, "max_seq_len", 20)  # 13 positions for one character + 10 frames
    with pytest.raises(ValueError, match="text too long: the prompt of the piece 'x' is 13 tokens and max_frames "
                                         "is 10, over the model's context of 20"):
        plan_pieces(model, "x" * 200, VOICE, max_frames=10)
