"""Custom voices on the command line: --voice FILE, --voice NAME from the user's voice folder,
and --list-voices of every layout — each checked before the model loads."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO, TINY

from mlx_speech.voice_file import Voice

TEXT = "Hello world, this is a test."


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mlx_speech.generate", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def voices(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("my_voices")
    Voice(np.array(model.voice("casual_male"))).save(folder / "me.safetensors")
    return folder


def test_a_voice_file_and_a_user_voice_speak_like_the_preset(tiny_mlx, voices, tmp_path):
    common = ("--model", tiny_mlx, "--text", TEXT, "--seed", 4, "--max-frames", 5, "-q")
    outputs = {}
    for label, voice, env in (("preset", "casual_male", None), ("file", voices / "me.safetensors", None),
                              ("name", "me", {"MLX_SPEECH_VOICES": str(voices)})):
        out = tmp_path / f"{label}.wav"
        r = run(*common, "--voice", voice, "--output", out, env=env)
        assert r.returncode == 0, r.stderr
        outputs[label] = sf.read(out)[0]
    assert len(outputs["preset"]) == 5 * 1920
    np.testing.assert_array_equal(outputs["file"], outputs["preset"])
    np.testing.assert_array_equal(outputs["name"], outputs["preset"])


def test_list_voices_marks_custom_ones_and_reads_every_layout(tiny_mlx, voices):
    r = run("--model", tiny_mlx, "--list-voices", env={"MLX_SPEECH_VOICES": str(voices)})
    assert r.returncode == 0, r.stderr
    rows = [line.split()[:2] for line in r.stdout.splitlines()[1:]]
    assert rows == [["casual_male", "English"], ["neutral_female", "English"], ["me", "custom"]]
    release = run("--model", TINY, "--list-voices", env={"MLX_SPEECH_VOICES": str(voices / "none")})
    assert release.returncode == 0, release.stderr
    assert [line.split()[0] for line in release.stdout.splitlines()[1:]] == ["casual_male", "neutral_female"]


def test_bad_voice_arguments_are_refused_before_loading(tiny_mlx, tmp_path, model):
    missing = run("--model", tiny_mlx, "--text", TEXT, "--voice", tmp_path / "nope.safetensors", "-o", tmp_path / "o.wav")
    assert missing.returncode == 2 and missing.stderr.strip().endswith("nope.safetensors: no such voice file")
    wide = tmp_path / "wide.safetensors"
    Voice(np.zeros((3, model.config.backbone.dim + 1), np.float32)).save(wide)
    bad = run("--model", tiny_mlx, "--text", TEXT, "--voice", wide, "-o", tmp_path / "o.wav")
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and last.startswith("error: --voice: ") and "shape (3, 65)" in last, bad.stderr
    assert not (tmp_path / "o.wav").exists()
