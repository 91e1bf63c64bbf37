"""One copy on disk: a release from the Hub is read where it was downloaded, and a quantized
conversion can drop the download it came from (``--discard-download``)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, TINY

REPO_ID = "someone/tiny-voxtral"


def fake_hub_cache(root: Path, source: Path = TINY) -> Path:
    """A Hugging Face cache holding ``source`` as REPO_ID at main, laid out as the Hub client
    writes it (blobs, refs, snapshot links), so that offline downloads and cache scans find it."""
    repo = root / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / f.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo


def env_for(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path / "home")}


def disk_usage(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def test_loading_the_release_from_the_hub_keeps_one_copy(tmp_path):
    cache = fake_hub_cache(tmp_path / "hf")
    (tmp_path / "home").mkdir()
    before = disk_usage(tmp_path)
    code = (f"import mlx_speech; m = mlx_speech.load({REPO_ID!r}); print(m.source); "
            "print(mlx_speech.generate(m, 'Hello.', 'casual_male', seed=1, max_frames=2).frames)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_for(tmp_path),
                       cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0].startswith("original release")
    assert disk_usage(tmp_path) == before  # nothing converted, nothing cached beside the download
    assert cache.is_dir()


def test_discard_download_leaves_only_the_quantized_folder(tmp_path):
    cache = fake_hub_cache(tmp_path / "hf")
    out = tmp_path / "tiny-4bit"
    r = subprocess.run([sys.executable, "-m", "mlx_speech.convert", "--hf-path", REPO_ID, "--mlx-path", str(out),
                        "-q", "--q-bits", "4", "--discard-download"],
                       capture_output=True, text=True, env=env_for(tmp_path), cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "removed the download of someone/tiny-voxtral" in r.stdout
    assert not (cache / "snapshots").exists() or not any((cache / "snapshots").iterdir())
    assert not (cache / "blobs").exists() or not any((cache / "blobs").iterdir())
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_discard_download_never_deletes_a_local_folder(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mlx_speech.convert", "--hf-path", str(TINY), "--mlx-path",
                        str(tmp_path / "out"), "--discard-download"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and "is a local folder" in r.stderr
    assert (TINY / "consolidated.safetensors").is_file() and not (tmp_path / "out").exists()
