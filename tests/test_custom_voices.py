"""Custom voices speak wherever a preset does: a Voice object, a voice file, a name in the user's
voice folder, or one added with Model.add_voice — each equal to the preset with the same rows."""

from __future__ import annotations

import pickle

import mlx.core as mx
import numpy as np
import pytest

from mlx_speech import generate
from mlx_speech.errors import CheckpointError
from mlx_speech.longform import generate_long
from mlx_speech.voice_codes import codes_to_voice
from mlx_speech.voice_file import Voice

TEXT = "Hello world, this is a test."
OPTS = dict(seed=3, max_frames=5)


@pytest.fixture(scope="module")
def preset(model):
    """The casual_male preset spoken once, and its rows as a custom Voice."""
    return generate(model, TEXT, "casual_male", **OPTS), np.array(model.voice("casual_male"))


def assert_same_speech(result, reference):
    np.testing.assert_array_equal(result.codes, reference.codes)
    np.testing.assert_array_equal(result.audio, reference.audio)


def test_a_voice_object_speaks_like_the_preset_with_its_rows(model, preset):
    reference, rows = preset
    assert_same_speech(generate(model, TEXT, Voice(rows), **OPTS), reference)
    assert_same_speech(generate(model, TEXT, Voice(rows), use_voice_cache=False, **OPTS), reference)


def test_a_voice_file_and_the_user_folder_speak_like_the_preset(model, preset, tmp_path, monkeypatch):
    reference, rows = preset
    path = Voice(rows, metadata={"source": "test"}).save(tmp_path / "me.safetensors")
    assert_same_speech(generate(model, TEXT, str(path), **OPTS), reference)
    assert_same_speech(generate(model, TEXT, path, **OPTS), reference)
    monkeypatch.setenv("MLX_SPEECH_VOICES", str(tmp_path))
    assert_same_speech(generate(model, TEXT, "me", **OPTS), reference)
    with pytest.raises(ValueError, match=r"unknown voice 'you'.*custom voices in .*: me"):
        generate(model, TEXT, "you", **OPTS)


def test_add_voice_makes_a_name_and_replacing_it_drops_its_cached_prefix(model, preset):
    reference, rows = preset
    model.add_voice("mine", rows)
    try:
        assert "mine" in model.voices
        assert_same_speech(generate(model, TEXT, "mine", **OPTS), reference)
        other = np.array(model.voice("neutral_female"))
        other = np.concatenate([other, other[:3]])  # 7 rows, as casual_male: the same prompt ids
        model.add_voice("mine", other)
        replaced = generate(model, TEXT, "mine", **OPTS)
        uncached = generate(model, TEXT, Voice(other), use_voice_cache=False, **OPTS)
        assert_same_speech(replaced, uncached)
        assert not np.array_equal(replaced.codes, reference.codes)
    finally:
        model.set_voices({k: model.voice(k) for k in model.voices if k != "mine"})


def test_two_custom_voices_of_one_length_never_share_a_cached_prefix(model, preset):
    reference, rows = preset
    generate(model, TEXT, Voice(rows), **OPTS)  # caches a 7-row prefix
    shifted = Voice(rows[::-1].copy())
    assert_same_speech(generate(model, TEXT, shifted, **OPTS),
                       generate(model, TEXT, shifted, use_voice_cache=False, **OPTS))


def test_a_voice_from_codes_sets_the_prompt_length(model):
    codes = np.stack([np.arange(2, 39) % 20 + 2] * 4).astype(np.int32)
    codes[:, 0] = [5, 9, 40, 77]
    voice = Voice(codes_to_voice(model, codes), codes)
    assert voice.rows == 5
    result = generate(model, TEXT, voice, **OPTS)
    assert result.frames == 5 and len(result.audio) == 5 * 1920
    ids = model.tokenizer.encode_speech_prompt(TEXT, voice.rows)
    assert ids.count(model.tokenizer.audio_id) == 5


def test_long_text_with_a_custom_voice_equals_the_preset(model, preset):
    _, rows = preset
    text = "First sentence here. " * 8 + "\n\n" + "Second paragraph now. " * 8
    kwargs = dict(seed=2, max_frames=3, chunk_chars=100, first_chunk_chars=40)
    a = generate_long(model, text, "casual_male", **kwargs)
    b = generate_long(model, text, Voice(rows), **kwargs)
    assert_same_speech(b, a)


def bad_voice_files(tmp_path, dim):
    wrong_width = tmp_path / "wide.safetensors"
    mx.save_safetensors(str(wrong_width), {"embedding": mx.zeros((4, dim + 1))})
    nan = tmp_path / "nan.safetensors"
    mx.save_safetensors(str(nan), {"embedding": mx.full((4, dim), float("nan"))})
    renamed = tmp_path / "pickle.safetensors"
    renamed.write_bytes(pickle.dumps({"embedding": np.zeros((4, dim), np.float32)}))
    no_key = tmp_path / "nokey.safetensors"
    mx.save_safetensors(str(no_key), {"rows": mx.zeros((4, dim))})
    return [(wrong_width, "shape (4, 65)"), (nan, "NaN"), (renamed, "not a safetensors"),
            (no_key, "no 'embedding'")]


def test_bad_voice_files_are_one_line_errors_naming_the_file(model, tmp_path):
    for path, message in bad_voice_files(tmp_path, model.config.backbone.dim):
        with pytest.raises(CheckpointError) as e:
            generate(model, TEXT, path, **OPTS)
        text = str(e.value)
        assert str(path) in text and message in text and "\n" not in text, text
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        generate(model, TEXT, tmp_path / "missing.safetensors", **OPTS)


@pytest.mark.parametrize("name,rows,message", [
    ("../x", None, "must be 1 to 64 letters"),
    ("ok", np.zeros((3, 5), np.float32), "needs \\(rows, 64\\)"),
    ("ok", np.full((3, 64), np.inf, np.float32), "NaN or infinite"),
    ("ok", np.zeros((0, 64), np.float32), "1 to 1024"),
])
def test_add_voice_checks_name_and_rows(model, name, rows, message):
    with pytest.raises(ValueError, match=message):
        model.add_voice(name, rows if rows is not None else np.zeros((3, 64), np.float32))
    assert "ok" not in model.voices and "../x" not in model.voices
