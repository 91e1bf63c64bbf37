"""A voice cloned from real speech (a clip spoken by espeak-ng) speaks in the library, the command
line and the server, each giving the same audio for the same seed."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO

from mlx_speech import generate
from mlx_speech.voice_file import Voice

TEXT = "Hello world, this is a test."
OPTS = dict(seed=4, max_frames=5)
PCM_STEP = 1 / 32767 + 1e-6


@pytest.fixture(scope="module")
def cloned(tiny_mlx, tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    folder = tmp_path_factory.mktemp("cloned")
    clip = folder / "clip.wav"
    subprocess.run(["espeak-ng", "-w", str(clip), "My own voice, spoken for a short while on my computer."],
                   check=True, capture_output=True)
    voices = folder / "voices"
    voices.mkdir()
    out = voices / "me.safetensors"
    r = subprocess.run([sys.executable, "-m", "mlx_speech.clone", str(clip), "--output", str(out), "--model",
                        str(tiny_mlx), "--steps", "4", "--seed", "1"], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def test_the_clone_speaks_in_the_library(model, cloned):
    voice = Voice.load(cloned, model.config.backbone.dim)
    by_path = generate(model, TEXT, cloned, **OPTS)
    by_object = generate(model, TEXT, voice, **OPTS)
    assert by_path.frames > 0 and np.abs(by_path.audio).max() > 0
    np.testing.assert_array_equal(by_path.audio, by_object.audio)
    ids = model.tokenizer.encode_speech_prompt(TEXT, voice.rows)
    assert ids.count(model.tokenizer.audio_id) == voice.rows == voice.codes.shape[0] + 1
    other = generate(model, TEXT, "casual_male", **OPTS)
    assert not np.array_equal(by_path.audio, other.audio)  # the clone's rows, not a preset's


def test_the_clone_speaks_on_the_command_line(model, tiny_mlx, cloned, tmp_path):
    out = tmp_path / "cli.wav"
    r = subprocess.run([sys.executable, "-m", "mlx_speech.generate", "--model", str(tiny_mlx),
                        "--text", TEXT, "--voice", str(cloned), "--seed", "4", "--max-frames", "5", "-o", str(out),
                        "-q"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    ref = generate(model, TEXT, cloned, **OPTS)
    np.testing.assert_allclose(sf.read(out, dtype="float32")[0], np.clip(ref.audio, -1, 1), atol=PCM_STEP)


for _module in ("starlette", "uvicorn", "httpx"):
    pytest.importorskip(_module, reason=f"{_module} is not installed (pip install -e '.[server,dev]')")

import httpx  # noqa: E402
from test_server import start_server, stop_server  # noqa: E402


def test_the_clone_speaks_in_the_server(model, tiny_mlx, cloned, tmp_path):
    proc, url = start_server(tiny_mlx, tmp_path / "server.log", "--voices", str(cloned.parent))
    try:
        r = httpx.post(f"{url}/v1/audio/speech", timeout=120,
                       json={"input": TEXT, "voice": "me", "response_format": "wav", "seed": 4, "max_frames": 5})
        assert r.status_code == 200, r.text
    finally:
        assert stop_server(proc) == 0
    ref = generate(model, TEXT, cloned, **OPTS)
    np.testing.assert_allclose(sf.read(io.BytesIO(r.content), dtype="float32")[0], np.clip(ref.audio, -1, 1),
                               atol=PCM_STEP)
