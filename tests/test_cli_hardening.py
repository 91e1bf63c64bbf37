"""``python -m mlx_speech.generate`` under mistakes, signals, broken streams and full disks.

Real subprocesses on the tiny model. Playback runs through a stand-in ``sounddevice`` module put
first on the child's PYTHONPATH: its output stream calls the player back from a thread at a
chosen pace and records what it was handed, so the player path is tested on a machine with no
PortAudio (this one) as on one with it; a second stand-in fails to import as sounddevice does
when the PortAudio library is missing.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import resource
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO

from mlx_speech import cli_progress
from mlx_speech.cli_progress import BestEffortStream, plural, wrap

TEXT = "Hello world, this is a test."
SPF = 1920  # samples per 80 ms frame
MLX_IMPORT = re.compile(r"^import time:.*\|\s*(mlx|mlx_lm)(\.|$)", re.M)

FAKE_SOUNDDEVICE = textwrap.dedent('''
    """Stand-in for sounddevice: devices from $FAKE_SD_DEVICES; a stream that calls back from a
    thread, $FAKE_SD_SPEED times real time, appending what it was handed to $FAKE_SD_RECORD
    (or refuses to start with $FAKE_SD_START_FAILS)."""
    import json, os, threading, time, types
    import numpy as np

    if os.environ.get("FAKE_SD_MISSING"):
        raise OSError("PortAudio library not found")

    class PortAudioError(Exception):
        pass

    DEVICES = json.loads(os.environ["FAKE_SD_DEVICES"])
    SPEED = float(os.environ.get("FAKE_SD_SPEED", "1"))
    RECORD = os.environ.get("FAKE_SD_RECORD")

    def query_devices(device=None, kind=None):
        if device is None and kind is None:
            return [dict(d) for d in DEVICES]
        outputs = [i for i, d in enumerate(DEVICES) if d["max_output_channels"] > 0]
        if device is None:
            if not outputs:
                raise PortAudioError("Error querying device -1")
            i = outputs[0]
        elif isinstance(device, int):
            if not 0 <= device < len(DEVICES):
                raise PortAudioError(f"Error querying device {device}")
            i = device
        else:
            pool = outputs if kind == "output" else range(len(DEVICES))
            found = [j for j in pool if device.lower() in DEVICES[j]["name"].lower()]
            if not found:
                raise ValueError(f"No {kind or 'input/output'} device matching {device!r}")
            i = found[0]
        if kind and DEVICES[i][f"max_{kind}_channels"] < 1:
            raise ValueError(f"Not an {kind} device: {DEVICES[i]['name']!r}")
        return dict(DEVICES[i], index=i)

    def check_output_settings(device=None, samplerate=None, **kwargs):
        query_devices(device, "output")

    class OutputStream:
        def __init__(self, samplerate, channels, dtype, device, callback, blocksize, latency):
            self.samplerate, self.callback, self.blocksize = samplerate, callback, blocksize or 480
            self.latency = 0.02
            self._stop, self._thread, self._t0 = threading.Event(), None, time.monotonic()

        @property
        def time(self):
            return time.monotonic() - self._t0

        def start(self):
            if os.environ.get("FAKE_SD_START_FAILS"):
                raise PortAudioError("Error starting stream: Device unavailable [PaErrorCode -9985]")
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

        def _run(self):
            period, due = self.blocksize / self.samplerate / SPEED, time.monotonic()
            record = open(RECORD, "ab") if RECORD else None
            while not self._stop.is_set():
                out = np.zeros((self.blocksize, 1), np.float32)
                info = types.SimpleNamespace(outputBufferDacTime=self.time + self.latency)
                self.callback(out, self.blocksize, info, None)
                if record:
                    record.write(out.tobytes())
                    record.flush()
                due += period
                self._stop.wait(max(due - time.monotonic(), 0.0))

        def stop(self):
            self._stop.set()
            if self._thread is not None:
                self._thread.join(5)

        abort = stop

        def close(self):
            self.stop()
''')

SPEAKERS = {"name": "Speakers", "max_output_channels": 2, "max_input_channels": 0, "default_samplerate": 24000.0}
MIC = {"name": "Mic", "max_output_channels": 0, "max_input_channels": 1, "default_samplerate": 48000.0}


@pytest.fixture
def fake_sd(tmp_path):
    """Environment for a child whose ``import sounddevice`` is the stand-in (Mic, Speakers)."""
    folder = tmp_path / "fake_sd"
    folder.mkdir()
    (folder / "sounddevice.py").write_text(FAKE_SOUNDDEVICE)
    path = os.pathsep.join(p for p in (str(folder), str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "FAKE_SD_DEVICES": json.dumps([MIC, SPEAKERS]),
            "FAKE_SD_RECORD": str(tmp_path / "played.f32")}


def cli(*args, env=None, stdin=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "mlx_speech.generate", *map(str, args)], input=stdin,
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300, **kwargs)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("import time:")]


def start(*args, env=None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlx_speech.generate", *map(str, args)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for_line(p: subprocess.Popen, prefix: str) -> list[str]:
    lines = []
    while not (lines and lines[-1].startswith(prefix)):
        line = p.stderr.readline()
        assert line, f"the command ended before {prefix!r}: {''.join(lines)}"
        lines.append(line)
    return lines


# ---- answers before the model loads ----------------------------------------------------------


def test_help_imports_no_mlx():
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "mlx_speech.generate", "--help"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0 and "--max-frames" in r.stdout
    assert not MLX_IMPORT.search(r.stderr), MLX_IMPORT.findall(r.stderr)


MISSING_MODEL = "/nonexistent/model-folder"  # never looked at: every check below comes first


@pytest.mark.parametrize(
    "args, message",
    [
        (("--seed", -1), "--seed must be an integer from 0 to 18446744073709551615, got -1"),
        (("--seed", 2**64), "--seed must be an integer from 0 to 18446744073709551615, got 18446744073709551616"),
        (("--cfg-alpha", "nan"), "--cfg-alpha must be a finite number from 0.0 to 10.0, got nan"),
        (("--cfg-alpha", "inf"), "--cfg-alpha must be a finite number"),
        (("--cfg-alpha", -5), "--cfg-alpha must be a finite number from 0.0 to 10.0, got -5.0"),
        (("--flow-steps", 100000), "--flow-steps must be an integer from 1 to 64, got 100000"),
        (("--max-frames", 0), "--max-frames must be an integer of at least 1, got 0"),
        (("--max-chars", 0), "--max-chars must be an integer of at least 1, got 0"),
        (("--max-chars", 5), "the text is 28 characters, over the limit of 5 (--max-chars)"),
        (("--output", "{tmp}"), "--output: Unsupported audio file extension '(none)'"),
        (("--output", "{tmp}/folder.wav"), "--output: Output path {tmp}/folder.wav is a folder"),
        (("--output", "{tmp}/text.txt/o.wav"), "--output: Output folder {tmp}/text.txt is a file"),
    ],
)
def test_argument_errors_answer_before_the_model_is_looked_at(tmp_path, args, message):
    (tmp_path / "folder.wav").mkdir()
    (tmp_path / "text.txt").write_text(TEXT)
    args = [str(a).format(tmp=tmp_path) for a in args]
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "mlx_speech.generate", "--model", MISSING_MODEL,
                        "--text", TEXT, *args], capture_output=True, text=True, cwd=REPO, timeout=60)
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert message.format(tmp=tmp_path) in lines[0]
    assert not MLX_IMPORT.search(r.stderr), "MLX was imported before the arguments were checked"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.wav", "text.txt"]  # no probe left


@pytest.mark.parametrize(
    "source, message",
    [("folder", "--file: '{tmp}' is a folder, not a text file"),
     ("huge", "--file: text file '{tmp}/huge.txt' holds more than 10 characters, the limit (--max-chars)"),
     ("stdin", "standard input is not valid UTF-8 (byte 3)")],
)  # fmt: skip
def test_text_sources_are_checked_before_the_model_is_looked_at(tmp_path, source, message):
    (tmp_path / "huge.txt").write_bytes(b"a" * 10**6)
    args = {"folder": ["--file", tmp_path], "huge": ["--file", tmp_path / "huge.txt", "--max-chars", 10],
            "stdin": []}[source]
    r = subprocess.run([sys.executable, "-m", "mlx_speech.generate", "--model", MISSING_MODEL, *map(str, args)],
                       input=b"caf\xe9", capture_output=True, cwd=REPO, timeout=60)
    lines = r.stderr.decode().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message.format(tmp=tmp_path)}")


def test_a_huge_max_chars_allocates_nothing_up_front():
    r = subprocess.run([sys.executable, "-m", "mlx_speech.generate", "--model", MISSING_MODEL, "--max-chars",
                        str(10**18)], input=b"Hello.", capture_output=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and r.stderr.decode().startswith(f"error: --model {MISSING_MODEL}")  # text read


def test_missing_model_folder_and_unknown_voice_are_named_before_loading(tiny_mlx):
    r = cli("--model", MISSING_MODEL, "--text", TEXT, "-o", "x.wav")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"error: --model {MISSING_MODEL}: no such folder (nor a Hub repo id like 'owner/name')"]
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "mlx_speech.generate", "--model", str(tiny_mlx),
                        "--text", TEXT, "--voice", "robot", "-o", "x.wav"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and not MLX_IMPORT.search(r.stderr)
    assert error_lines(r.stderr) == [
        "error: --voice: unknown voice 'robot'; choose one of: casual_male, neutral_female, "
        "or give a voice file (.safetensors)"]
    assert not (REPO / "x.wav").exists()


def test_list_voices_of_an_mlx_folder_needs_no_mlx(tiny_mlx):
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "mlx_speech.generate", "--model", str(tiny_mlx),
                        "--list-voices"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0 and not MLX_IMPORT.search(r.stderr)
    names = [line.split()[0] for line in r.stdout.splitlines()[1:]]
    assert names == sorted(p.stem for p in (tiny_mlx / "voices").glob("*.safetensors"))


def test_list_voices_into_a_closed_pipe_exits_quietly(tiny_mlx):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written, as `| head -0` or `| true`
    try:
        r = subprocess.run([sys.executable, "-m", "mlx_speech.generate", "--model", str(tiny_mlx), "--list-voices"],
                           stdout=write, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=60)
    finally:
        os.close(write)
    assert r.returncode == 128 + signal.SIGPIPE and r.stderr == ""


# ---- playback: devices, PortAudio, the tail ----------------------------------------------------


@pytest.mark.parametrize(
    "device, message",
    [("nope", "--device: no audio output device 'nope': No output device matching 'nope' (see --list-devices)"),
     ("0", "--device: no audio output device 0: Not an output device: 'Mic' (see --list-devices)"),
     ("7", "--device: no audio output device 7: Error querying device 7 (see --list-devices)")],
)  # fmt: skip
def test_bad_device_is_refused_before_the_model_loads(fake_sd, tmp_path, device, message):
    # Arguments come first: a missing model folder is named before the sound system is asked.
    r = cli("--model", MISSING_MODEL, "--text", TEXT, "--device", device, env=fake_sd)
    assert r.returncode == 2 and r.stderr.startswith(f"error: --model {MISSING_MODEL}")
    # An empty folder: the device is refused before anything is read from it. A bad --device is
    # an error even with --output (a typo, not a machine without sound).
    r = cli("--model", tmp_path, "--text", TEXT, "--device", device, "--play", "-o", tmp_path / "x.wav",
            env=fake_sd)
    assert r.returncode == 2 and r.stderr.splitlines() == [f"error: {message}"], r.stderr
    assert not (tmp_path / "x.wav").exists()


def test_missing_portaudio(fake_sd, tiny_mlx, tmp_path):
    env = {**fake_sd, "FAKE_SD_MISSING": "1"}
    r = cli("--model", tiny_mlx, "--text", TEXT, env=env)  # plays: nothing else to do
    assert r.returncode == 2
    assert r.stderr.splitlines() == [r.stderr.strip()] and "the PortAudio library is missing" in r.stderr
    assert "loaded" not in r.stderr
    out = tmp_path / "o.wav"
    r = cli("--model", tiny_mlx, "--text", TEXT, "--voice", "casual_male", "--seed", 4, "--max-frames", 6,
            "--play", "-o", out, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("warning: cannot play audio: the PortAudio library is missing")
    assert len(sf.read(out)[0]) == 6 * SPF


def test_a_device_failing_mid_run_costs_the_sound_not_the_file(fake_sd, tiny_mlx, tmp_path):
    env = {**fake_sd, "FAKE_SD_START_FAILS": "1"}  # the check passes; starting the stream fails
    out = tmp_path / "o.wav"
    args = ("--model", tiny_mlx, "--text", TEXT, "--voice", "casual_male", "--seed", 4, "--max-frames", 6)
    r = cli(*args, "--play", "-o", out, "-q", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [f"warning: cannot start audio output on the default device: Error starting stream: "
                                     f"Device unavailable [PaErrorCode -9985]; writing {out} only"]
    assert len(sf.read(out)[0]) == 6 * SPF
    r = cli(*args, "-q", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == ["error: cannot start audio output on the default device: Error starting stream: "
                                     "Device unavailable [PaErrorCode -9985]"]


def played(env) -> np.ndarray:
    """What the stand-in device was handed (the stream starts with the first queued sample)."""
    path = env["FAKE_SD_RECORD"]
    return np.fromfile(path, np.float32) if os.path.exists(path) else np.zeros(0, np.float32)


def test_play_shows_the_tail_and_plays_what_it_writes(fake_sd, tiny_mlx, tmp_path):
    out = tmp_path / "o.wav"
    r = cli("--model", tiny_mlx, "--text", TEXT, "--voice", "casual_male", "--seed", 4, "--max-frames", 6,
            "--play", "-o", out, env=fake_sd)
    assert r.returncode == 0, r.stderr
    assert "generation done; playing the last" in r.stderr
    assert "underruns: 0" in r.stderr  # 0.48 s in all: less than the planned lead, starts at the end
    assert "first audio heard after" in r.stderr
    written = sf.read(out, dtype="float32")[0]
    heard = np.clip(played(fake_sd)[: len(written)], -1, 1)
    fade = 120  # the player's 5 ms fades
    np.testing.assert_allclose(heard[fade:-fade], written[fade:-fade], atol=1 / 32767 + 1e-6)


def test_terminal_progress_updates_in_place_and_counts_the_tail_down(fake_sd, tiny_mlx, tmp_path):
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "mlx_speech.generate", "--model", str(tiny_mlx), "--text", TEXT,
                          "--voice", "casual_male", "--seed", "4", "--max-frames", "6", "--play",
                          "-o", str(tmp_path / "o.wav")],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, cwd=REPO, env=fake_sd)
    os.close(slave)
    seen = b""
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        seen += data
    os.close(master)
    assert p.wait(60) == 0, seen
    text = seen.decode()
    assert "\r   0.48 s of audio" in text and "6 frames" in text
    assert "playing:" in text and " s left" in text
    assert "first audio ready" not in text  # that line is for logs, not terminals


@pytest.fixture(scope="module")
def full_clip(model):
    from mlx_speech import generate

    return generate(model, TEXT, "casual_male", seed=5)  # 72 frames, "stop"


def test_ctrl_c_while_the_tail_plays_stops_at_once_and_keeps_the_whole_file(fake_sd, tiny_mlx, tmp_path, full_clip):
    out = tmp_path / "o.wav"
    env = {**fake_sd, "FAKE_SD_SPEED": "0.25"}  # a slow device: the tail surely still plays
    p = start("--model", tiny_mlx, "--text", TEXT, "--voice", "casual_male", "--seed", 5, "--play", "-o", out,
              env=env)
    try:
        wait_for_line(p, "generation done; playing the last")
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.splitlines() == ["interrupted", f"audio written to {out}"]
    written = sf.read(out, dtype="float32")[0]
    np.testing.assert_allclose(written, np.clip(full_clip.audio, -1, 1), atol=1 / 32767 + 1e-6)
    assert len(played(env)) < len(written) // 2, "playback went on after Ctrl-C"
    assert sorted(f.name for f in tmp_path.iterdir() if f.suffix == ".part") == []


# ---- signals, broken streams, full disks -------------------------------------------------------


SLOW = ("--voice", "casual_male", "--seed", 1, "--flow-steps", 64, "--max-frames", 2000)  # 160 frames, ~20 s


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stop_signals_keep_a_valid_partial_file(tiny_mlx, tmp_path, model, sig):
    out = tmp_path / "partial.wav"
    p = start("--model", tiny_mlx, "--text", TEXT, *SLOW, "--output", out)
    try:
        wait_for_line(p, "first audio ready after")
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 128 + sig, err
    name = "" if sig == signal.SIGINT else f" ({signal.Signals(sig).name})"
    assert err.splitlines() == [f"interrupted{name}", f"partial audio written to {out}"]
    audio, sr = sf.read(out, dtype="float32")
    assert sr == 24000 and len(audio) > 0 and len(audio) % SPF == 0
    assert sorted(f.name for f in tmp_path.iterdir()) == ["partial.wav"]  # no .part file left
    if sig == signal.SIGTERM:  # the frames kept are the generation's first frames
        from mlx_speech import generate

        ref = generate(model, TEXT, "casual_male", seed=1, flow_steps=64, max_frames=len(audio) // SPF)
        np.testing.assert_allclose(audio, np.clip(ref.audio, -1, 1), atol=1 / 32767 + 1e-6)


def test_ctrl_c_during_the_model_load_is_one_line(tiny_mlx, tmp_path):
    p = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "mlx_speech.generate", "--model", str(tiny_mlx),
                          "--text", TEXT, *map(str, SLOW), "-o", str(tmp_path / "o.wav")],
                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not MLX_IMPORT.search(p.stderr.readline()):  # MLX is being imported: loading has begun
            assert p.poll() is None
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130
    assert error_lines(err) == ["interrupted"], err
    assert list(tmp_path.iterdir()) == []


SHORT = ("--voice", "casual_male", "--seed", "4", "--max-frames", "20")


@pytest.fixture(scope="module")
def short_reference(tiny_mlx, tmp_path_factory) -> np.ndarray:
    """The audio of SHORT, written by a run whose stderr is intact."""
    ref = tmp_path_factory.mktemp("reference") / "ref.wav"
    assert cli("--model", tiny_mlx, "--text", TEXT, *SHORT, "-q", "-o", ref).returncode == 0
    return sf.read(ref)[0]


def test_a_closed_stderr_pipe_does_not_cost_the_output(tiny_mlx, tmp_path, short_reference):
    out = tmp_path / "o.wav"
    # As `… 2>&1 | head -c 20`: the reader takes 20 bytes and goes away.
    p = subprocess.Popen([sys.executable, "-m", "mlx_speech.generate", "--model", str(tiny_mlx), "--text", TEXT,
                          *SHORT, "-o", str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    head = p.stdout.read(20)
    p.stdout.close()
    assert p.wait(120) == 0 and head.startswith(b"loaded")
    np.testing.assert_array_equal(sf.read(out)[0], short_reference)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_stderr_on_a_full_device_does_not_cost_the_output(tiny_mlx, tmp_path, short_reference):
    out = tmp_path / "o.wav"
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "mlx_speech.generate", "--model", str(tiny_mlx), "--text", TEXT,
                            *SHORT, "-o", str(out)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=full, timeout=120)
    assert r.returncode == 0
    np.testing.assert_array_equal(sf.read(out)[0], short_reference)


def test_a_full_disk_is_one_line_naming_the_output(tiny_mlx, tmp_path):
    out = tmp_path / "o.wav"

    def small_files():  # files over 20 KB cannot grow: what a full disk does to the writer
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))

    r = subprocess.run([sys.executable, "-m", "mlx_speech.generate", "--model", str(tiny_mlx), "--text", TEXT,
                        "--voice", "casual_male", "--seed", "1", "-q", "-o", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"error: cannot write {out}: File too large"]
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too


def test_a_write_error_in_process_names_the_output_and_removes_the_temp_file(tiny_mlx, tmp_path, monkeypatch,
                                                                             capsys):
    import runpy

    calls = []

    def failing_write(self, data):
        calls.append(len(data))
        if len(calls) == 2:
            raise sf.LibsndfileError(2, "Error writing: ")  # what libsndfile raises on ENOSPC
        return real_write(self, data)

    real_write = sf.SoundFile.write
    monkeypatch.setattr(sf.SoundFile, "write", failing_write)
    out = tmp_path / "o.wav"
    monkeypatch.setattr(sys, "argv", ["generate", "--model", str(tiny_mlx), "--text", TEXT, "--voice",
                                      "casual_male", "--seed", "1", "-q", "-o", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        # As `python -m` runs it: importing mlx_speech.generate here would shadow the package's
        # generate() function for the tests that follow.
        runpy.run_module("mlx_speech.generate", run_name="__main__")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {out}: ") and ".part" not in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_summary_says_one_frame_and_fits_80_columns(tiny_mlx, tmp_path):
    r = cli("--model", tiny_mlx, "--text", TEXT, "--voice", "casual_male", "--seed", 4, "--max-frames", 1,
            "-o", tmp_path / "o.wav")
    assert r.returncode == 0, r.stderr
    summary = r.stderr.splitlines()[2:]
    assert summary[0].startswith("1 frame, 0.08 s of audio in ")
    assert "finish: length, stopped at the frame cap (--max-frames 1): text may be cut" in summary
    assert all(len(line) <= 80 for line in summary) and "\r" not in r.stderr


def test_default_cap_is_proportional_to_the_text_and_said_in_words(tiny_mlx, tmp_path):
    out = tmp_path / "o.wav"
    r = cli("--model", tiny_mlx, "--text", "Hi.", "--voice", "casual_male", "--seed", 2, "-o", out)
    assert r.returncode == 0, r.stderr
    frames = len(sf.read(out)[0]) // SPF  # this seed never ends: it runs into the cap
    assert frames < 2048  # not the fixed default of before: the cap follows the text
    summary = r.stderr.splitlines()[2:]
    assert summary[0].startswith(f"{frames} frames,")
    assert f"finish: length, stopped at the cap for this text ({frames} frames): text may be cut" in summary
    assert any("raise the cap with --max-frames" in line for line in summary)
    assert all(len(line) <= 80 for line in summary)


def test_library_messages_name_the_flags(tiny_mlx):
    r = cli("--model", tiny_mlx, "--text", TEXT, "--max-frames", 70000, "-o", "x.wav")
    assert r.returncode == 2 and "text too long" in r.stderr
    assert "--max-frames" in r.stderr and "max_frames" not in r.stderr.replace("--max-frames", "")


# ---- the display's parts -----------------------------------------------------------------------


def test_wrap_fills_lines_up_to_the_width():
    parts = ["a" * 30, "b" * 30, "c" * 30, "d" * 90, "e"]
    assert wrap(parts, width=80) == ["a" * 30 + " | " + "b" * 30, "c" * 30, "d" * 90, "e"]
    assert plural(1, "frame") == "1 frame" and plural(0, "frame") == "0 frames"


class _Failing(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def test_best_effort_stream_turns_silent_instead_of_raising():
    stream = BestEffortStream(_Failing())
    assert stream.write("progress\n") == len("progress\n")
    stream.flush()
    assert stream.broken and not stream.isatty()
    progress = cli_progress.Progress(stream, tty=True)
    progress.status("x")  # nothing raises after the break either
    progress.line("y")
