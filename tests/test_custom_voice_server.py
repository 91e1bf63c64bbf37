"""The server's --voices DIR: custom voice files speak like the preset with the same rows, are
listed as custom, and a bad folder or file stops the server at start with one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

for _module in ("starlette", "uvicorn", "httpx"):
    pytest.importorskip(_module, reason=f"{_module} is not installed (pip install -e '.[server,dev]')")

import httpx  # noqa: E402
from test_server import TEXT, start_server, stop_server  # noqa: E402

from mlx_speech.voice_file import Voice  # noqa: E402


@pytest.fixture(scope="module")
def voices_dir(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("voices")
    Voice(np.array(model.voice("casual_male"))).save(folder / "me.safetensors")
    return folder


def test_voices_dir_speaks_and_lists_custom_voices(tiny_mlx, voices_dir, tmp_path):
    proc, url = start_server(tiny_mlx, tmp_path / "server.log", "--voices", str(voices_dir))
    try:
        listed = {v["id"]: v for v in httpx.get(f"{url}/v1/audio/voices").json()["data"]}
        assert listed["me"]["custom"] is True and listed["casual_male"]["custom"] is False
        bodies = {}
        for voice in ("me", "casual_male"):
            r = httpx.post(f"{url}/v1/audio/speech", timeout=120, json={
                "input": TEXT, "voice": voice, "response_format": "wav", "seed": 4, "max_frames": 5})
            assert r.status_code == 200, r.text
            bodies[voice] = r.content
        assert bodies["me"] == bodies["casual_male"] and len(bodies["me"]) > 5 * 1920 * 2
    finally:
        assert stop_server(proc) == 0


def test_a_bad_voices_dir_is_one_line_at_start(tiny_mlx, tmp_path, model):
    missing = subprocess.run([sys.executable, "-m", "mlx_speech.server", "--model", str(tiny_mlx),
                              "--voices", str(tmp_path / "nowhere")],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.strip().endswith("nowhere: no such folder"), missing.stderr
    (tmp_path / "bad").mkdir()
    Voice(np.zeros((3, model.config.backbone.dim + 1), np.float32)).save(tmp_path / "bad" / "wide.safetensors")
    wide = subprocess.run([sys.executable, "-m", "mlx_speech.server", "--model", str(tiny_mlx), "--log-level",
                           "warning", "--voices", str(tmp_path / "bad")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = wide.stderr.strip().splitlines()
    assert wide.returncode == 2 and lines[-1].startswith("error: ") and "wide.safetensors" in lines[-1], wide.stderr
    assert "shape (3, 65)" in lines[-1]
