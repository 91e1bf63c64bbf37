"""Gap-free streaming playback over sounddevice (PortAudio).

The generator hands chunks to ``AudioPlayer.queue``; an output-stream callback copies them out
of a lock-protected ring buffer. On an underrun the callback writes silence and counts it
instead of stopping the stream. Playback starts once enough audio is buffered to finish without
a gap at the generation speed: measured by the player itself from the chunks' arrival times, or
given by the caller (``plan``); a few-millisecond fade removes clicks at the very start and end;
``close`` drains everything before closing the stream. When the device does
not take 24 kHz, audio is converted with a streaming band-limited resampler (``resampler``, the
one module of the package this one imports: neither imports MLX).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import numpy as np

from .resampler import Resampler

DEFAULT_FADE_MS = 5.0
PLAN_MARGIN = 1.1  # below real time, buffer 10% more than the computed deficit
# Output latency asked of PortAudio. Its "high" default (35 ms on ALSA) glitched through
# PulseAudio's ALSA plugin when PulseAudio resampled; 0.1 s is safe and still imperceptible.
DEFAULT_LATENCY_S = 0.1
_DRAIN_SLACK_S = 2.0  # close() gives up waiting for the callback this long after it should be done


class PlayerError(RuntimeError):
    """No audio output is possible (PortAudio missing, no device, unsupported settings)."""


def _sounddevice():
    try:
        import sounddevice
    except ImportError:
        raise PlayerError(
            "cannot play audio: the sounddevice package is not installed (pip install sounddevice); "
            "or write to a file with --output"
        ) from None
    except OSError as e:  # sounddevice raises OSError when the PortAudio library is absent
        raise PlayerError(
            f"cannot play audio: the PortAudio library is missing ({e}); "
            "install it (macOS: brew install portaudio; Debian/Ubuntu: apt install libportaudio2) "
            "or write to a file with --output"
        ) from None
    return sounddevice


def start_lead(expected_seconds: float | None, real_time_factor: float, chunk_seconds: float) -> float:
    """Seconds of audio to buffer before starting, so that a steady producer never runs dry.

    A producer making ``real_time_factor`` audio seconds per wall second, in chunks of up to
    ``chunk_seconds``, started with B seconds buffered: a chunk covering audio [a, a + c) is ready
    at (a + c)/r and due at B/r + a, so B ≥ c + (1 − r)·a for every chunk. That is one chunk
    when r ≥ 1, and c + (1 − r)·(E − c) when r < 1 (E: the whole length; the deficit gets a 10%
    margin). With r < 1 and E unknown (None) no finite lead is enough: infinity (play from the end).
    """
    if real_time_factor >= 1.0:
        return chunk_seconds
    if expected_seconds is None:
        return math.inf
    deficit = (1.0 - max(real_time_factor, 0.0)) * max(expected_seconds - chunk_seconds, 0.0)
    return chunk_seconds + PLAN_MARGIN * deficit


def check_output_device(device=None) -> None:
    """Raise ``PlayerError`` unless audio can be played on ``device`` (None: the default output).

    Cheap (no stream is opened), so a command can check before its slow work starts.
    """
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
    except Exception as e:
        raise PlayerError(f"cannot list audio devices: {_first_line(e)}") from None
    if not any(d["max_output_channels"] > 0 for d in devices):
        raise PlayerError("no audio output device found; write to a file with --output instead")
    if device is None:
        return
    try:
        sd.query_devices(device, "output")
    except Exception as e:  # ValueError (no match, several, not an output), PortAudioError (index)
        raise PlayerError(f"no audio output device {device!r}: {_first_line(e)} (see --list-devices)") from None


def _first_line(error: BaseException) -> str:
    # sounddevice lists every candidate on further lines when a name matches several devices.
    return (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(":")


def list_output_devices() -> list[tuple[int, str, float]]:
    """(index, name, default sample rate) of every device that can play audio."""
    sd = _sounddevice()
    return [
        (i, d["name"], d["default_samplerate"])
        for i, d in enumerate(sd.query_devices())
        if d["max_output_channels"] > 0
    ]


def _ring_copy(src: np.ndarray, src_pos: int, dst: np.ndarray, dst_pos: int, n: int) -> None:
    """Copy n samples from ring ``src`` at absolute position src_pos into ring ``dst``."""
    while n > 0:
        s, d = src_pos % len(src), dst_pos % len(dst)
        k = min(n, len(src) - s, len(dst) - d)
        dst[d : d + k] = src[s : s + k]
        src_pos, dst_pos, n = src_pos + k, dst_pos + k, n - k


class AudioPlayer:
    """Play a stream of float32 mono chunks through the default (or a given) output device.

    Args:
        sample_rate: rate of the queued audio (24000 for Voxtral).
        device: sounddevice output device (index or name); None for the default.
        fade_ms: fade-in at the very start and fade-out at the very end.
        stream_factory: builds the output stream (tests inject a fake); defaults to
            ``sounddevice.OutputStream``. It is called with samplerate, channels, dtype, device,
            callback, blocksize and latency.
        blocksize: frames per callback (0: let PortAudio choose).
        latency: output latency in seconds asked of the device.
        device_rate: open the device at this rate (resampling to it) instead of choosing one.
        expected_seconds: rough length of the whole stream, if known: lets playback start before
            the end when the producer is slower than real time (see below).
        clock: wall-clock seconds for timing chunk arrivals (tests inject a simulated one).

    Raises:
        PlayerError: PortAudio is missing, there is no output device, or it cannot be opened.

    ``queue`` chunks as they come, ``finish`` when no more will come, then ``close`` (which
    drains); or use it as a context manager (an exception aborts).

    When playback starts: unless ``plan`` was called, the player measures the producer itself.
    The first chunk is timed but not counted (it carries the prompt's prefill); from the second
    on, the rate r is the audio queued since the first chunk per wall second since it, and c the
    longest chunk. Playback starts once the buffer holds ``start_lead(expected_seconds, r, c)``:
    one chunk when the producer is faster than real time (so with ``stream_generate``, at the
    second chunk), more when slower; when slower and ``expected_seconds`` is unknown, at
    ``finish`` (the only gap-free start without knowing the length). Attributes: ``underruns``
    counts the gaps where playback ran dry before ``finish`` (silence was played meanwhile);
    ``start_time`` and ``first_output_time`` are the ``time.perf_counter()`` at which the stream
    was started and at which the first queued sample was handed to the device; ``device_rate``
    is the rate the device was opened at.
    """

    def __init__(self, sample_rate: int, device=None, fade_ms: float = DEFAULT_FADE_MS,
                 stream_factory=None, blocksize: int = 0, device_rate: int | None = None,
                 latency: float = DEFAULT_LATENCY_S, expected_seconds: float | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.sample_rate = sample_rate
        self.device = device
        self.underruns = 0
        self.first_output_time: float | None = None
        self.start_time: float | None = None  # perf_counter() when the stream was started
        self._fade_in = int(sample_rate * fade_ms / 1000)  # samples at sample_rate
        self._faded = 0  # samples of the fade-in applied so far
        self._lock = threading.Lock()
        self._drained = threading.Event()
        self._read = 0  # total samples handed to the device (advanced by the callback only)
        self._write = 0  # total samples queued (advanced by the producer only)
        self._finished = self._started = self._closed = self._starving = False
        self._start_threshold: int | None = None  # samples to buffer before starting (plan)
        self._expected_seconds = expected_seconds
        self._clock = clock
        self._first_arrival: tuple[float, int] | None = None  # (clock, samples queued) at chunk 1
        self._longest_chunk = 0  # device samples, chunks after the first
        self._end_dac: float | None = None  # stream time at which the last sample is played
        if stream_factory is None:
            sd = _sounddevice()
            self.device_rate = device_rate or self._pick_rate(sd, device, sample_rate)
            stream_factory = sd.OutputStream
        else:
            self.device_rate = device_rate or sample_rate
        self._buf = np.zeros(self.device_rate * 4, np.float32)
        self._resample = Resampler(sample_rate, self.device_rate)
        try:
            self._stream = stream_factory(
                samplerate=self.device_rate, channels=1, dtype="float32", device=device,
                callback=self._callback, blocksize=blocksize, latency=latency,
            )
        except Exception as e:  # PortAudioError and ValueError name the device problem
            raise PlayerError(f"cannot open audio output device {device!r}: {e}") from None

    @staticmethod
    def _pick_rate(sd, device, rate: int) -> int:
        """The audio's own rate if the device takes it, else the device's default rate."""
        if device is None and not any(d["max_output_channels"] > 0 for d in sd.query_devices()):
            raise PlayerError("no audio output device found; write to a file with --output instead")
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
        """Set how much audio to buffer before starting, instead of measuring the producer.

        Args:
            expected_seconds: estimated length of the whole utterance.
            real_time_factor: measured audio seconds generated per wall second.
            chunk_seconds: audio per chunk after the first (the longest wait between chunks).

        The lead is ``start_lead(expected_seconds, real_time_factor, chunk_seconds)``. Call
        before queuing; a threshold longer than the utterance starts playback at ``finish``.
        """
        lead = start_lead(expected_seconds, real_time_factor, chunk_seconds)
        self._start_threshold = int(math.ceil(lead * self.device_rate))

    def queue(self, audio: np.ndarray) -> None:
        """Append a chunk (float32 mono at ``sample_rate``); starts playback when planned."""
        x = np.asarray(audio, np.float32).reshape(-1)
        if self._faded < self._fade_in and len(x):
            n = min(len(x), self._fade_in - self._faded)
            x = x.copy()
            x[:n] *= (np.arange(self._faded, self._faded + n, dtype=np.float32) / self._fade_in)
            self._faded += n
        x = self._resample(x)
        self._put(x)
        if not self._started and self._write - self._read >= max(self._threshold(len(x)), 1):
            self._start()

    def _threshold(self, chunk: int) -> float:
        """Samples to buffer before starting: planned, or from the arrivals measured so far."""
        if self._start_threshold is not None:
            return self._start_threshold
        now = self._clock()
        if self._first_arrival is None:
            if chunk:
                self._first_arrival = (now, self._write)
            return math.inf  # one chunk says nothing about the rate
        self._longest_chunk = max(self._longest_chunk, chunk)
        t0, queued0 = self._first_arrival
        produced = (self._write - queued0) / self.device_rate
        rate = produced / (now - t0) if now > t0 else math.inf
        lead = start_lead(self._expected_seconds, rate, self._longest_chunk / self.device_rate)
        return lead * self.device_rate

    def finish(self) -> None:
        """No more audio will come: fade out the tail and start playback if not yet started."""
        if self._finished:
            return
        self._put(self._resample.flush())
        fade = int(self.device_rate * self._fade_in / self.sample_rate)
        with self._lock:  # the tail is not played yet: fade what is left of it
            n = min(self._write - self._read, fade)
            if n:
                idx = np.arange(self._write - n, self._write) % len(self._buf)
                self._buf[idx] *= np.linspace(1.0, 0.0, n, dtype=np.float32)
            self._finished = True
            empty = self._write == self._read
        if not self._started and not empty:
            self._start()
        elif empty:
            self._drained.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until everything queued was handed to the device (after ``finish``)."""
        return self._drained.wait(timeout)

    def close(self, report: Callable[[float], None] | None = None, interval: float = 0.1) -> None:
        """Finish, drain (bounded by the buffered length plus slack), then close the stream.

        ``report(seconds_left)``, if given, is called about every ``interval`` seconds while the
        rest plays (for a "playing: 3.2 s left" display). An exception from ``report`` or a
        Ctrl-C while draining propagates; ``abort`` then stops the sound at once.
        """
        if self._closed:
            return
        self.finish()
        if self._started:
            if not self._drain(self.buffered_seconds + self.latency + _DRAIN_SLACK_S, report, interval):
                return self.abort()  # the device stopped calling back; do not hang
            time.sleep(self._device_tail(self.latency))  # let the device play its own buffer out
            self._stream.stop()
        self._closed = True
        self._stream.close()

    def _drain(self, timeout: float, report, interval: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if report is not None:
                report(self.seconds_left)
            left = deadline - time.monotonic()
            if self.wait(max(min(interval, left), 0.0)):
                return True
            if left <= interval:
                return False

    def abort(self) -> None:
        """Stop at once (Ctrl-C): close the stream without draining."""
        if self._closed:
            return
        self._finished = self._closed = True
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
    def latency(self) -> float:
        """The output latency the device reports, in seconds (0 if it reports none)."""
        return float(getattr(self._stream, "latency", 0.0) or 0.0)

    @property
    def buffered_seconds(self) -> float:
        """Audio queued but not yet handed to the device."""
        return (self._write - self._read) / self.device_rate

    @property
    def seconds_left(self) -> float:
        """Roughly how long until everything queued has been heard (buffer + device latency)."""
        return self.buffered_seconds + (self.latency if self._started else 0.0)

    # ---- internals ---------------------------------------------------------------------
    def _start(self):
        self.start_time = time.perf_counter()
        try:
            self._stream.start()
        except Exception as e:  # PortAudioError: the device went away or refused to start
            where = "the default device" if self.device is None else f"device {self.device!r}"
            raise PlayerError(f"cannot start audio output on {where}: {_first_line(e)}") from None
        self._started = True

    def _put(self, x: np.ndarray) -> None:
        if not len(x):
            return
        need = self._write - self._read + len(x)
        if need > len(self._buf):
            # Grow without holding the lock: the callback only reads [_read, _write) and moves
            # _read forward, so copying from the current _read on is always enough.
            new = np.zeros(max(need, 2 * len(self._buf)), np.float32)
            read = self._read
            _ring_copy(self._buf, read, new, read, self._write - read)
            with self._lock:
                self._buf = new
        _ring_copy(x, 0, self._buf, self._write, len(x))  # the callback never reads past _write
        with self._lock:
            self._write += len(x)

    def _device_tail(self, latency: float) -> float:
        """Seconds until the device has played the last sample handed to it."""
        now = getattr(self._stream, "time", None)
        if self._end_dac is not None and now:
            return min(max(self._end_dac - now, 0.0), latency + 0.5)
        return latency

    def _callback(self, outdata, frames, time_info, status):
        # The audio thread: no allocation, no blocking beyond the short lock, never raises.
        out = outdata[:, 0]
        with self._lock:
            pos = self._read % len(self._buf)
            n = min(frames, self._write - self._read, len(self._buf) - pos)
            out[:n] = self._buf[pos : pos + n]
            self._read += n
            if n < frames:  # wrapped around the ring end
                m = min(frames - n, self._write - self._read)
                out[n : n + m] = self._buf[:m]
                self._read += m
                n += m
            finished, empty = self._finished, self._write == self._read
        out[n:] = 0.0
        if n and self.first_output_time is None:
            self.first_output_time = time.perf_counter()
        if n < frames and not finished:
            if not self._starving:  # one underrun per gap, however many callbacks it lasts
                self.underruns += 1
            self._starving = True
        elif n:
            self._starving = False
        if finished and empty and not self._drained.is_set():
            dac = getattr(time_info, "outputBufferDacTime", 0.0)
            self._end_dac = dac + n / self.device_rate if dac else None
            self._drained.set()
