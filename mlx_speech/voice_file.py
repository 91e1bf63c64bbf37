"""Voice files: a voice's input-embedding rows in a small safetensors file, checked on read.

A voice is ``embedding`` (rows, dim): the rows that replace the prompt's ``[AUDIO]`` slots
(spec §4.5). Presets live in a model folder's ``voices/<name>.safetensors``; custom voices are
files of the same form anywhere. Every voice is checked when it is read — safetensors (never a
pickle), the model's width, a bounded row count, finite values — so a bad file is refused by
name at load time instead of failing (or speaking noise) on every request for it.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import file_error

EMBEDDING_KEY = "embedding"
CODES_KEY = "codes"
# 1024 rows = 82 s of reference audio; presets have 67–218, a 16 s clone 202.
MAX_VOICE_ROWS = 1024
MAX_VOICE_FILE_BYTES = 64 << 20
_FLOAT_DTYPES = {"F32", "F16", "BF16"}


def _check_shape(shape: tuple, dim: int, source, rows: int | None) -> None:
    if len(shape) != 2 or shape[1] != dim:
        raise file_error(source, f"voice embedding has shape {shape}; the model needs (rows, {dim})")
    if not 1 <= shape[0] <= MAX_VOICE_ROWS:
        raise file_error(source, f"voice embedding has {shape[0]} rows; a voice has 1 to {MAX_VOICE_ROWS}")
    if rows is not None and shape[0] != rows:
        raise file_error(source, f"voice embedding has {shape[0]} rows but tekken.json gives this voice {rows}")


def check_voice_embedding(embedding: mx.array, dim: int, source: str | os.PathLike,
                          rows: int | None = None) -> None:
    """Raise CheckpointError naming ``source`` unless ``embedding`` is (rows, dim), finite, floating.

    ``rows`` is the row count the tokenizer expects for a preset (None: any count from 1 to
    MAX_VOICE_ROWS).
    """
    _check_shape(tuple(embedding.shape), dim, source, rows)
    if not mx.issubdtype(embedding.dtype, mx.floating):
        raise file_error(source, f"voice embedding has dtype {embedding.dtype}; a floating dtype is needed")
    if not mx.all(mx.isfinite(embedding)).item():
        raise file_error(source, "voice embedding holds NaN or infinite values")


def read_voice_file(path: str | os.PathLike, dim: int, rows: int | None = None) -> tuple[mx.array, dict[str, str]]:
    """The checked ``embedding`` of a voice file and its metadata (``{}`` if it has none).

    Raises:
        CheckpointError: see ``_read_checked``.
    """
    tensors, metadata = _read_checked(path, dim, rows)
    return tensors[EMBEDDING_KEY], metadata


def _read_checked(path, dim: int, rows: int | None) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Every tensor of a voice file, its ``embedding`` checked, and its metadata.

    Raises:
        CheckpointError: not a regular file, too large, not safetensors (e.g. a renamed pickle),
            no ``embedding`` tensor, or an embedding ``check_voice_embedding`` refuses.
    """
    from .checkpoint import read_safetensors_header

    path = Path(path)
    if not path.is_file():
        raise file_error(path, "voice file does not exist or is not a regular file")
    size = path.stat().st_size
    if size > MAX_VOICE_FILE_BYTES:
        raise file_error(path, f"voice file is {size} bytes; a voice file is at most {MAX_VOICE_FILE_BYTES}")
    header = read_safetensors_header(path)  # refuses anything that is not safetensors
    entry = header.get(EMBEDDING_KEY)
    if entry is None:
        raise file_error(path, f"voice file has no {EMBEDDING_KEY!r} tensor")
    if entry.get("dtype") not in _FLOAT_DTYPES:
        raise file_error(path, f"voice embedding has dtype {entry.get('dtype')!r}; expected one of {sorted(_FLOAT_DTYPES)}")
    _check_shape(tuple(entry.get("shape", ())), dim, path, rows)  # from the header, before any data is read
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise file_error(path, f"unreadable voice file ({e})") from None
    check_voice_embedding(tensors[EMBEDDING_KEY], dim, path, rows)
    return tensors, dict(metadata or {})



@dataclass
class Voice:
    """A voice to speak with: its input-embedding rows, and how it was made.

    Attributes:
        embedding: float32 (rows, dim), the rows placed at the prompt's ``[AUDIO]`` slots.
        codes: (rows - 1, 37) int32 codes with the +2 offset that the rows were summed from
            (``voice_codes.codes_to_voice``), or None for a voice known only by its rows.
        metadata: free-form strings saved with the file (source duration, steps, loss, model id…).
        name: what listings call it (a file's stem when read from a file).
    """

    embedding: np.ndarray
    codes: np.ndarray | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    name: str | None = None

    @property
    def rows(self) -> int:
        return int(self.embedding.shape[0])

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (a ``.safetensors`` file) atomically: a temporary file, then a rename.

        Keys ``embedding`` (float32) and, when known, ``codes`` (int32); metadata values are
        stored as strings.
        """
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"voice file {path} must end in .safetensors")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"folder {path.parent} does not exist")
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; give a file name ending in .safetensors")
        tensors = {EMBEDDING_KEY: mx.array(np.asarray(self.embedding, np.float32))}
        if self.codes is not None:
            tensors[CODES_KEY] = mx.array(np.asarray(self.codes, np.int32))
        metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in self.metadata.items()}
        tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.partial.safetensors")
        try:
            mx.save_safetensors(str(tmp), tensors, metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, dim: int) -> "Voice":
        """Read and check a voice file (see ``read_voice_file``) for a model of width ``dim``."""
        tensors, metadata = _read_checked(path, dim, None)
        embedding, codes = tensors[EMBEDDING_KEY], tensors.get(CODES_KEY)
        # The codes are informative only (speaking uses the rows): kept when they fit the rows.
        fits = codes is not None and codes.ndim == 2 and codes.shape[0] == embedding.shape[0] - 1 \
            and mx.issubdtype(codes.dtype, mx.integer)
        codes = np.array(codes, np.int32) if fits else None
        return cls(np.array(embedding.astype(mx.float32)), codes, metadata, Path(path).stem)
