"""The command line's batch mode (--batch: one file per line) and --batch-size for long text:
each file equals the library's solo output; every line is checked before the model loads."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO

from mlx_speech import generate
from mlx_speech.longform import generate_long

MLX_IMPORT = re.compile(r"\|\s+mlx\.core$", re.M)
PCM_STEP = 1 / 32767 + 1e-6  # 16-bit files


def run(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "mlx_speech.generate", *map(str, args)],
                          input=stdin, capture_output=True, text=True, cwd=REPO, timeout=300)


def test_jsonl_lines_each_speak_like_generate_alone(tiny_mlx, model, tmp_path):
    lines = [{"text": "Hello world, this is a test.", "voice": "casual_male", "seed": 4},
             {"text": "A second, longer line of text to speak.", "seed": 2, "output": "two.flac"},
             {"text": "Third.", "voice": "neutral_female", "seed": 9}]
    batch = tmp_path / "lines.jsonl"
    batch.write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    r = run("--model", tiny_mlx, "--batch", batch, "--output-dir", tmp_path, "--max-frames", 6,
            "--voice", "neutral_female", "--batch-size", 2)
    assert r.returncode == 0, r.stderr
    for line, name in zip(lines, ["0001.wav", "two.flac", "0003.wav"]):
        audio, sr = sf.read(tmp_path / name, dtype="float32")
        ref = generate(model, line["text"], line.get("voice", "neutral_female"), seed=line["seed"], max_frames=6)
        assert sr == 24000 and len(audio) == len(ref.audio)
        np.testing.assert_allclose(audio, np.clip(ref.audio, -1, 1), atol=PCM_STEP)
    assert "line 2: 0.48 s" in r.stderr and "[3/3]" in r.stderr


def test_a_long_line_is_split_and_crossfaded_like_file_text(tiny_mlx, model, tmp_path):
    long = " ".join(f"Sentence number {i} is here." for i in range(30))
    batch = tmp_path / "long.jsonl"
    batch.write_text(json.dumps({"text": long, "seed": 5}) + "\n" + json.dumps({"text": "Short.", "seed": 1}) + "\n")
    r = run("--model", tiny_mlx, "--batch", batch, "--output-dir", tmp_path, "--max-frames", 4, "--voice", "casual_male")
    assert r.returncode == 0, r.stderr
    ref = generate_long(model, long, "casual_male", seed=5, max_frames=4)
    assert ref.audio.shape[0] > 2 * 4 * 1920  # several pieces
    np.testing.assert_allclose(sf.read(tmp_path / "0001.wav", dtype="float32")[0], np.clip(ref.audio, -1, 1),
                               atol=PCM_STEP)


def test_plain_text_lines_get_numbered_files(tiny_mlx, tmp_path):
    r = run("--model", tiny_mlx, "--batch", "-", "--output-dir", tmp_path, "--max-frames", 3, "--format", "flac",
            "--seed", 1, stdin="First line.\n\nThird line.\n")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0001.flac", "0003.flac"]


@pytest.mark.parametrize("content,message", [
    ('{"text": "ok"}\n{"text": "hi", "voice": "robot"}\n', "--batch line 2: --voice: unknown voice 'robot'"),
    ('{"text": "ok"}\n{"text": "hi", "seed": -1}\n', "--batch line 2: seed must be an integer from 0"),
    ('{"text": "ok"}\n{"txt": "hi"}\n', "--batch line 2: unknown field 'txt'"),
    ('{"text": "ok"}\n[1, 2]\n', "--batch line 2: not a JSON object"),
    ('{"text": "ok", "output": "a.wav"}\n{"text": "hi", "output": "a.wav"}\n', "is also line 1's"),
    ('{"text": "ok", "output": "a.mp4"}\n', "--batch line 1: output a.mp4: Unsupported audio file extension"),
    ('{"text": "bell\\u0007"}\n', "--batch line 1: text holds the control character U+0007"),
    ("\n\n", "--batch: the file holds no lines to speak"),
])
def test_bad_lines_are_named_before_the_model_loads(tiny_mlx, tmp_path, content, message):
    batch = tmp_path / "bad.jsonl"
    batch.write_text(content)
    out = tmp_path / "out"
    out.mkdir()
    r = run("--model", tiny_mlx, "--batch", batch, "--output-dir", out)
    assert r.returncode == 2 and not MLX_IMPORT.search(r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-600:]
    assert list(out.iterdir()) == []


def test_batch_refuses_single_output_options(tiny_mlx, tmp_path):
    r = run("--model", tiny_mlx, "--batch", "-", "--output", tmp_path / "x.wav", stdin="Hi.\n")
    assert r.returncode == 2 and "--output does not apply with --batch" in r.stderr


def test_long_text_batch_size_gives_the_same_file(tiny_mlx, tmp_path):
    text = " ".join(f"Sentence number {i} is here." for i in range(30))
    outs = []
    for n in (1, 3):
        out = tmp_path / f"b{n}.wav"
        r = run("--model", tiny_mlx, "--text", text, "--seed", 5, "--max-frames", 4, "--batch-size", n,
                "--output", out, "-q")
        assert r.returncode == 0, r.stderr
        outs.append(sf.read(out)[0])
    assert len(outs[0]) > 4 * 1920 * 2  # several pieces
    np.testing.assert_array_equal(outs[0], outs[1])
