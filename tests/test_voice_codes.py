"""Voices as codes: codes_to_voice against an independent NumPy sum and the golden embedding,
voice_to_codes (the inverse) at the release's width and on the tiny model, and the prompt
builder fed with a voice's own row count."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_close

from mlx_speech.voice_codes import codes_to_voice, decode_code_sums, voice_to_codes
from mlx_speech.voice_file import Voice

N_CODEBOOKS = 37
# The release's table (spec §2, T13): 8192 semantic codes + 2 specials, 36 × (21 levels + 2),
# 9022 rows padded to 9088, 3072 wide.
REAL_SIZES = [8194] + [23] * 36
REAL_ROWS, REAL_DIM = 9088, 3072


def offsets_of(sizes) -> np.ndarray:
    """Where each codebook starts in the flat table, from the sizes alone (not the model's)."""
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def numpy_sum(table: np.ndarray, sizes, codes: np.ndarray) -> np.ndarray:
    """Σ_k table[offset_k + codes[..., k]] in float64."""
    return table.astype(np.float64)[np.asarray(codes) + offsets_of(sizes)].sum(axis=-2)


def relative_residual(table, sizes, rows, codes) -> np.ndarray:
    """‖row − Σ‖ / ‖row‖ per frame, in float64."""
    rows = np.asarray(rows, np.float64)
    return np.linalg.norm(rows - numpy_sum(table, sizes, codes), axis=1) / np.linalg.norm(rows, axis=1)


def random_codes(rng, sizes, frames: int) -> np.ndarray:
    return np.stack([rng.integers(2, size, frames) for size in sizes], axis=1).astype(np.int32)


def official_end_codes() -> np.ndarray:
    return np.array([1] + [0] * 36)  # semantic END, acoustic EMPTY (spec §4.5)


def emitted_end_codes() -> np.ndarray:
    return np.array([1] + [2] * 36)  # what the model emits when it stops: not a voice's END row


@pytest.fixture(scope="module")
def table(model):
    return np.array(model.audio_embeddings.weight.astype(mx.float32))


@pytest.fixture(scope="module")
def sizes(model):
    return list(model.config.codebook_sizes)


# --- codes_to_voice ----------------------------------------------------------------------------

def test_offsets_agree_with_the_golden_flat_indices(cases, sizes):
    ref = cases["b_audio_embedding"]
    assert len(sizes) == N_CODEBOOKS
    flat = np.array(ref["codes"]) + offsets_of(sizes)
    assert (flat == np.array(ref["flat_indices"])).all()


def test_codes_to_voice_equals_numpy_sum_and_the_official_end_row(model, table, sizes):
    codes = random_codes(np.random.default_rng(3), sizes, 9)
    rows = codes_to_voice(model, codes)
    assert rows.shape == (10, model.config.backbone.dim) and rows.dtype == np.float32
    assert_close(rows[:-1], numpy_sum(table, sizes, codes), rel=1e-5)
    end = table.astype(np.float64)[1] + sum(table.astype(np.float64)[o] for o in offsets_of(sizes)[1:])
    assert_close(rows[-1], end, rel=1e-5)


def test_golden_rows_match_and_the_emitted_stop_frame_is_not_the_voice_end_row(model, cases, table, sizes):
    ref = cases["b_audio_embedding"]
    codes, embedding = np.array(ref["codes"]), np.array(ref["embedding"])
    # Rows 0–2 are normal frames; row 3 is the frame the model emits when it stops.
    assert (codes[3] == emitted_end_codes()).all()
    rows = codes_to_voice(model, codes[:3].astype(np.int32))
    assert_close(rows[:3], embedding[:3])
    # The golden row 3 is [1, 2, 2, …], a different sum from the voice's END row [1, 0, 0, …].
    assert_close(numpy_sum(table, sizes, emitted_end_codes()), embedding[3])
    assert_close(rows[3], numpy_sum(table, sizes, official_end_codes()))
    gap = np.linalg.norm(rows[3] - embedding[3]) / np.linalg.norm(embedding[3])
    assert gap > 0.5


@pytest.mark.parametrize(
    "codes, problem",
    [
        (np.full((2, 37), 2, np.int32) + np.eye(2, 37, dtype=np.int32) * -1, r"code 1 at frame 0, codebook 0"),
        (np.vstack([np.full((1, 37), 2), [[5] + [0] * 36]]).astype(np.int32), "frame 1, codebook 1"),
        (np.vstack([np.full((1, 37), 2), [[102] + [2] * 36]]).astype(np.int32), r"code 102 .*2\.\.101"),
        (np.vstack([np.full((1, 37), 2), [[2] * 36 + [23]]]).astype(np.int32), r"codebook 36 .*2\.\.22"),
        (np.full((3, 37), -4, np.int32), "outside"),
        (np.full((3, 36), 2, np.int32), r"shape \(frames, 37\)"),
        (np.full((37,), 2, np.int32), r"shape \(frames, 37\)"),
        (np.full((3, 37), 2.0), r"integers"),
    ],
    ids=["semantic-END", "acoustic-EMPTY", "semantic-past-end", "acoustic-past-end", "negative",
         "36-codebooks", "one-dimensional", "floats"],
)
def test_codes_to_voice_refuses_invalid_codes(model, codes, problem):
    with pytest.raises(ValueError, match=problem):
        codes_to_voice(model, codes)


# --- voice_to_codes at the release's width: decodable, so recovery must be exact ----------------

@pytest.fixture(scope="module")
def real_table():
    # Seeded random table with the release's shape and codebook layout (~110 MB float32).
    return np.random.default_rng(0).standard_normal((REAL_ROWS, REAL_DIM), dtype=np.float32)


def fake_model(table: np.ndarray):
    """What voice_to_codes reads of a Model: its table and its codebook sizes."""
    config = SimpleNamespace(codebook_sizes=REAL_SIZES, n_codebooks=N_CODEBOOKS)
    return SimpleNamespace(config=config, audio_embeddings=SimpleNamespace(weight=mx.array(table)))


def test_real_width_recovers_every_code(real_table):
    codes = random_codes(np.random.default_rng(1), REAL_SIZES, 218)  # neutral_female's 218 frames
    rows = np.vstack([numpy_sum(real_table, REAL_SIZES, codes), numpy_sum(real_table, REAL_SIZES, official_end_codes())])
    found, residual = voice_to_codes(fake_model(real_table), rows.astype(np.float32), return_residual=True)
    assert found.shape == (218, 37) and found.dtype == np.int32
    assert (found == codes).all()
    assert residual.shape == (218,) and residual.max() < 1e-5


def test_real_width_recovers_every_code_from_a_bf16_preset(real_table):
    # Like a real preset: a bf16 table, each frame's sum (fp32 accumulation) rounded to bf16.
    table = np.array(mx.array(real_table).astype(mx.bfloat16).astype(mx.float32))
    codes = random_codes(np.random.default_rng(2), REAL_SIZES, 64)
    rows = np.vstack([numpy_sum(table, REAL_SIZES, codes), numpy_sum(table, REAL_SIZES, official_end_codes())])
    preset = mx.array(rows.astype(np.float32)).astype(mx.bfloat16)
    assert not np.array_equal(np.array(preset.astype(mx.float32)), rows.astype(np.float32))  # really rounded
    found, residual = voice_to_codes(fake_model(table), preset, return_residual=True)
    assert (found == codes).all()
    true_residual = relative_residual(table, REAL_SIZES, np.array(preset.astype(mx.float32))[:-1], codes)
    assert_close(residual, true_residual, rel=1e-3)
    assert 0 < residual.max() < 0.01


# --- voice_to_codes on the tiny model (dim 64: not decodable, a local minimum only) ------------

def test_tiny_true_codes_are_a_fixed_point(table, sizes):
    codes = random_codes(np.random.default_rng(4), sizes, 12)
    rows = numpy_sum(table, sizes, codes).astype(np.float32)
    found, residual = decode_code_sums(table, sizes, rows, init=codes)
    assert (found == codes).all()
    assert residual.max() < 1e-5


def test_tiny_search_never_ends_worse_than_where_it_started(table, sizes):
    # bf16-rounded rows, so the true codes are not an exact fit either.
    codes = random_codes(np.random.default_rng(5), sizes, 12)
    rows = np.array(mx.array(numpy_sum(table, sizes, codes).astype(np.float32)).astype(mx.bfloat16).astype(mx.float32))
    true_residual = relative_residual(table, sizes, rows, codes)
    from_truth, _ = decode_code_sums(table, sizes, rows, init=codes)
    assert (relative_residual(table, sizes, rows, from_truth) <= true_residual + 1e-6).all()

    start, _ = decode_code_sums(table, sizes, rows, max_sweeps=0)  # the matching-pursuit start
    found, residual = decode_code_sums(table, sizes, rows)
    found_residual = relative_residual(table, sizes, rows, found)
    assert_close(residual, found_residual, rel=1e-4)  # it reports the residual of what it returns
    assert (found_residual <= relative_residual(table, sizes, rows, start) + 1e-6).all()
    print(
        f"\ntiny model (dim 64): codes agree {np.mean(found == codes):.0%} "
        f"(semantic {np.mean(found[:, 0] == codes[:, 0]):.0%}); residual found "
        f"{found_residual.mean():.3f} vs true {true_residual.mean():.4f}"
    )


def test_tiny_search_ends_in_a_local_minimum(table, sizes):
    """No single code change (checked by brute force, float64) lowers any frame's residual."""
    codes = random_codes(np.random.default_rng(6), sizes, 6)
    rows = numpy_sum(table, sizes, codes).astype(np.float32)
    found, _ = decode_code_sums(table, sizes, rows)
    base = relative_residual(table, sizes, rows, found)
    for k, size in enumerate(sizes):
        for code in range(2, size):
            moved = found.copy()
            moved[:, k] = code
            assert (relative_residual(table, sizes, rows, moved) >= base - 1e-6).all(), (k, code)


# --- the END row --------------------------------------------------------------------------------

def test_end_row_is_checked_and_dropped(model, sizes):
    codes = random_codes(np.random.default_rng(7), sizes, 5)
    rows = codes_to_voice(model, codes)
    assert voice_to_codes(model, rows).shape == (5, 37)
    bf16 = mx.array(rows).astype(mx.bfloat16)  # a bf16 END row still counts as the END row
    assert voice_to_codes(model, bf16).shape == (5, 37)
    assert voice_to_codes(model, rows[-1:]).shape == (0, 37)  # the END row alone: no frames


@pytest.mark.parametrize("last", ["a-frame", "emitted-stop-frame", "zeros"])
def test_a_last_row_that_is_not_the_end_row_is_refused(model, table, sizes, last):
    codes = random_codes(np.random.default_rng(8), sizes, 4)
    rows = codes_to_voice(model, codes)
    if last == "a-frame":
        rows = rows[:-1]  # frames only: the END row was dropped
    elif last == "emitted-stop-frame":
        rows[-1] = numpy_sum(table, sizes, emitted_end_codes())
    else:
        rows[-1] = 0
    with pytest.raises(ValueError, match="last voice row is not the END row"):
        voice_to_codes(model, rows)


def test_golden_presets_are_not_code_sums(model):
    # The tiny release's presets are random rows: their last row is no END row, and saying so is
    # what voice_to_codes must do rather than return codes for them.
    for name in model.voices:
        with pytest.raises(ValueError, match="not the END row"):
            voice_to_codes(model, model.voice(name))


@pytest.mark.parametrize(
    "rows, problem",
    [
        (np.zeros((3, 63), np.float32), r"shape \(rows, 64\)"),
        (np.zeros((64,), np.float32), r"shape \(rows, 64\)"),
        (np.zeros((0, 64), np.float32), r"1 to 1024 rows"),
        (np.zeros((1025, 64), np.float32), r"1 to 1024 rows"),
        (np.full((3, 64), np.nan, np.float32), "NaN"),
    ],
    ids=["wrong-width", "one-dimensional", "no-rows", "too-many-rows", "nan"],
)
def test_voice_to_codes_refuses_bad_rows(model, rows, problem):
    with pytest.raises(ValueError, match=problem):
        voice_to_codes(model, rows)


# --- a voice from codes through the prompt builder ----------------------------------------------

def test_voice_from_codes_round_trips_through_the_prompt_builder(model, sizes):
    codes = random_codes(np.random.default_rng(9), sizes, 6)
    voice = Voice(codes_to_voice(model, codes), codes)
    ids = model.tokenizer.encode_speech_prompt("Hello world, this is a test.", voice.rows)
    assert ids.count(model.tokenizer.audio_id) == len(codes) + 1 == voice.rows
    # The backbone's input: every [AUDIO] slot holds the voice's row, in order.
    embeddings = np.array(model.prompt_embeddings(mx.array(ids), mx.array(voice.embedding)))
    slots = np.array(ids) == model.tokenizer.audio_id
    assert np.array_equal(embeddings[slots], voice.embedding)
