"""``python -m mlx_speech.generate`` as a user runs it: real subprocesses on the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO

TEXT = "Hello world, this is a test."


def run(*args, stdin: str | None = None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_speech.generate", *map(str, args)],
        input=stdin, capture_output=True, text=True, cwd=REPO, timeout=300,
    )


@pytest.fixture(scope="module")
def spoken(tiny_mlx, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out.wav"
    r = run("--model", tiny_mlx, "--text", TEXT, "--voice", "casual_male", "--seed", 4,
            "--max-frames", 6, "--output", out)
    return r, out


def test_writes_the_file_and_a_summary(spoken, model):
    r, out = spoken
    assert r.returncode == 0, r.stderr
    audio, sr = sf.read(out, dtype="float32")
    assert sr == 24000 and len(audio) == 6 * 1920
    assert "6 frames, 0.48 s of audio" in r.stderr and "x real time" in r.stderr
    assert "peak memory:" in r.stderr and "finish: length" in r.stderr
    assert "stopped at the frame cap (--max-frames 6): text may be cut" in r.stderr
    assert all(len(line) <= 80 for line in r.stderr.splitlines()[1:])  # the load line names a path
    assert "\r" not in r.stderr  # not a terminal: no in-place updates
    # The file holds what the API generates for the same request (16-bit PCM rounding aside).
    from mlx_speech import generate

    ref = generate(model, TEXT, "casual_male", seed=4, max_frames=6)
    np.testing.assert_allclose(audio, np.clip(ref.audio, -1, 1), atol=1 / 32767 + 1e-6)


def test_stdin_and_file_inputs_give_the_same_audio(spoken, tiny_mlx, tmp_path):
    _, ref = spoken
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    for i, (args, stdin) in enumerate([(("--file", text_file), None), ((), TEXT)]):
        out = tmp_path / f"o{i}.wav"
        r = run("--model", tiny_mlx, *args, "--voice", "casual_male", "--seed", 4,
                "--max-frames", 6, "--output", out, "--quiet", stdin=stdin)
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""  # --quiet
        np.testing.assert_array_equal(sf.read(out)[0], sf.read(ref)[0])


def test_other_seed_other_audio(spoken, tiny_mlx, tmp_path):
    _, ref = spoken
    out = tmp_path / "s.wav"
    r = run("--model", tiny_mlx, "--text", TEXT, "--voice", "casual_male", "--seed", 5,
            "--max-frames", 6, "--output", out, "-q")
    assert r.returncode == 0, r.stderr
    assert not np.array_equal(sf.read(out)[0], sf.read(ref)[0])


def test_list_voices(tiny_mlx):
    r = run("--model", tiny_mlx, "--list-voices")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].split()[:2] == ["casual_male", "English"] and lines[1].split()[-1] == "male"
    assert lines[2].split()[0] == "neutral_female" and lines[2].split()[-1] == "female"


@pytest.mark.parametrize(
    "args,stdin,message",
    [
        (("--text", TEXT, "--voice", "robot"), None, "unknown voice 'robot'; choose one of: casual_male, neutral_female"),
        (("--text", "  "), None, "the text is empty"),
        (("--file", "/nonexistent/t.txt"), None, "text file '/nonexistent/t.txt' does not exist"),
        (("--text", TEXT, "--output", "/nonexistent/dir/out.wav"), None, "Output folder /nonexistent/dir does not exist"),
        (("--text", TEXT, "--output", "out.xyz"), None, "Unsupported audio file extension '.xyz'"),
        (("--text", TEXT, "--max-frames", 70000, "--output", "x.wav"), None, "text too long"),
        (("--text", TEXT, "--flow-steps", 0, "--output", "x.wav"), None, "--flow-steps must be an integer from 1 to 64, got 0"),
        (("--text", "word " * 30, "--max-chars", 100, "--output", "x.wav"), None, "over the limit of 100"),
        (("--text", "bell\x07", "--output", "x.wav"), None, "control character U+0007 at position 4"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_mlx, tmp_path, args, stdin, message):
    r = run("--model", tiny_mlx, *args, stdin=stdin)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) <= 2, r.stderr  # a load line at most, then the error
    assert lines[-1].startswith("error: ") and message in lines[-1], r.stderr
    assert not (REPO / "x.wav").exists()


def test_invalid_utf8_file_is_refused(tiny_mlx, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9")
    r = run("--model", tiny_mlx, "--file", bad)
    assert r.returncode == 2 and "not valid UTF-8 (byte 3)" in r.stderr


@pytest.mark.parametrize("option", [("--cfg-alpha", 2.0), ("--flow-steps", 3)])
def test_flow_options_change_the_audio(spoken, tiny_mlx, tmp_path, option):
    _, ref = spoken
    out = tmp_path / "f.wav"
    r = run("--model", tiny_mlx, "--text", TEXT, "--voice", "casual_male", "--seed", 4,
            "--max-frames", 6, "--output", out, "-q", *option)
    assert r.returncode == 0, r.stderr
    assert not np.array_equal(sf.read(out)[0], sf.read(ref)[0])


def test_ctrl_c_stops_cleanly_and_keeps_the_partial_file(tiny_mlx, tmp_path):
    import signal

    out = tmp_path / "partial.wav"
    p = subprocess.Popen(
        [sys.executable, "-m", "mlx_speech.generate", "--model", str(tiny_mlx), "--text", TEXT,
         "--voice", "casual_male", "--seed", "1", "--max-frames", "2000", "--output", str(out)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO,
    )
    try:
        assert "speaking with voice" in p.stderr.readline()  # the model is loaded
        # The first chunk is out (seed 1 speaks 131 frames here).
        assert p.stderr.readline().startswith("first audio ready after")
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "interrupted" in err and "partial audio written" in err
    audio, sr = sf.read(out, dtype="float32")
    assert sr == 24000 and len(audio) > 0 and len(audio) % 1920 == 0
    assert sorted(f.name for f in tmp_path.iterdir()) == ["partial.wav"]  # no temp file left


def _require_portaudio():
    try:
        import sounddevice  # noqa: F401
    except (OSError, ImportError) as e:
        pytest.skip(f"PortAudio library not installed ({e}; Debian: apt install libportaudio2); "
                    "tests/test_cli_hardening.py covers this path with a stand-in")


def test_play_without_an_output_device_still_writes_the_file(tiny_mlx, tmp_path):
    _require_portaudio()
    env = {**os.environ, "PULSE_SERVER": f"unix:{tmp_path}/no-such-server"}
    devices = subprocess.run([sys.executable, "-m", "mlx_speech.generate", "--list-devices"],
                             capture_output=True, text=True, env=env, timeout=120)
    if devices.stdout.strip():
        pytest.skip("this machine has an audio output device; the no-device path cannot be shown")
    assert devices.returncode == 0 and "no audio output devices found" in devices.stderr
    out = tmp_path / "o.wav"
    args = ["--model", tiny_mlx, "--text", TEXT, "--voice", "casual_male", "--seed", 4, "--max-frames", 6]
    r = subprocess.run([sys.executable, "-m", "mlx_speech.generate", *map(str, args), "--play",
                        "--output", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "warning: no audio output device found" in r.stderr
    assert len(sf.read(out)[0]) == 6 * 1920
    r = subprocess.run([sys.executable, "-m", "mlx_speech.generate", *map(str, args), "--play"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: no audio output device")
