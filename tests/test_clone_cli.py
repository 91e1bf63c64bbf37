"""``python -m mlx_speech.clone``: argument and input checks before the model loads, real speech
(espeak-ng) through the whole command, interruption, and ``--evaluate``."""

from __future__ import annotations

import io
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from mlx_speech import clip_prep
from mlx_speech.clone import ProgressBar, main
from mlx_speech.voice_codes import codes_to_voice, voice_rows_for_seconds
from mlx_speech.voice_file import Voice

REPO = Path(__file__).resolve().parents[1]
SENTENCE = "The quick brown fox jumps over the lazy dog, and then it rests for a while."


def speechlike(seconds: float, rate: int = 24000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * np.arange(n) / rate)
    return (0.2 * np.tanh(rng.standard_normal(n)) * envelope).astype(np.float32)


def run_cli(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture
def clip(tmp_path) -> Path:
    path = tmp_path / "ref.wav"
    sf.write(path, np.concatenate([np.zeros(4800), speechlike(3.0), np.zeros(4800)]), 24000)
    return path


def _bad_cases(tmp: Path, clip: Path):
    silent, short, garbage = tmp / "silent.wav", tmp / "short.wav", tmp / "garbage.wav"
    sf.write(silent, np.zeros(5 * 24000, np.float32), 24000)
    sf.write(short, np.concatenate([np.zeros(12000), speechlike(0.5), np.zeros(12000)]), 24000)
    garbage.write_bytes(b"\x80\x04\x95" + b"not audio at all " * 20)
    (tmp / "taken.safetensors").write_bytes(b"precious")
    (tmp / "folder.safetensors").mkdir()
    out = tmp / "me.safetensors"
    return {
        "no input": ([], "give a recording"),
        "no output": ([clip], "--output is required"),
        "both": ([clip, "--evaluate", "neutral_female"], "either a recording or --evaluate"),
        "suffix": ([clip, "-o", tmp / "me.wav"], "must end in .safetensors"),
        "no folder": ([clip, "-o", tmp / "nowhere" / "me.safetensors"], "does not exist"),
        "is a folder": ([clip, "-o", tmp / "folder.safetensors"], "is a folder"),
        "exists": ([clip, "-o", tmp / "taken.safetensors"], "--force"),
        "steps": ([clip, "-o", out, "--steps", "0"], "--steps"),
        "steps type": ([clip, "-o", out, "--steps", "many"], "--steps"),
        "seed": ([clip, "-o", out, "--seed", "-1"], "--seed"),
        "max seconds": ([clip, "-o", out, "--max-seconds", "1"], "--max-seconds"),
        "nan seconds": ([clip, "-o", out, "--max-seconds", "nan"], "--max-seconds"),
        "silent": ([silent, "-o", out], "silent"),
        "short": ([short, "-o", out], "only 0.6"),
        "unreadable": ([garbage, "-o", out], "cannot read audio"),
        "missing": ([tmp / "absent.wav", "-o", out], "does not exist"),
        "not 24 kHz": ([_write(tmp / "22k.wav", 22050), "-o", out, "--no-preprocess"], "24000 Hz"),
    }


def _write(path: Path, rate: int) -> Path:
    sf.write(path, speechlike(2.4, rate), rate)
    return path


BAD = [
    "no input", "no output", "both", "suffix", "no folder", "is a folder", "exists", "steps", "steps type",
    "seed", "max seconds", "nan seconds", "silent", "short", "unreadable", "missing", "not 24 kHz",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_arguments_and_inputs_fail_in_one_line_before_the_model_loads(tmp_path, clip, capsys, case):
    argv, match = _bad_cases(tmp_path, clip)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    # A model that does not exist: any check after loading would report it instead.
    code, _, err = run_cli([*argv, "--model", tmp_path / "no-model"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err
    assert "no-model" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert (tmp_path / "taken.safetensors").read_bytes() == b"precious"


def _espeak(path: Path, text: str) -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)


def test_clone_real_speech_from_espeak(tmp_path, tiny_mlx, model, capsys):
    ref = tmp_path / "espeak.wav"
    _espeak(ref, SENTENCE)
    info = sf.info(ref)
    assert info.samplerate == 22050  # resampled by the command
    out = tmp_path / "me.safetensors"
    out.write_bytes(b"old")  # replaced with --force
    code, stdout, stderr = run_cli([ref, "--output", out, "--model", tiny_mlx, "--steps", 3, "--force"], capsys)
    assert code == 0, stderr
    voice = Voice.load(out, model.config.backbone.dim)
    seconds = float(voice.metadata["seconds_used"])
    assert voice.rows == voice_rows_for_seconds(seconds) == math.ceil(seconds * 12.5) + 1
    assert voice.codes.shape == (voice.rows - 1, 37)
    np.testing.assert_array_equal(voice.embedding, codes_to_voice(model, voice.codes))
    assert float(voice.metadata["source_seconds"]) == pytest.approx(info.duration, abs=1e-3)
    # The sound's duration measured on the 22.05 kHz file itself: a clip taken at the wrong rate
    # would be 8 % off (0.3 s over 4 s).
    samples, _ = sf.read(ref, dtype="float32")
    window = int(0.02 * info.samplerate)
    rms = np.sqrt(np.mean(samples[: samples.size // window * window].reshape(-1, window) ** 2, axis=1))
    loud = np.flatnonzero(20 * np.log10(np.maximum(rms, 1e-10)) >= 20 * np.log10(rms.max()) - clip_prep.GATE_DB)
    sound = (loud[-1] + 1 - loud[0]) * 0.02
    expected = sound + 2 * clip_prep.MARGIN_SECONDS + clip_prep.PAUSE_SECONDS
    assert seconds == pytest.approx(expected, abs=0.1)
    assert voice.metadata["model"] == str(tiny_mlx) and voice.metadata["steps"] == "3"
    assert f"--voice {out}" in stdout and "python -m mlx_speech.generate" in stdout
    assert "step 1/3" in stderr and "step 3/3" in stderr and "ETA" in stderr
    assert f"{voice.rows - 1} frames" in stderr and "% of the starting point" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["espeak.wav", "me.safetensors"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_leaves_nothing_written(tmp_path, tiny_mlx, clip, signum):
    out = tmp_path / "me.safetensors"
    cmd = [sys.executable, "-m", "mlx_speech.clone", str(clip), "-o", str(out), "--model", str(tiny_mlx),
           "--steps", "100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # wait until the optimization runs
            if "step 1/" in line:
                break
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err
    assert "nothing written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.wav"]


@pytest.fixture
def model_with_preset(tmp_path, tiny_mlx, model) -> Path:
    """A copy of the tiny model with a preset built from codes (the golden presets are random rows,
    not code sums, so the preset → codes inversion has nothing to find in them)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_mlx, folder)
    c = model.audio_tokenizer.config
    rng = np.random.default_rng(3)
    codes = np.concatenate([rng.integers(0, c.semantic_codebook_size, (5, 1)),
                            rng.integers(0, c.acoustic_codebook_size, (5, c.acoustic_dim))], axis=1) + 2
    mx.save_safetensors(str(folder / "voices" / "probe.safetensors"),
                        {"embedding": mx.array(codes_to_voice(model, codes.astype(np.int32)))})
    return folder


def test_evaluate_reports_agreement_cosine_and_snr(tmp_path, model_with_preset, model, capsys):
    out = tmp_path / "probe-enrolled.safetensors"
    code, stdout, stderr = run_cli(["--evaluate", "probe", "--model", model_with_preset, "--steps", 20,
                                    "-o", out], capsys)
    assert code == 0, stderr
    for label in ("semantic codes agreeing", "acoustic codes exact", "row cosine", "resynthesis SNR"):
        assert label in stdout
    voice = Voice.load(out, model.config.backbone.dim)
    assert voice.rows == 6 and voice.metadata["evaluated_preset"] == "probe"


def test_evaluate_unknown_preset_is_one_line(model_with_preset, capsys):
    code, _, err = run_cli(["--evaluate", "nobody", "--model", model_with_preset], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: unknown preset 'nobody'") and "probe" in lines[-1]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_redraws_one_line_on_a_terminal():
    stream = _Terminal()
    bar = ProgressBar(stream)
    for step in range(1, 4):
        bar(step, 3, 1.0 / step)
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.startswith("\r")
    assert "3/3" in text and "loss 0.3333" in text and "done in" in text


def test_progress_bar_writes_plain_lines_elsewhere():
    stream = io.StringIO()
    bar = ProgressBar(stream)
    for step in range(1, 101):
        bar(step, 100, 0.5)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and 10 <= len(lines) <= 12
    assert lines[0].startswith("enrolling: step 1/100") and lines[-1].startswith("enrolling: step 100/100")
