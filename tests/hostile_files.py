"""Building damaged and hostile model files for the hostile-input tests (never touching the golden).

Every helper works on a copy made under the test's ``tmp_path``: ``release_copy`` copies the
golden tiny release (made writable), ``write_safetensors`` writes a safetensors file byte by byte
from a header and a data blob, so a header can say anything.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO, TINY


def release_copy(tmp_path: Path, name: str = "release") -> Path:
    """A writable copy of the golden tiny release under ``tmp_path``."""
    src = tmp_path / name
    shutil.copytree(TINY, src)
    for p in [src, *src.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return src


def model_copy(tiny_mlx: Path, tmp_path: Path, name: str = "model") -> Path:
    """A writable copy of the converted tiny model folder under ``tmp_path``."""
    dst = tmp_path / name
    shutil.copytree(tiny_mlx, dst)
    for p in [dst, *dst.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return dst


def traversal_release(tmp_path: Path, name: str) -> Path:
    """A release copy whose tekken.json lists ``casual_male`` under the path-like voice ``name``,
    with that voice's .pt placed where ``voice_embedding/<name>.pt`` would point if followed."""
    src = release_copy(tmp_path)

    def edit(t):
        table = t["audio"]["voice_num_audio_tokens"]
        table[name] = table.pop("casual_male")

    edit_json(src / "tekken.json", edit)
    (tmp_path / "ESCAPED.pt").write_bytes((src / "voice_embedding" / "casual_male.pt").read_bytes())
    return src


def edit_json(path: Path, edit) -> None:
    """Rewrite the JSON file ``path`` with ``edit(data)`` applied (its return value, if not None, replaces it)."""
    data = json.loads(path.read_text())
    out = edit(data)
    path.write_text(json.dumps(data if out is None else out, allow_nan=True))


def write_safetensors(path: Path, header, data: bytes = b"", header_len: int | None = None) -> None:
    """Write ``path`` as 8-byte length + JSON ``header`` + ``data``; ``header_len`` overrides the length."""
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    """(header, data) of a safetensors file, as written."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def patch_pt_data(path: Path, edit) -> None:
    """Rewrite a torch .pt zip with ``edit(bytes) -> bytes`` applied to its tensor data entry."""
    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in entries:
            z.writestr(info, edit(data) if "/data/" in info.filename else data)


def listing(root: Path) -> list[str]:
    """Every path under ``root`` (hidden ones included), relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def run_convert(*args: str, env: dict | None = None, timeout: float = 120, cwd=None) -> subprocess.CompletedProcess:
    """``python convert.py ARGS`` (the top-level script), captured."""
    return subprocess.run([sys.executable, str(REPO / "convert.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)
