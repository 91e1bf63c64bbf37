"""AudioPlayer with fake output streams (no sound hardware), and its streaming resampler."""

from __future__ import annotations

import sys
import threading
import time
import types

import numpy as np
import pytest

from mlx_speech import player as player_module
from mlx_speech.player import AudioPlayer, PlayerError, check_output_device, list_output_devices
from mlx_speech.resampler import Resampler

SR = 24000


class FakeStream:
    """A PortAudio output stream whose callback runs when the test calls ``pump``."""

    def __init__(self, samplerate, channels, dtype, device, callback, blocksize, latency):
        assert (channels, dtype) == (1, "float32")
        self.samplerate, self.device, self.callback = samplerate, device, callback
        self.blocksize = blocksize or 256
        self.latency = 0.0
        self.blocks: list[np.ndarray] = []
        self.started = self.stopped = self.aborted = self.closed = False

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True

    def abort(self):
        self.aborted = True

    def close(self):
        self.closed = True

    def pump(self, n: int = 1) -> np.ndarray:
        """Run the callback n times like the audio thread; returns what they wrote."""
        assert self.started and not (self.stopped or self.aborted or self.closed)
        out = []
        for _ in range(n):
            block = np.full((self.blocksize, 1), np.nan, np.float32)  # the callback must fill all
            self.callback(block, self.blocksize, None, None)
            out.append(block[:, 0].copy())
        self.blocks += out
        return np.concatenate(out)

    @property
    def output(self) -> np.ndarray:
        return np.concatenate(self.blocks) if self.blocks else np.zeros(0, np.float32)


class ThreadedStream(FakeStream):
    """Calls the callback from its own thread once started, like PortAudio, as fast as it can."""

    def start(self):
        super().start()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not (self.stopped or self.aborted or self.closed):
            self.pump()
            time.sleep(0.0002)

    def stop(self):
        self.stopped = True
        self._thread.join(5)

    def abort(self):
        self.aborted = True
        self._thread.join(5)


def make_player(stream_cls=FakeStream, start_at_once=True, **kwargs):
    """A player on a fake stream. ``start_at_once``: an explicit plan with no lead, so playback
    starts with the first sample (the tests of ordering, underruns and ends need that); False
    leaves the player to plan from the arrivals it sees."""
    made = []

    def factory(**stream_kwargs):
        made.append(stream_cls(**stream_kwargs))
        return made[0]

    p = AudioPlayer(SR, stream_factory=factory, **{"fade_ms": 0.0, **kwargs})
    if start_at_once:
        p.plan(expected_seconds=0.0, real_time_factor=1.0, chunk_seconds=0.0)
    return p, made[0]


def random_chunks(seconds: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    audio = rng.uniform(-1, 1, int(seconds * SR)).astype(np.float32)
    return np.split(audio, np.sort(rng.integers(0, len(audio), 12)))


# ---- order, underruns, end ---------------------------------------------------------------


def test_everything_queued_comes_out_in_order_across_ring_growth():
    p, stream = make_player()
    chunks = random_chunks(9.0)  # more than the initial 4 s ring: it grows while playing
    p.queue(chunks[0])
    stream.pump(3)
    for chunk in chunks[1:]:
        p.queue(chunk)
        stream.pump(2)
    p.finish()
    while not p.wait(0):
        stream.pump()
    expected = np.concatenate(chunks)
    np.testing.assert_array_equal(stream.output[: len(expected)], expected)
    assert not np.any(stream.output[len(expected) :])


def test_concurrent_callback_thread_receives_every_sample_in_order():
    p, stream = make_player(ThreadedStream)
    chunks = random_chunks(12.0, seed=1)
    for chunk in chunks:  # the callback thread reads while the ring grows and wraps
        p.queue(chunk)
    p.close()
    expected = np.concatenate(chunks)
    out = stream.output
    first = int(np.flatnonzero(out)[0])  # underruns before data are possible; gaps after are not
    np.testing.assert_array_equal(out[first : first + len(expected)], expected)
    assert stream.stopped and stream.closed


def test_underrun_plays_silence_is_counted_once_per_gap_and_the_stream_keeps_running():
    p, stream = make_player(blocksize=256)
    p.queue(np.ones(100, np.float32))
    out = stream.pump(3)  # 100 samples, then silence for the rest of three callbacks
    np.testing.assert_array_equal(out, np.r_[np.ones(100), np.zeros(668)])
    assert p.underruns == 1
    assert not (stream.stopped or stream.aborted)
    p.queue(np.full(300, 2.0, np.float32))  # generation catches up: playback resumes
    np.testing.assert_array_equal(stream.pump(1), np.full(256, 2.0))
    stream.pump(1)  # 44 samples, then dry again: a second gap
    assert p.underruns == 2


def test_no_underrun_is_counted_at_the_normal_end():
    p, stream = make_player(blocksize=256)
    p.queue(np.ones(1000, np.float32))
    p.finish()
    out = stream.pump(6)  # the last block is partial, then silence after the end
    assert p.underruns == 0
    assert p.wait(0)
    np.testing.assert_array_equal(out, np.r_[np.ones(1000), np.zeros(6 * 256 - 1000)])


def test_first_output_time_is_when_audio_reaches_the_callback():
    p, stream = make_player()
    p.queue(np.ones(1000, np.float32))
    assert p.first_output_time is None and p.start_time is not None
    t = time.perf_counter()
    stream.pump()
    assert t <= p.first_output_time <= time.perf_counter()


# ---- when playback starts ----------------------------------------------------------------


def chunk_that_starts(p, stream, chunk_seconds: list[float]) -> int | None:
    for i, s in enumerate(chunk_seconds):
        p.queue(np.ones(round(s * SR), np.float32))
        if stream.started:
            return i
    return None


def first_chunk_then(c: float, total: float, first: float = 0.08) -> list[float]:
    return [first] + [c] * int(round((total - first) / c))


@pytest.mark.parametrize("rtf", [1.0, 1.5, 4.0])
def test_faster_than_real_time_starts_after_one_full_chunk(rtf):
    p, stream = make_player()
    p.plan(expected_seconds=8.08, real_time_factor=rtf, chunk_seconds=0.8)
    # A 1-frame first chunk is not enough: at r < 10 its 80 ms would run out before the next
    # 0.8 s chunk exists; one full chunk covers the wait at any r ≥ 1.
    assert chunk_that_starts(p, stream, first_chunk_then(0.8, 8.08)) == 1


def test_slower_than_real_time_buffers_the_deficit():
    p, stream = make_player()
    p.plan(expected_seconds=8.08, real_time_factor=0.5, chunk_seconds=0.8)
    # lead = 0.8 + 1.1 · (1 − 0.5) · (8.08 − 0.8) = 4.80 s: after 0.08 + 6 · 0.8 = 4.88 s
    assert chunk_that_starts(p, stream, first_chunk_then(0.8, 8.08)) == 6


def test_lead_longer_than_the_utterance_starts_at_finish():
    p, stream = make_player()
    p.plan(expected_seconds=8.0, real_time_factor=0.1, chunk_seconds=0.8)
    assert chunk_that_starts(p, stream, first_chunk_then(0.8, 4.08)) is None
    p.finish()
    assert stream.started


@pytest.mark.parametrize("rtf", [0.3, 0.6, 0.9, 1.0, 1.2, 2.0, 6.0])
def test_planned_start_never_runs_dry_and_is_not_needlessly_late(rtf):
    """Simulate steady generation at ``rtf``: the chunk ending at audio time b exists at wall time
    b / rtf. Starting where the player starts, every chunk must exist before it is due."""
    seconds = first_chunk_then(0.8, 12.08)
    ends = np.cumsum(seconds)
    starts = ends - np.asarray(seconds)  # audio time at which each chunk begins

    def safe(k: int) -> bool:  # playback starting once chunk k exists never waits for a chunk
        return bool(np.all(ends / rtf <= ends[k] / rtf + starts + 1e-9))

    p, stream = make_player()
    p.plan(expected_seconds=ends[-1], real_time_factor=rtf, chunk_seconds=0.8)
    k = chunk_that_starts(p, stream, seconds)
    k = len(seconds) - 1 if k is None else k
    assert safe(k), f"starting after chunk {k} runs dry"
    earliest = next(j for j in range(len(seconds)) if safe(j))
    # Late only by the 10% margin on the deficit, plus the chunk that crosses it.
    assert ends[k] <= ends[earliest] + 0.1 * (1 - min(rtf, 1)) * ends[-1] + 0.8 + 1e-9


# ---- planning from the arrivals it sees (no plan() call) -------------------------------------


def simulate(p, stream, rtf: float, seconds: list[float], now: list[float], prefill: float = 0.5):
    """Drive ``p`` in simulated time: a steady producer at ``rtf`` (the chunk ending at audio time
    b is ready at prefill + b / rtf) and a device pulling one block per block duration. Returns
    the simulated time at which playback started and the chunk count queued by then."""
    sizes = [round(s * SR) for s in seconds]
    ready = prefill + np.cumsum(sizes) / SR / rtf
    tick = stream.blocksize / SR
    queued, start, step = 0, None, 0
    while not p.wait(0):
        now[0] = step * tick
        while queued < len(sizes) and ready[queued] <= now[0]:
            p.queue(np.ones(sizes[queued], np.float32))
            queued += 1
            if queued == len(sizes):
                p.finish()
        if stream.started:
            if start is None:
                start = (now[0], queued)
            stream.pump()
        step += 1
        assert step < 10**6, "the simulation does not end"
    return start


def auto_player(**kwargs):
    now = [0.0]
    p, stream = make_player(start_at_once=False, blocksize=240, clock=lambda: now[0], **kwargs)
    return p, stream, now


@pytest.mark.parametrize("rtf", [1.2, 2.0, 6.0])
def test_without_plan_a_faster_producer_plays_gap_free_from_the_second_chunk(rtf):
    p, stream, now = auto_player()
    seconds = first_chunk_then(0.8, 8.08)
    (_, queued) = simulate(p, stream, rtf, seconds, now)
    assert p.underruns == 0
    assert queued == 2  # one regular chunk of lead, as plan() gives the CLI
    expected = np.ones(round(sum(seconds) * SR))
    out = stream.output
    np.testing.assert_array_equal(out[: len(expected)], expected)  # no silence inside: no gap


@pytest.mark.parametrize("rtf", [0.3, 0.6, 0.9])
def test_without_plan_a_slower_producer_plays_gap_free(rtf):
    seconds = first_chunk_then(0.8, 8.08)
    # Length unknown: gap-free only by starting at the end.
    p, stream, now = auto_player()
    start, queued = simulate(p, stream, rtf, seconds, now)
    assert p.underruns == 0 and queued == len(seconds)
    # Length known (roughly, as the CLI estimates it): starts early, still without a gap.
    p, stream, now = auto_player(expected_seconds=sum(seconds))
    start, queued = simulate(p, stream, rtf, seconds, now)
    assert p.underruns == 0
    assert queued < len(seconds), "playback could have started before the end"
    np.testing.assert_array_equal(stream.output[: round(sum(seconds) * SR)], 1.0)


def test_starting_at_the_first_chunk_underruns_in_the_same_simulation():
    # What the player did before it planned by itself (and callers that never called plan got):
    # the 80 ms first chunk runs out before the next 0.8 s chunk exists. Shows the simulation
    # above can see a gap.
    p, stream, now = auto_player()
    p.plan(expected_seconds=0.0, real_time_factor=1.0, chunk_seconds=0.0)
    simulate(p, stream, 1.5, first_chunk_then(0.8, 8.08), now)
    assert p.underruns == 1


def test_close_reports_the_time_left_while_the_rest_plays():
    p, stream = make_player(ThreadedStream)
    p.queue(np.ones(SR // 2, np.float32))
    left: list[float] = []
    p.close(report=left.append, interval=0.001)
    assert stream.stopped and left and left[0] <= 0.5
    assert all(a >= b for a, b in zip(left, left[1:]))  # counts down


# ---- fades -------------------------------------------------------------------------------


def test_fade_in_spans_chunks_and_fade_out_ends_at_zero():
    p, stream = make_player(fade_ms=5.0)  # 120 samples at 24 kHz
    p.queue(np.ones(50, np.float32))  # shorter than the fade: the fade continues in the next chunk
    p.queue(np.ones(950, np.float32))
    p.finish()
    while not p.wait(0):
        stream.pump()
    out = stream.output[:1000]
    np.testing.assert_allclose(out[:120], np.arange(120) / 120, atol=1e-7)
    np.testing.assert_array_equal(out[120:880], 1.0)
    np.testing.assert_allclose(out[880:], np.linspace(1, 0, 120), atol=1e-7)


# ---- resampling --------------------------------------------------------------------------


@pytest.mark.parametrize("rate_out", [44100, 48000, 22050, 16000])
def test_resampler_is_chunk_invariant(rate_out):
    x = np.concatenate(random_chunks(1.0, seed=2))
    one = Resampler(SR, rate_out)
    whole = np.concatenate([one(x), one.flush()])
    parts = Resampler(SR, rate_out)
    pieces = np.split(x, np.sort(np.random.default_rng(3).integers(0, len(x), 40)))
    chunked = np.concatenate([parts(c) for c in pieces] + [parts.flush()])
    assert len(whole) == -(-len(x) * rate_out // SR)  # ceil(n · out / in)
    np.testing.assert_array_equal(chunked, whole)


@pytest.mark.parametrize("rate_out", [44100, 48000, 16000])
@pytest.mark.parametrize("band_fraction", [0.05, 0.4, 0.8])
def test_resampler_reproduces_a_sine_at_the_new_rate(rate_out, band_fraction):
    freq = band_fraction * min(SR, rate_out) / 2  # up to 80% of the lower Nyquist frequency
    t = np.arange(SR) / SR
    r = Resampler(SR, rate_out)
    y = np.concatenate([r(np.sin(2 * np.pi * freq * t).astype(np.float32)), r.flush()])
    exact = np.sin(2 * np.pi * freq * np.arange(len(y)) / rate_out)  # the sine's true values
    inner = slice(rate_out // 100, -rate_out // 100)  # away from the start and end edges
    assert np.abs(y[inner] - exact[inner]).max() < 2e-4


def test_resampler_beats_linear_interpolation_near_the_top_of_the_band():
    freq, rate_out = 9000.0, 44100
    x = np.sin(2 * np.pi * freq * np.arange(SR) / SR)
    r = Resampler(SR, rate_out)
    y = np.concatenate([r(x.astype(np.float32)), r.flush()])
    t_out = np.arange(len(y)) / rate_out
    exact = np.sin(2 * np.pi * freq * t_out)
    linear = np.interp(t_out, np.arange(SR) / SR, x)  # an independent computation
    inner = slice(441, -441)
    assert np.abs(y[inner] - exact[inner]).max() < 1e-3
    assert np.abs(linear[inner] - exact[inner]).max() > 0.3  # what a linear resampler would do


def test_player_resamples_to_the_device_rate():
    p, stream = make_player(device_rate=48000)
    assert stream.samplerate == 48000 and p.device_rate == 48000
    x = np.concatenate(random_chunks(0.5, seed=4))
    for c in np.array_split(x, 7):
        p.queue(c)
    p.finish()
    while not p.wait(0):
        stream.pump()
    r = Resampler(SR, 48000)
    expected = np.concatenate([r(x), r.flush()])
    assert len(expected) == 2 * len(x)
    np.testing.assert_array_equal(stream.output[: len(expected)], expected)


# ---- close, abort, errors ----------------------------------------------------------------


def test_close_drains_everything_then_stops():
    p, stream = make_player(ThreadedStream)
    x = np.concatenate(random_chunks(0.5, seed=5))
    p.queue(x)
    p.close()
    assert stream.stopped and stream.closed and not stream.aborted
    np.testing.assert_array_equal(stream.output[np.flatnonzero(stream.output)[0] :][: len(x)], x)
    assert p.buffered_seconds == 0


def test_close_does_not_hang_when_the_device_stops_calling_back(monkeypatch):
    monkeypatch.setattr(player_module, "_DRAIN_SLACK_S", 0.05)
    p, stream = make_player()  # started, but nobody pumps
    p.queue(np.ones(240, np.float32))
    t = time.perf_counter()
    p.close()
    assert time.perf_counter() - t < 1.0
    assert stream.aborted and stream.closed


def test_abort_stops_at_once():
    p, stream = make_player(ThreadedStream)
    p.queue(np.ones(SR * 60, np.float32))  # a minute of audio
    t = time.perf_counter()
    p.abort()
    assert time.perf_counter() - t < 1.0
    assert stream.aborted and stream.closed and not stream.stopped
    assert p.wait(0)
    p.close()  # harmless after abort


def test_context_manager_aborts_on_error():
    with pytest.raises(KeyboardInterrupt):
        with make_player(ThreadedStream)[0] as p:
            p.queue(np.ones(SR * 60, np.float32))
            raise KeyboardInterrupt
    assert p._stream.aborted


def test_a_stream_that_fails_to_start_is_a_player_error():
    class Unavailable(FakeStream):
        def start(self):
            raise RuntimeError("Error starting stream: Device unavailable")

    p, stream = make_player(Unavailable)
    with pytest.raises(PlayerError, match="cannot start audio output on the default device: Error starting stream"):
        p.queue(np.ones(10, np.float32))
    p.abort()  # not started: only closes
    assert stream.closed and not stream.aborted


def test_factory_failure_is_a_player_error():
    def factory(**kwargs):
        raise ValueError("No output device matching 'nope'")

    with pytest.raises(PlayerError, match="cannot open audio output device 'nope'.*No output device"):
        AudioPlayer(SR, device="nope", stream_factory=factory)


class _Refuse:
    """Import hook that makes ``import sounddevice`` fail with ``error``."""

    def __init__(self, error):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name == "sounddevice":
            raise self.error
        return None


@pytest.mark.parametrize(
    "error, message",
    [(OSError("PortAudio library not found"), "PortAudio library is missing"),
     (ImportError("No module named 'sounddevice'"), "sounddevice package is not installed")],
)  # fmt: skip
def test_missing_portaudio_is_a_player_error(monkeypatch, error, message):
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Refuse(error), *sys.meta_path])
    with pytest.raises(PlayerError, match=message):
        AudioPlayer(SR)
    with pytest.raises(PlayerError, match=message):
        list_output_devices()


def fake_sounddevice(devices, supports_24k=True):
    def check_output_settings(device=None, samplerate=None, **kwargs):
        if not supports_24k and samplerate == SR:
            raise ValueError("Invalid sample rate")

    def query_devices(device=None, kind=None):
        if kind is None:
            return devices
        outputs = [d for d in devices if d["max_output_channels"] > 0]
        if not outputs:
            raise ValueError("Error querying device -1")
        return outputs[0]

    return types.SimpleNamespace(
        check_output_settings=check_output_settings, query_devices=query_devices, OutputStream=FakeStream
    )


SPEAKERS = {"name": "Speakers", "max_output_channels": 2, "default_samplerate": 44100.0}
MIC = {"name": "Mic", "max_output_channels": 0, "default_samplerate": 48000.0}


def test_no_output_device_is_a_clear_player_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice([MIC]))
    with pytest.raises(PlayerError, match="no audio output device found"):
        AudioPlayer(SR)
    assert list_output_devices() == []


def test_device_without_24k_is_opened_at_its_own_rate(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice([MIC, SPEAKERS], supports_24k=False))
    p = AudioPlayer(SR)
    assert p.device_rate == 44100 and p._stream.samplerate == 44100
    assert list_output_devices() == [(1, "Speakers", 44100.0)]
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice([SPEAKERS]))
    assert AudioPlayer(SR).device_rate == SR  # taken as is when the device supports it


def test_check_output_device_is_one_line_per_problem(monkeypatch):
    def query_devices(device=None, kind=None):
        if device is None and kind is None:
            return [MIC, SPEAKERS]
        if device == "Multi":  # sounddevice lists the candidates on further lines
            raise ValueError("Multiple output devices found for 'Multi':\n[1] Multi A\n[2] Multi B")
        if device == 0:
            raise ValueError("Not an output device: 'Mic'")
        return SPEAKERS

    monkeypatch.setitem(sys.modules, "sounddevice", types.SimpleNamespace(query_devices=query_devices))
    check_output_device()
    check_output_device("Speakers")
    with pytest.raises(PlayerError) as e:
        check_output_device("Multi")
    assert str(e.value) == ("no audio output device 'Multi': Multiple output devices found for 'Multi' "
                            "(see --list-devices)")
    with pytest.raises(PlayerError, match="^no audio output device 0: Not an output device: 'Mic'"):
        check_output_device(0)
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice([MIC]))
    with pytest.raises(PlayerError, match="no audio output device found"):
        check_output_device()
