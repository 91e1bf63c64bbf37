"""Gap-free streaming playback over sounddevice (PortAudio).

The generator hands chunks to ``AudioPlayer.queue``; an output-stream callback pulls from a
lock-protected ring buffer. On an underrun the callback writes silence and counts it instead
of stopping the stream. Playback starts once enough audio is buffered to finish without a gap
at the measured generation speed (``plan``), a few-millisecond fade removes clicks at the very
start and end, and ``close`` drains everything before closing the stream. This module imports
nothing from the package.
"""

from __future__ import annotations

import threading
import time

import numpy as np

DEFAULT_FADE_MS = 5.0


class PlayerError(RuntimeError):
    """No audio output is possible (PortAudio missing, no device, unsupported settings)."""


def _sounddevice():
    try:
        import sounddevice
    except OSError as e:  # sounddevice raises OSError when the PortAudio library is absent
        raise PlayerError(
            f"cannot play audio: the PortAudio library is missing ({e}); "
            "install it (macOS: brew install portaudio; Debian/Ubuntu: apt install libportaudio2) "
            "or write to a file with --output"
        ) from None
    return sounddevice


def list_output_devices() -> list[tuple[int, str, float]]:
    """(index, name, default sample rate) of every device that can play audio."""
    sd = _sounddevice()
    return [
        (i, d["name"], d["default_samplerate"])
        for i, d in enumerate(sd.query_devices())
        if d["max_output_channels"] > 0
    ]


class LinearResampler:
    """Streaming linear-interpolation resampler; chunk boundaries are seamless."""

    def __init__(self, rate_in: int, rate_out: int):
        self.step = rate_in / rate_out
        self._pos = 0.0  # position of the next output sample, in input samples, relative to _prev
        self._prev = np.zeros(1, np.float32)  # last input sample of the previous chunk

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.step == 1.0:
            return x
        buf = np.concatenate([self._prev, x])  # index 0 is the previous chunk's last sample
        n_out = max(0, int(np.floor((len(buf) - 1 - self._pos) / self.step)) + 1)
        t = self._pos + self.step * np.arange(n_out)
        t = t[t <= len(buf) - 1]
        out = np.interp(t, np.arange(len(buf)), buf).astype(np.float32)
        self._pos = (t[-1] + self.step if len(t) else self._pos) - (len(buf) - 1)
        self._prev = buf[-1:]
        return out


def _ring_read(buf: np.ndarray, pos: int, out: np.ndarray) -> None:
    """Copy len(out) samples starting at absolute position ``pos`` of ring ``buf`` into out."""
    start, n = pos % len(buf), len(out)
    first = min(n, len(buf) - start)
    out[:first] = buf[start : start + first]
    out[first:] = buf[: n - first]


def _ring_write(buf: np.ndarray, pos: int, x: np.ndarray) -> None:
    """Copy x into ring ``buf`` at absolute position ``pos``."""
    start, n = pos % len(buf), len(x)
    first = min(n, len(buf) - start)
    buf[start : start + first] = x[:first]
    buf[: n - first] = x[first:]


class AudioPlayer:
    """Play a stream of float32 mono chunks through the default (or a given) output device.

    Args:
        sample_rate: rate of the queued audio (24000 for Voxtral).
        device: sounddevice output device (index or name); None for the default.
        fade_ms: fade-in at the very start and fade-out at the very end.
        stream_factory: builds the output stream (tests inject a fake); defaults to
            ``sounddevice.OutputStream``.

    Use as a context manager; ``close`` waits until everything queued was played.
    """

    def __init__(self, sample_rate: int, device=None, fade_ms: float = DEFAULT_FADE_MS,
                 stream_factory=None, blocksize: int = 0):
        self.sample_rate = sample_rate
        self.device = device
        self.fade_ms = fade_ms
        self.underruns = 0
        self.first_output_time: float | None = None  # perf_counter() when audio first reached the device
        self._lock = threading.Lock()
        self._drained = threading.Event()
        self._buf = np.zeros(sample_rate * 4, np.float32)
        self._read = 0  # total samples handed to the device
        self._write = 0  # total samples queued
        self._finished = False
        self._started = False
        self._start_threshold = 0  # samples to buffer before starting
        self._faded_in = False
        if stream_factory is None:
            sd = _sounddevice()
            self.device_rate = self._pick_rate(sd, device, sample_rate)
            stream_factory = sd.OutputStream
        else:
            self.device_rate = sample_rate
        self._resample = LinearResampler(sample_rate, self.device_rate)
        try:
            self._stream = stream_factory(
                samplerate=self.device_rate, channels=1, dtype="float32", device=device,
                callback=self._callback, blocksize=blocksize,
            )
        except Exception as e:  # PortAudioError and ValueError name the device problem
            raise PlayerError(f"cannot open audio output device {device!r}: {e}") from None

    @staticmethod
    def _pick_rate(sd, device, rate: int) -> int:
        """The audio's own rate if the device takes it, else the device's default rate."""
        try:
            sd.check_output_settings(device=device, samplerate=rate, channels=1, dtype="float32")
            return rate
        except Exception:
            try:
                info = sd.query_devices(device, "output")
            except Exception as e:
                raise PlayerError(f"no audio output device {device!r} available: {e}") from None
            return int(info["default_samplerate"])

    # ---- producer side -----------------------------------------------------------------
    def plan(self, expected_seconds: float, real_time_factor: float, chunk_seconds: float) -> None:
        """Set how much audio to buffer before starting, so playback never runs dry.

        At ``real_time_factor`` (audio seconds per wall second) ≥ 1 one chunk is enough;
        slower generation needs a lead covering the deficit over the whole utterance.
        """
        lead = chunk_seconds
        if real_time_factor < 1.0:
            lead = max(lead, expected_seconds * (1.0 - real_time_factor) * 1.1 + chunk_seconds)
        self._start_threshold = int(lead * self.device_rate)

    def queue(self, audio: np.ndarray) -> None:
        """Append a chunk (float32 mono at ``sample_rate``); starts playback when planned."""
        x = np.asarray(audio, np.float32).reshape(-1)
        if not self._faded_in and len(x):
            x = x.copy()
            n = min(len(x), int(self.sample_rate * self.fade_ms / 1000))
            x[:n] *= np.linspace(0.0, 1.0, n, endpoint=False, dtype=np.float32)
            self._faded_in = True
        x = self._resample(x)
        with self._lock:
            need = self._write - self._read + len(x)
            if need > len(self._buf):  # grow outside the callback's path: the callback only reads
                self._buf = self._grown(max(need, 2 * len(self._buf)))
            self._put(x)
            buffered = self._write - self._read
        if not self._started and buffered >= max(self._start_threshold, 1):
            self._start()

    def finish(self) -> None:
        """No more audio will come: fade out the tail and start playback if not yet started."""
        with self._lock:
            n = min(self._write - self._read, int(self.device_rate * self.fade_ms / 1000))
            if n:
                idx = np.arange(self._write - n, self._write) % len(self._buf)
                self._buf[idx] *= np.linspace(1.0, 0.0, n, dtype=np.float32)
            self._finished = True
            if self._write == self._read:
                self._drained.set()
        if not self._started and self._write > self._read:
            self._start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until everything queued was handed to the device (after ``finish``)."""
        return self._drained.wait(timeout)

    def close(self) -> None:
        """Finish, drain, then close the stream."""
        if not self._finished:
            self.finish()
        if self._started:
            self.wait()
            # Let the device play out its own buffer before stopping.
            time.sleep(getattr(self._stream, "latency", 0.0) or 0.0)
            self._stream.stop()
        self._stream.close()

    def abort(self) -> None:
        """Stop at once (Ctrl-C): close the stream without draining."""
        self._finished = True
        self._drained.set()
        if self._started:
            self._stream.abort()
        self._stream.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def buffered_seconds(self) -> float:
        return (self._write - self._read) / self.device_rate

    # ---- internals ---------------------------------------------------------------------
    def _start(self):
        self._started = True
        self._stream.start()

    def _grown(self, size: int) -> np.ndarray:
        n = self._write - self._read
        live = np.empty(n, np.float32)
        _ring_read(self._buf, self._read, live)
        new = np.zeros(size, np.float32)
        _ring_write(new, self._read, live)
        return new

    def _put(self, x: np.ndarray) -> None:
        _ring_write(self._buf, self._write, x)
        self._write += len(x)

    def _callback(self, outdata, frames, time_info, status):
        # Runs on the audio thread: no allocation of buffers, no blocking beyond the short lock.
        out = outdata[:, 0]
        with self._lock:
            n = min(frames, self._write - self._read)
            _ring_read(self._buf, self._read, out[:n])
            self._read += n
            finished = self._finished
            empty = self._write == self._read
        out[n:] = 0.0
        if n and self.first_output_time is None:
            self.first_output_time = time.perf_counter()
        if n < frames and not finished:
            self.underruns += 1
        if finished and empty:
            self._drained.set()
