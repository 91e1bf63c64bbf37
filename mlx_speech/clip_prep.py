"""Reference clips for enrollment: read a file, then make it what the codec decodes.

``prepare_clip`` takes any recording to the form enrollment fits: mono, 24 kHz (soxr's
band-limited resampler), a ~70 Hz high-pass (rumble and DC are not voice and would fool the
silence detector), leading and trailing silence trimmed, at most ``max_seconds`` cut at the
quietest moment near the limit, ending on a short pause (a voice's rows are followed by the
END row, and the model speaks on from where its reference stops), and padded to whole 80 ms
frames. ``take_as_is`` is the ``preprocess=False`` path: 24 kHz mono of whole frames, unchanged
(round-trip tests need the exact target).

Imports no MLX: the command line reads and checks the clip before loading the model.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .errors import file_error

MIN_SECONDS = 2.0  # shorter references clone poorly; the Swift port measured 4 s at 0.67 similarity
MAX_SECONDS_LIMIT = 30.0  # memory grows with the clip; 16 s already matches 24 s
MAX_READ_SECONDS = 120.0  # only the start of a longer file is read (bounded memory)
MAX_CHANNELS = 64
SAMPLE_RATE_RANGE = (4000, 768000)
HIGH_PASS_HZ = 70.0
HIGH_PASS_ORDER = 4  # 24 dB per octave: 20 Hz is ~43 dB down, 150 Hz untouched
WINDOW_SECONDS = 0.02  # silence detection resolution
SILENCE_DB = -60.0  # a clip whose loudest 20 ms is below this is silent
GATE_DB = 35.0  # windows this far below the loudest one count as silence
MARGIN_SECONDS = 0.05  # kept before the first and after the last loud window
PAUSE_SECONDS = 0.3  # the pause the clip ends on
CUT_SEARCH_SECONDS = 3.0  # a clip over max_seconds is cut at the quietest point this close to it
FADE_SECONDS = 0.02
TARGET_RMS_DB = -20.0  # level of the voiced part after preprocessing
MAX_PEAK = 0.95


class ClipError(ValueError):
    """A reference clip enrollment cannot use (too short, silent, wrong format): one line."""


@dataclass
class Clip:
    """A clip ready for enrollment.

    Attributes:
        samples: float32 mono at ``sample_rate``, a whole number of frames.
        sample_rate: 24000 for the Voxtral codec.
        seconds: the audio used, before padding to whole frames.
        source_seconds: the input's duration.
        frame_samples: samples per codec frame (1920: 80 ms).
    """

    samples: np.ndarray
    sample_rate: int
    seconds: float
    source_seconds: float
    frame_samples: int = 1920

    @property
    def frames(self) -> int:
        return self.samples.size // self.frame_samples


def _check_rate(sample_rate) -> int:
    lo, hi = SAMPLE_RATE_RANGE
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or not lo <= sample_rate <= hi:
        raise ClipError(f"sample rate must be an integer from {lo} to {hi} Hz, got {sample_rate!r}")
    return int(sample_rate)


def check_max_seconds(value, name: str = "max_seconds") -> float:
    """``value`` as a float in [MIN_SECONDS, MAX_SECONDS_LIMIT]; ValueError naming ``name``."""
    from .options import check_number

    return check_number(value, name, MIN_SECONDS, MAX_SECONDS_LIMIT)


# ---- reading ---------------------------------------------------------------------------------------
def readable_formats() -> list[str]:
    """File extensions libsndfile reads here (mp3 only where it was built with mpg123)."""
    import soundfile as sf

    names = ["wav", "flac", "ogg", "aiff"] + (["mp3"] if "MP3" in sf.available_formats() else [])
    return names


@dataclass
class AudioFile:
    """What ``read_clip`` read: mono float32 ``samples`` (channels averaged), the file's
    ``sample_rate``, its full duration ``seconds`` and its number of ``channels``."""

    samples: np.ndarray
    sample_rate: int
    seconds: float
    channels: int


def read_clip(path: str | os.PathLike, max_seconds: float = MAX_READ_SECONDS) -> AudioFile:
    """The mono samples of an audio file (at most its first ``max_seconds``) and what it is.

    Channels are averaged block by block, so a long multichannel file never sits in memory whole.

    Raises:
        CheckpointError: ``"<path>: <problem>"`` for a missing, unreadable or unsupported file.
    """
    import soundfile as sf

    path = os.fspath(path)
    if not os.path.exists(path):
        raise file_error(path, "audio file does not exist")
    if not os.path.isfile(path):
        raise file_error(path, "is not a regular file; give an audio file")
    try:
        info = sf.info(path)
        rate, channels = info.samplerate, info.channels
        lo, hi = SAMPLE_RATE_RANGE
        if not lo <= rate <= hi:
            raise file_error(path, f"sample rate {rate} Hz is outside {lo}..{hi}")
        if not 1 <= channels <= MAX_CHANNELS:
            raise file_error(path, f"has {channels} channels; at most {MAX_CHANNELS} are read")
        limit = int(max_seconds * rate)
        parts, read = [], 0
        for block in sf.blocks(path, blocksize=rate, dtype="float32", always_2d=True):
            block = block[: limit - read]
            parts.append(block.mean(axis=1, dtype=np.float32))
            read += len(block)
            if read >= limit:
                break
    except (RuntimeError, ValueError, TypeError, OSError) as e:
        if isinstance(e, ValueError) and str(e).startswith(path):
            raise
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise file_error(path, f"cannot read audio ({reason}); readable formats: "
                               f"{', '.join(readable_formats())}") from None
    samples = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    frames = info.frames if info.frames > 0 else read
    return AudioFile(samples, rate, frames / rate, channels)


# ---- the steps ---------------------------------------------------------------------------------------
def to_float_mono(audio) -> np.ndarray:
    """Float32 mono (n,) from (n,) or (n, channels) samples: channels averaged, integers scaled
    to [−1, 1). Raises ClipError for other shapes and for NaN or infinite samples."""
    audio = np.asarray(audio)
    if np.issubdtype(audio.dtype, np.integer):
        audio = audio.astype(np.float32) / float(np.iinfo(audio.dtype).max + 1)
    elif not np.issubdtype(audio.dtype, np.floating):
        raise ClipError(f"audio samples must be numbers, got dtype {audio.dtype}")
    audio = audio.astype(np.float32, copy=False)
    if audio.ndim == 2 and 1 <= audio.shape[1] <= MAX_CHANNELS:
        audio = audio.mean(axis=1, dtype=np.float32)
    if audio.ndim != 1:
        raise ClipError(f"audio must have shape (samples,) or (samples, channels), got {audio.shape}")
    if not np.all(np.isfinite(audio)):
        raise ClipError("audio holds NaN or infinite samples")
    return audio


def resample(audio: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling with soxr ("HQ": flat passband, no audible aliasing)."""
    if rate == target_rate or audio.size == 0:
        return audio.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(audio.astype(np.float32, copy=False), rate, target_rate, quality="HQ").astype(np.float32)


def high_pass(audio: np.ndarray, rate: int, cutoff: float = HIGH_PASS_HZ, order: int = HIGH_PASS_ORDER) -> np.ndarray:
    """Zero-phase high-pass with a Butterworth magnitude 1/sqrt(1 + (cutoff/f)^(2·order)).

    Applied in the frequency domain on a reflect-padded copy (the padding outlasts the filter's
    ringing, so nothing wraps around): no phase shift, no SciPy, one FFT.
    """
    if audio.size == 0:
        return audio
    pad = min(int(0.25 * rate), audio.size - 1)
    padded = np.pad(audio.astype(np.float64), (pad, pad), mode="reflect") if pad > 0 else audio.astype(np.float64)
    n = 1 << (padded.size - 1).bit_length()
    freqs = np.fft.rfftfreq(n, 1.0 / rate)
    gain = np.zeros_like(freqs)
    gain[1:] = 1.0 / np.sqrt(1.0 + (cutoff / freqs[1:]) ** (2 * order))
    filtered = np.fft.irfft(np.fft.rfft(padded, n) * gain, n)[pad : pad + audio.size]
    return filtered.astype(np.float32)


def window_levels_db(audio: np.ndarray, rate: int, window_seconds: float = WINDOW_SECONDS) -> tuple[np.ndarray, int]:
    """RMS level in dBFS of consecutive windows (the last one partial), and the window length."""
    win = max(1, int(round(window_seconds * rate)))
    n = -(-audio.size // win)
    padded = np.zeros(n * win, np.float64)
    padded[: audio.size] = audio
    counts = np.full(n, win, np.float64)
    counts[-1] = audio.size - (n - 1) * win
    power = (padded.reshape(n, win) ** 2).sum(axis=1) / counts
    return 10 * np.log10(np.maximum(power, 1e-20)), win


def trim_silence(audio: np.ndarray, rate: int) -> tuple[int, int]:
    """[start, end) of the sound in ``audio``: windows within GATE_DB of the loudest, plus margins.

    Raises ClipError when even the loudest window is below SILENCE_DB.
    """
    levels, win = window_levels_db(audio, rate)
    if levels.size == 0 or levels.max() < SILENCE_DB:
        loudest = levels.max() if levels.size else -math.inf
        raise ClipError(f"the clip is silent (loudest moment {loudest:.0f} dBFS, below {SILENCE_DB:.0f}); "
                        "record with the microphone closer or the input level higher")
    loud = np.flatnonzero(levels >= levels.max() - GATE_DB)
    margin = int(MARGIN_SECONDS * rate)
    start = max(0, loud[0] * win - margin)
    end = min(audio.size, (loud[-1] + 1) * win + margin)
    return start, end


def _quietest_cut(audio: np.ndarray, rate: int, start: int, limit: int) -> int:
    """A cut point in (limit − CUT_SEARCH_SECONDS, limit]: the middle of its quietest window."""
    lo = max(start + 1, limit - int(CUT_SEARCH_SECONDS * rate))
    levels, win = window_levels_db(audio[lo:limit], rate)
    full = levels[: max(1, (limit - lo) // win)]
    return lo + int(np.argmin(full)) * win + win // 2


def prepare_clip(audio, sample_rate: int, *, max_seconds: float = 16.0, target_rate: int = 24000,
                 frame_samples: int = 1920, min_seconds: float = MIN_SECONDS) -> Clip:
    """Preprocess a recording for enrollment (see the module docstring for the steps).

    Args:
        audio: (n,) or (n, channels) samples, float or integer.
        sample_rate: of ``audio``.
        max_seconds: the most audio kept, the closing pause included.
        target_rate, frame_samples: the codec's sample rate and samples per frame.
        min_seconds: refuse clips with less sound than this after trimming.

    Raises:
        ClipError: a silent clip, or one with less than ``min_seconds`` of sound.
    """
    max_seconds = check_max_seconds(max_seconds)
    rate = _check_rate(sample_rate)
    mono = to_float_mono(audio)
    source_seconds = mono.size / rate
    x = high_pass(resample(mono, rate, target_rate), target_rate)
    start, end = trim_silence(x, target_rate)
    sound = (end - start) / target_rate
    if sound < min_seconds:
        raise ClipError(f"the clip has only {sound:.2f} s of sound after trimming silence; "
                        f"at least {min_seconds:g} s is needed (5 to 16 s works best)")
    pause = int(PAUSE_SECONDS * target_rate)
    limit = start + int(max_seconds * target_rate) - pause
    cut = end if end <= limit else _quietest_cut(x, target_rate, start, limit)
    voiced = x[start:cut].astype(np.float64)
    if cut < end:  # cut inside the sound: fade out rather than click
        fade = min(int(FADE_SECONDS * target_rate), voiced.size)
        voiced[voiced.size - fade :] *= np.linspace(1.0, 0.0, fade)
    # End on a pause: the recording's own quiet tail where it has one, then digital silence.
    tail = x[cut : cut + pause] if cut == end else np.zeros(0)
    clip = np.concatenate([voiced, tail, np.zeros(pause - tail.size)])
    clip = _normalize(clip, x[start:cut], target_rate)
    seconds = clip.size / target_rate
    frames = -(-clip.size // frame_samples)
    samples = np.zeros(frames * frame_samples, np.float32)
    samples[: clip.size] = clip
    return Clip(samples, target_rate, seconds, source_seconds, frame_samples)


def _normalize(clip: np.ndarray, voiced: np.ndarray, rate: int) -> np.ndarray:
    """Scale so the sounding windows average TARGET_RMS_DB, the peak kept under MAX_PEAK."""
    levels, _ = window_levels_db(voiced, rate)
    loud = levels[levels >= levels.max() - GATE_DB]
    rms_db = 10 * np.log10(np.mean(10 ** (loud / 10)))
    gain = 10 ** ((TARGET_RMS_DB - rms_db) / 20)
    peak = float(np.abs(clip).max())
    gain = min(gain, MAX_PEAK / peak) if peak > 0 else gain
    return clip * gain


def take_as_is(audio, sample_rate: int, *, max_seconds: float = 16.0, target_rate: int = 24000,
               frame_samples: int = 1920) -> Clip:
    """The ``preprocess=False`` path: ``audio`` unchanged, after checking it is what the codec
    decodes — mono at ``target_rate``, a positive whole number of ``frame_samples`` frames, at
    most ``max_seconds``.

    Raises:
        ClipError: naming what differs and how to fix it.
    """
    max_seconds = check_max_seconds(max_seconds)
    rate = _check_rate(sample_rate)
    audio = np.asarray(audio)
    if audio.ndim == 2 and audio.shape[1] == 1:
        audio = audio[:, 0]
    if audio.ndim != 1:
        raise ClipError(f"without preprocessing the audio must be mono (samples,), got shape {audio.shape}")
    if rate != target_rate:
        raise ClipError(f"without preprocessing the audio must be {target_rate} Hz, got {rate} Hz; "
                        "enable preprocessing to resample it")
    if audio.size == 0 or audio.size % frame_samples:
        raise ClipError(f"without preprocessing the audio must be a positive whole number of "
                        f"{frame_samples}-sample frames, got {audio.size} samples")
    samples = to_float_mono(audio)
    seconds = samples.size / rate
    if seconds > max_seconds + 1e-9:
        raise ClipError(f"the audio is {seconds:.2f} s, over max_seconds {max_seconds:g}; shorten it or raise max_seconds")
    return Clip(samples, rate, seconds, seconds, frame_samples)
