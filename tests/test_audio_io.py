"""Tests for mlx_speech.audio_io: atomic one-shot and streamed audio file writing."""

import os

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from mlx_speech import audio_io
from mlx_speech.audio_io import (
    AudioFileWriter,
    AudioWriteError,
    check_output_path,
    supported_extensions,
    write_audio,
)

SR = 24000


def _tone(n=SR // 2, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    return (0.5 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _leftovers(folder):
    return sorted(p for p in os.listdir(folder) if p.endswith(".part"))


@pytest.mark.parametrize("ext", [".wav", ".flac"])
def test_lossless_round_trip(tmp_path, ext):
    audio = _tone()
    path = tmp_path / f"out{ext}"
    write_audio(path, audio, SR)
    back, sr = sf.read(path, dtype="float32")
    assert sr == SR
    assert back.shape == audio.shape
    # PCM_16 quantization: at most half a step (plus float rounding).
    np.testing.assert_allclose(back, audio, atol=1 / 32768 + 1e-7)
    assert sf.info(str(path)).subtype == "PCM_16"
    assert _leftovers(tmp_path) == []


def test_ogg_vorbis_round_trip(tmp_path):
    audio = _tone()
    path = tmp_path / "out.ogg"
    write_audio(path, audio, SR)
    info = sf.info(str(path))
    assert (info.format, info.subtype, info.samplerate, info.frames) == ("OGG", "VORBIS", SR, audio.size)


@pytest.mark.skipif(".mp3" not in supported_extensions(), reason="libsndfile built without MP3")
def test_mp3_is_written(tmp_path):
    path = tmp_path / "out.mp3"
    write_audio(path, _tone(), SR)
    info = sf.info(str(path))
    assert (info.format, info.samplerate, info.channels) == ("MP3", SR, 1)


def test_mx_array_and_column_vector_accepted(tmp_path):
    audio = _tone(1000)
    write_audio(tmp_path / "a.wav", mx.array(audio), SR)
    write_audio(tmp_path / "b.wav", audio[:, None], SR)
    a, _ = sf.read(tmp_path / "a.wav", dtype="int16")
    b, _ = sf.read(tmp_path / "b.wav", dtype="int16")
    np.testing.assert_array_equal(a, b)


def test_out_of_range_samples_are_clipped_not_wrapped(tmp_path):
    write_audio(tmp_path / "c.wav", np.array([1.5, -2.0, 0.0], np.float32), SR)
    back, _ = sf.read(tmp_path / "c.wav", dtype="int16")
    assert back[0] == 32767 and back[1] == -32768 and back[2] == 0


def test_overwrites_existing_file(tmp_path):
    path = tmp_path / "o.wav"
    path.write_bytes(b"old")
    write_audio(path, _tone(100), SR)
    assert sf.info(str(path)).frames == 100


@pytest.mark.parametrize("name", ["out.xyz", "out", "out.aiff"])
def test_bad_extension_names_it_and_lists_valid(tmp_path, name):
    with pytest.raises(ValueError) as info:
        write_audio(tmp_path / name, _tone(10), SR)
    message = str(info.value)
    assert repr(os.path.splitext(name)[1] or "(none)") in message
    assert ".wav" in message and ".flac" in message and ".ogg" in message
    assert os.listdir(tmp_path) == []


def test_missing_folder_is_named(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        write_audio(missing / "out.wav", _tone(10), SR)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        AudioFileWriter(missing / "out.wav", SR)


@pytest.mark.parametrize("rate", [0, -1, 24000.5, True])
def test_bad_sample_rate(tmp_path, rate):
    with pytest.raises(ValueError, match="sample_rate"):
        write_audio(tmp_path / "r.wav", _tone(10), rate)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", [np.zeros((2, 10), np.float32), np.array([0.0, np.nan], np.float32)])
def test_bad_audio_leaves_nothing(tmp_path, bad):
    with pytest.raises(ValueError):
        write_audio(tmp_path / "bad.wav", bad, SR)
    assert os.listdir(tmp_path) == []


def test_failure_mid_write_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "fail.wav"
    path_existing = tmp_path / "keep.wav"
    write_audio(path_existing, _tone(50), SR)
    before = path_existing.read_bytes()

    def boom(self, data):
        raise OSError("disk full")

    monkeypatch.setattr(sf.SoundFile, "write", boom)
    with pytest.raises(OSError, match="disk full"):
        write_audio(path, _tone(), SR)
    with pytest.raises(OSError, match="disk full"):
        write_audio(path_existing, _tone(), SR)
    assert not path.exists()
    assert path_existing.read_bytes() == before  # the old file survives a failed rewrite
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("ext", [".wav", ".flac"])
def test_streamed_equals_one_shot(tmp_path, ext):
    audio = _tone(SR)
    write_audio(tmp_path / f"one{ext}", audio, SR)
    with AudioFileWriter(tmp_path / f"stream{ext}", SR) as writer:
        # Uneven chunk sizes, including an empty one, as a streaming decoder may produce.
        for chunk in np.split(audio, [1, 1920, 1920, 5000, 17000]):
            writer.write(chunk)
        assert not (tmp_path / f"stream{ext}").exists()  # only appears on close
    assert writer.closed and writer.frames_written == audio.size
    one, _ = sf.read(tmp_path / f"one{ext}", dtype="int16")
    streamed, _ = sf.read(tmp_path / f"stream{ext}", dtype="int16")
    np.testing.assert_array_equal(streamed, one)
    if ext == ".wav":
        assert (tmp_path / "stream.wav").read_bytes() == (tmp_path / "one.wav").read_bytes()
    assert _leftovers(tmp_path) == []


def test_exception_in_with_block_discards_by_default(tmp_path):
    path = tmp_path / "s.wav"
    with pytest.raises(RuntimeError):
        with AudioFileWriter(path, SR) as writer:
            writer.write(_tone(100))
            raise RuntimeError("generation failed")
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_exception_with_keep_partial_finalizes(tmp_path):
    path = tmp_path / "s.wav"
    with pytest.raises(KeyboardInterrupt):
        with AudioFileWriter(path, SR, keep_partial=True) as writer:
            writer.write(_tone(100))
            raise KeyboardInterrupt
    assert sf.info(str(path)).frames == 100
    assert _leftovers(tmp_path) == []


def test_explicit_close_and_abort(tmp_path):
    kept = AudioFileWriter(tmp_path / "kept.flac", SR)
    kept.write(_tone(300))
    kept.close()
    kept.close()  # idempotent
    assert sf.info(str(tmp_path / "kept.flac")).frames == 300
    with pytest.raises(ValueError, match="already closed"):
        kept.write(_tone(10))

    dropped = AudioFileWriter(tmp_path / "dropped.wav", SR)
    dropped.write(_tone(300))
    dropped.abort()
    dropped.abort()
    assert sorted(os.listdir(tmp_path)) == ["kept.flac"]


def test_bad_chunk_is_refused_and_writer_stays_usable(tmp_path):
    with AudioFileWriter(tmp_path / "s.wav", SR) as writer:
        with pytest.raises(ValueError, match="chunk must be mono"):
            writer.write(np.zeros((2, 3), np.float32))
        writer.write(_tone(10))
    assert sf.info(str(tmp_path / "s.wav")).frames == 10


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_final_file_gets_normal_permissions(tmp_path):
    # The temp file must not leak mkstemp-style 0o600 permissions into the result.
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "p.wav"
    write_audio(path, _tone(10), SR)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_an_existing_folder_is_refused_before_writing(tmp_path):
    (tmp_path / "speech.wav").mkdir()
    for attempt in (check_output_path, lambda p: AudioFileWriter(p, SR), lambda p: write_audio(p, _tone(10), SR)):
        with pytest.raises(IsADirectoryError, match="speech.wav is a folder"):
            attempt(tmp_path / "speech.wav")
    assert os.listdir(tmp_path) == ["speech.wav"] and os.listdir(tmp_path / "speech.wav") == []


def test_check_output_path_tries_for_real_and_leaves_nothing(tmp_path):
    check_output_path(tmp_path / "ok.wav")
    assert os.listdir(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        check_output_path(tmp_path / "file" / "o.wav")


def test_libsndfile_write_error_names_the_requested_path(tmp_path, monkeypatch):
    def full_disk(self, data):
        raise sf.LibsndfileError(2, "Error writing: ")  # how soundfile reports ENOSPC

    path = tmp_path / "out.wav"
    writer = AudioFileWriter(path, SR)
    monkeypatch.setattr(sf.SoundFile, "write", full_disk)
    with pytest.raises(AudioWriteError) as e:
        writer.write(_tone(100))
    assert str(e.value).startswith(f"cannot write {path}: ") and ".part" not in str(e.value)
    assert isinstance(e.value, OSError) and writer.closed
    assert os.listdir(tmp_path) == []  # the temporary file is removed


def test_a_temp_file_that_cannot_be_created_names_the_requested_path(tmp_path, monkeypatch):
    def refuse(path):
        raise PermissionError(13, "Permission denied", os.path.join(tmp_path, ".out.wav.1234abcd.part"))

    monkeypatch.setattr(audio_io, "_temp_path", refuse)
    with pytest.raises(AudioWriteError, match=f"^cannot write {tmp_path / 'out.wav'}: Permission denied$"):
        AudioFileWriter(tmp_path / "out.wav", SR)
