"""Reference-clip preprocessing: each step against an analytic signal, and every refusal."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf

from mlx_speech import clip_prep
from mlx_speech.clip_prep import (
    ClipError,
    high_pass,
    prepare_clip,
    read_clip,
    resample,
    take_as_is,
    to_float_mono,
    trim_silence,
)
from mlx_speech.errors import CheckpointError
from mlx_speech.voice_codes import voice_rows_for_seconds

RATE = 24000
HOP = 1920


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def speechlike(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """Noise shaped like speech: a 150–3000 Hz band, syllable-rate (4 Hz) amplitude modulation."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / rate)
    spectrum[(f < 150) | (f > 3000)] = 0
    band = np.fft.irfft(spectrum, n)
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * np.arange(n) / rate)
    x = band * envelope
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def amplitude_at(x: np.ndarray, freq: float, rate: int) -> float:
    """Amplitude of the ``freq`` component of ``x`` (least squares on sin and cos)."""
    t = np.arange(x.size) / rate
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, x.astype(np.float64), rcond=None)
    return float(np.hypot(*coef))


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and text
    return text


def test_resample_44100_sine_matches_the_analytic_sine():
    x = tone(440.0, 1.0, 44100)
    y = resample(x, 44100, RATE)
    assert y.dtype == np.float32 and abs(y.size - RATE) <= 1
    expected = tone(440.0, y.size / RATE, RATE)[: y.size]
    middle = slice(RATE // 10, y.size - RATE // 10)  # the resampler's edge transients aside
    assert np.abs(y[middle] - expected[middle]).max() < 1e-3


def test_resample_removes_content_above_the_new_nyquist():
    # 15 kHz at 48 kHz cannot exist at 24 kHz; a naive decimation would alias it to 9 kHz.
    y = resample(tone(15000.0, 1.0, 48000), 48000, RATE)
    assert amplitude_at(y[2400:-2400], 9000.0, RATE) < 1e-3
    assert np.abs(y[2400:-2400]).max() < 0.01


def test_stereo_is_averaged_and_integers_are_scaled():
    left, right = tone(300, 0.1, RATE), tone(500, 0.1, RATE)
    np.testing.assert_allclose(to_float_mono(np.stack([left, right], 1)), (left + right) / 2, atol=1e-7)
    ints = np.array([0, 16384, -32768], np.int16)
    np.testing.assert_array_equal(to_float_mono(ints), [0.0, 0.5, -1.0])


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 4)), np.array([0.0, np.nan]), np.array(["a", "b"])])
def test_bad_sample_arrays_are_refused(bad):
    with pytest.raises(ClipError) as e:
        to_float_mono(bad)
    one_line(e)


def test_high_pass_removes_20_hz_and_keeps_1_khz():
    low, high = tone(20.0, 2.0, RATE, 0.4), tone(1000.0, 2.0, RATE, 0.2)
    y = high_pass(low + high + 0.1, RATE)  # with a DC offset too
    middle = y[RATE // 2 : -RATE // 2]
    assert amplitude_at(middle, 20.0, RATE) < 0.4 * 10 ** (-30 / 20)  # ≥ 30 dB down
    assert amplitude_at(middle, 1000.0, RATE) == pytest.approx(0.2, rel=0.01)
    assert abs(float(middle.mean())) < 1e-3


def test_trim_finds_the_sound_between_silences():
    sound = speechlike(3.0)
    x = np.concatenate([np.zeros(RATE), sound, np.zeros(RATE // 2)]).astype(np.float32)
    start, end = trim_silence(x, RATE)
    margin = clip_prep.MARGIN_SECONDS * RATE
    window = clip_prep.WINDOW_SECONDS * RATE
    assert RATE - margin - window <= start <= RATE - margin + window
    assert 4 * RATE + margin - window <= end <= 4 * RATE + margin + window


def test_prepared_clip_has_whole_frames_and_the_voice_row_count():
    rate = 44100
    x = np.concatenate([np.zeros(rate // 2), resample(speechlike(4.3), RATE, rate), np.zeros(rate)])
    clip = prepare_clip(x, rate)
    assert clip.sample_rate == RATE and clip.samples.dtype == np.float32
    assert clip.samples.size % HOP == 0
    assert clip.frames == math.ceil(clip.seconds * 12.5)
    assert voice_rows_for_seconds(clip.seconds) == clip.frames + 1
    # the sound (4.3 s) plus margins and the closing pause, not the leading/trailing silence
    expected = 4.3 + 2 * clip_prep.MARGIN_SECONDS + clip_prep.PAUSE_SECONDS
    assert abs(clip.seconds - expected) <= 2 * clip_prep.WINDOW_SECONDS
    assert clip.source_seconds == pytest.approx(x.size / rate)
    pause = clip.samples[int((clip.seconds - clip_prep.PAUSE_SECONDS + 0.05) * RATE) :]
    assert np.abs(pause).max() < 1e-3 * np.abs(clip.samples).max()  # it ends on a pause
    assert np.abs(clip.samples).max() <= clip_prep.MAX_PEAK + 1e-6


def test_long_clip_is_cut_at_a_quiet_moment_before_max_seconds():
    gap_at = 14.0
    x = np.concatenate([speechlike(gap_at, seed=1), np.zeros(int(0.3 * RATE)), speechlike(10.0, seed=2)])
    clip = prepare_clip(x, RATE, max_seconds=16.0)
    assert clip.seconds <= 16.0 + 1e-9
    # sound runs up to the gap (cut inside it), then the closing pause
    sound = np.flatnonzero(np.abs(clip.samples) > 1e-3)
    assert gap_at - 0.1 <= sound[-1] / RATE <= gap_at + 0.35


@pytest.mark.parametrize("audio, match", [
    (np.zeros(5 * RATE, np.float32), "silent"),
    (np.concatenate([np.zeros(RATE), speechlike(0.5), np.zeros(RATE)]), "only 0.6"),
])  # fmt: skip
def test_silent_and_short_clips_are_refused(audio, match):
    with pytest.raises(ClipError, match=match) as e:
        prepare_clip(audio, RATE)
    one_line(e)


@pytest.mark.parametrize("audio, rate, match", [
    (np.zeros(HOP * 3, np.float32), 22050, "24000 Hz"),
    (np.zeros((HOP * 3, 2), np.float32), RATE, "mono"),
    (np.zeros(HOP * 3 + 5, np.float32), RATE, "whole number"),
    (np.zeros(0, np.float32), RATE, "whole number"),
    (np.zeros(HOP * 201, np.float32), RATE, "over max_seconds"),
])  # fmt: skip
def test_take_as_is_refuses_what_the_codec_does_not_decode(audio, rate, match):
    with pytest.raises(ClipError, match=match) as e:
        take_as_is(audio, rate, max_seconds=16.0)
    one_line(e)


def test_take_as_is_keeps_the_samples_and_any_whole_number_of_frames():
    x = np.random.default_rng(0).uniform(-0.5, 0.5, HOP).astype(np.float32)  # one frame: 80 ms
    clip = take_as_is(x, RATE)
    np.testing.assert_array_equal(clip.samples, x)
    assert clip.frames == 1 and clip.seconds == pytest.approx(0.08)


@pytest.mark.parametrize("value", [1.0, 31.0, float("nan"), "16"])
def test_max_seconds_outside_its_range_is_refused(value):
    with pytest.raises(ValueError, match="max_seconds") as e:
        prepare_clip(speechlike(3.0), RATE, max_seconds=value)
    one_line(e)


@pytest.mark.parametrize("ext", [".wav", ".flac", ".ogg"])
def test_read_clip_reads_each_format_as_mono(tmp_path, ext):
    stereo = np.stack([tone(440, 1.0, 22050), tone(440, 1.0, 22050, phase=0.3)], 1)
    path = tmp_path / f"ref{ext}"
    sf.write(path, stereo, 22050)
    got = read_clip(path)
    assert (got.sample_rate, got.channels) == (22050, 2)
    assert got.seconds == pytest.approx(1.0, abs=1e-3)
    tol = 0.05 if ext == ".ogg" else 1e-3  # Vorbis is lossy
    np.testing.assert_allclose(got.samples[: stereo.shape[0]], stereo.mean(1), atol=tol)


def test_read_clip_reads_only_the_start_of_a_long_file(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, tone(440, 3.0, 8000), 8000)
    got = read_clip(path, max_seconds=1.0)
    assert got.samples.size == 8000 and got.seconds == pytest.approx(3.0)


@pytest.mark.parametrize("kind", ["missing", "folder", "not audio", "empty"])
def test_unreadable_files_are_refused_naming_the_file(tmp_path, kind):
    path = tmp_path / "ref.wav"
    if kind == "folder":
        path.mkdir()
    elif kind == "not audio":
        path.write_bytes(b"\x80\x04\x95 this is a pickle, not a wav" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        read_clip(path)
    assert one_line(e).startswith(str(path))
