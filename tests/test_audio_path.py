"""The real audio path, as a person would hear it: model → AudioPlayer → PortAudio → ALSA →
PulseAudio null sink, recorded back from the sink's monitor with parec.

Each test starts its own PulseAudio server in a private runtime folder under tmp_path (nothing
outside it is touched), streams a clip from the golden tiny model into the player while it is
generated, records what the sink received, and checks: the recording holds the whole generated
waveform (aligned by cross-correlation, compared below 10 kHz at unit gain), no underrun was
reported, playback started at the planned chunk, and its first sample reached the device within
one device buffer of that. Two paths: the player opens the device at 24 kHz and PulseAudio
resamples to the 48 kHz sink, or the player opens it at 48 kHz and resamples itself. Skipped, with the reason, where pulseaudio, parec or the PortAudio library are not installed
(`.ci/run` installs them: pulseaudio pulseaudio-utils libportaudio2 libasound2-plugins).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mlx_speech import stream_generate
from mlx_speech.generation import DEFAULT_CHUNK_FRAMES
from mlx_speech.player import AudioPlayer

SINK_RATE = 48000  # like most hardware: 24 kHz audio is resampled on its way to the sink
TEXT, VOICE, SEED, FRAMES = "Hello world, this is a test.", "casual_male", 1, 40
# The tiny random model's noise-like output peaks at 3.4 (real speech stays under 1); it is
# played at this known gain so that no stage of the path has to clip it.
GAIN = 0.25
BAND_HZ = 10000  # compared below 10 kHz: above it lies the transition band of any resampler
START_SLACK_S = 0.1  # thread wake-up and stream start on a loaded 2-core CI machine


def _require_tools():
    missing = [tool for tool in ("pulseaudio", "parec", "pactl") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian: apt install pulseaudio pulseaudio-utils)")


def _sounddevice():
    try:
        import sounddevice
    except OSError as e:
        pytest.skip(f"PortAudio library not installed ({e}; Debian: apt install libportaudio2)")
    return sounddevice


def _wait_for(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            detail = f"\n{log.read_text()[-2000:]}" if log is not None and log.exists() else ""
            pytest.fail(f"timed out after {timeout} s waiting for {what}{detail}")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def pulse(tmp_path, monkeypatch):
    """A private PulseAudio server whose default sink is a null sink at SINK_RATE."""
    _require_tools()
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    socket, log = tmp_path / "native", tmp_path / "pulse.log"
    client_env = {  # the in-process PortAudio → ALSA → libpulse client reads these too
        "PULSE_SERVER": f"unix:{socket}",
        "PULSE_COOKIE": str(tmp_path / "cookie"),
        "XDG_RUNTIME_DIR": str(runtime),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    for key, value in client_env.items():  # before PortAudio first looks for devices
        monkeypatch.setenv(key, value)
    sd = _sounddevice()
    env = {**os.environ, "HOME": str(tmp_path), "PULSE_RUNTIME_PATH": str(runtime / "pulse")}
    server = subprocess.Popen(
        [
            "pulseaudio", "--daemonize=no", "-n", "--system=false", "--exit-idle-time=-1",
            "--use-pid-file=no", "--log-target=stderr",
            # A near-ideal, linear-phase resampler, so that the comparison tests our path and not
            # PulseAudio's defaults: speex-float-1 drops ~5% of this flat-spectrum clip's energy
            # near 12 kHz, and soxr's phase response leaves a 4% residual below 10 kHz.
            "--resample-method=speex-float-10",
            f"--load=module-native-protocol-unix auth-anonymous=1 socket={socket}",
            f"--load=module-null-sink sink_name=vsink rate={SINK_RATE} channels=1 format=float32le",
        ],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=(log_file := log.open("w")),
    )  # fmt: skip
    try:
        _wait_for(lambda: socket.exists() or server.poll() is not None, 10, "the PulseAudio socket", log)
        if server.poll() is not None:
            pytest.fail(f"pulseaudio exited with {server.returncode}:\n{log.read_text()[-2000:]}")
        subprocess.run(["pactl", "set-default-sink", "vsink"], env=env, check=True, timeout=10,
                       capture_output=True)
        sd._terminate()  # PortAudio lists devices once; list them again now that the server runs
        sd._initialize()
        names = [d["name"] for d in sd.query_devices() if d["max_output_channels"] > 0]
        if "pulse" not in names:
            pytest.fail(f"no 'pulse' output device (ALSA PulseAudio plugin missing?); devices: {names}")
        yield SimpleNamespace(env=env, dir=tmp_path, log=log)
    finally:
        _stop(server)
        log_file.close()
        with contextlib.suppress(Exception):
            sd._terminate()
            sd._initialize()


@contextlib.contextmanager
def _record(pulse):
    """Record the null sink's monitor into a raw float32 file; yields a function reading it."""
    path = pulse.dir / "recording.f32"
    with path.open("wb") as out:
        parec = subprocess.Popen(
            ["parec", "--raw", "-d", "vsink.monitor", f"--rate={SINK_RATE}", "--channels=1",
             "--format=float32le", "--latency-msec=10"],
            env=pulse.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            # The null sink renders its first 2 s block before any client connects, so the
            # monitor delivers nothing for up to 2 s; play only once samples flow, or the first
            # ~50 ms of the clip can be lost.
            _wait_for(lambda: path.stat().st_size > 0 or parec.poll() is not None, 5,
                      "the null sink's monitor to deliver samples", pulse.log)
            if parec.poll() is not None:
                pytest.fail(f"parec exited with {parec.returncode}: {parec.stderr.read().decode()}")
            yield lambda: np.fromfile(path, np.float32)
        finally:
            time.sleep(0.3)  # the last samples pass the monitor's 10 ms fragments
            _stop(parec)


def _band_limited_upsample(x: np.ndarray, factor: int) -> np.ndarray:
    """Ideal (FFT) interpolation by an integer factor: independent of the player's resampler."""
    spectrum = np.fft.rfft(x.astype(np.float64))
    padded = np.zeros(len(x) * factor // 2 + 1, complex)
    padded[: len(spectrum)] = spectrum
    return np.fft.irfft(padded, len(x) * factor) * factor


def _align(recording: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, float]:
    """The part of ``recording`` that lines up with ``reference`` (sub-sample, by
    cross-correlation of the band-limited signals), with ``reference`` shifted to match."""
    n = 1 << int(np.ceil(np.log2(len(recording) + len(reference))))
    xc = np.fft.irfft(np.fft.rfft(recording, n) * np.conj(np.fft.rfft(reference, n)), n)
    lag = int(np.argmax(xc))
    lag = lag - n if lag > n // 2 else lag
    assert 0 <= lag and lag + len(reference) <= len(recording), (
        f"the recording ({len(recording)} samples) does not hold the whole clip "
        f"({len(reference)} samples at lag {lag}): its start or end was lost"
    )
    a, b, c = xc[(lag - 1) % n], xc[lag % n], xc[(lag + 1) % n]
    frac = 0.5 * (a - c) / (a - 2 * b + c)  # parabolic peak: sub-sample delay
    freqs = np.fft.rfftfreq(len(reference))
    shifted = np.fft.irfft(np.fft.rfft(reference) * np.exp(-2j * np.pi * freqs * frac), len(reference))
    return recording[lag : lag + len(reference)], shifted


def _low_pass(x: np.ndarray, rate: int, cutoff_hz: float, taps: int = 511) -> np.ndarray:
    """Linear-phase FIR low-pass (Kaiser-windowed sinc), the same filter for both signals."""
    t = np.arange(taps) - taps // 2
    fc = 2 * cutoff_hz / rate
    h = fc * np.sinc(fc * t) * np.kaiser(taps, 10.0)
    return np.convolve(x, h / h.sum(), mode="same")


@pytest.mark.parametrize(
    "device_rate",
    [None, SINK_RATE],
    ids=["player-picks-rate (24 kHz, PulseAudio resamples)", "device-at-48kHz (player resamples)"],
)
def test_streamed_speech_reaches_the_sink_intact(model, pulse, device_rate):
    chunks, queue_times = [], []  # (start, end) perf_counter of each queue() call
    with _record(pulse) as read_recording:
        player = AudioPlayer(model.config.sample_rate, device="pulse", device_rate=device_rate)
        try:
            for r in stream_generate(model, TEXT, VOICE, seed=SEED, max_frames=FRAMES):
                if not chunks:  # as the CLI does: plan from the first chunk's measured speed
                    first_rtf = r.real_time_factor
                    player.plan(expected_seconds=FRAMES * 0.08, real_time_factor=first_rtf,
                                chunk_seconds=DEFAULT_CHUNK_FRAMES * 0.08)
                chunks.append(r.audio * GAIN)
                t0 = time.perf_counter()
                player.queue(chunks[-1])
                queue_times.append((t0, time.perf_counter()))
            queue_times.append((time.perf_counter(), None))  # close(): starts playback if not yet
            player.close()
            queue_times[-1] = (queue_times[-1][0], time.perf_counter())
        except BaseException:
            player.abort()
            raise
        recording = read_recording().astype(np.float64)

    clip = np.concatenate(chunks)
    assert np.abs(clip).max() < 1.0, "the clip would clip in the sink; lower GAIN"
    assert player.underruns == 0, f"{player.underruns} underruns while streaming"

    # Playback started at the queue() call that crossed the planned lead: one 10-frame chunk,
    # plus (1 − r)·(rest of the clip)·1.1 when the first chunk's speed r was below real time
    # (it includes the prefill). The first sample was handed to the device within one device
    # buffer (≤ the stream latency) plus START_SLACK_S after that call.
    chunk_s = DEFAULT_CHUNK_FRAMES * 0.08
    lead_s = chunk_s + 1.1 * max(0.0, 1 - first_rtf) * (FRAMES * 0.08 - chunk_s)
    ratio = player.device_rate / model.config.sample_rate
    buffered = np.cumsum([len(c) for c in chunks]) * ratio - 33 * ratio  # 33: resampler look-ahead
    starter = int(np.searchsorted(buffered, lead_s * player.device_rate))  # len(chunks): in close()
    t_first_queue, (t_begin, t_end) = queue_times[0][0], queue_times[starter]
    assert t_begin <= player.start_time <= t_end, (
        f"playback started {player.start_time - t_first_queue:.3f} s after the first chunk, not at "
        f"chunk {starter} ({t_begin - t_first_queue:.3f}–{t_end - t_first_queue:.3f} s) planned for a "
        f"{lead_s:.2f} s lead"
    )
    latency = player.latency
    delay = player.first_output_time - t_first_queue
    bound = (t_end - t_first_queue) + latency + START_SLACK_S
    assert 0 < delay <= bound, (
        f"first sample reached the device {delay:.3f} s after the first chunk (bound {bound:.3f} s)"
    )

    # The recording holds the whole clip (aligned by cross-correlation) at unit gain.
    reference = _band_limited_upsample(clip, SINK_RATE // model.config.sample_rate)
    recorded, reference = _align(
        _low_pass(recording, SINK_RATE, BAND_HZ), _low_pass(reference, SINK_RATE, BAND_HZ)
    )
    edge = int(0.01 * SINK_RATE)  # the player's 5 ms fades at the very start and end
    recorded, reference = recorded[edge:-edge], reference[edge:-edge]
    corr = np.dot(recorded, reference) / np.sqrt(np.dot(recorded, recorded) * np.dot(reference, reference))
    gain = np.dot(recorded, reference) / np.dot(reference, reference)
    residual = np.sqrt(np.mean((recorded - reference) ** 2) / np.mean(reference**2))
    print(f"device {player.device_rate} Hz: correlation {corr:.7f}, gain {gain:.5f}, "
          f"residual {residual:.1e}; playback started {(player.start_time - t_first_queue) * 1e3:.0f} ms after the first chunk, first "
          f"sample handed over {(player.first_output_time - player.start_time) * 1e3:.1f} ms later")
    # Observed: correlation 1.0000000, gain 1.0000, residual 2e-6 to 2e-4.
    assert corr > 0.9999, f"recording does not match the generated waveform: correlation {corr:.6f}"
    assert abs(gain - 1) < 0.005, f"recording gain {gain:.4f}, expected 1"
    assert residual < 0.01, f"residual {residual:.4f} of the reference's RMS"
