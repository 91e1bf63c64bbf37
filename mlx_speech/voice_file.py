"""Voice files: a voice's input-embedding rows in a small safetensors file, checked on read.

A voice is ``embedding`` (rows, dim): the rows that replace the prompt's ``[AUDIO]`` slots
(spec §4.5). Presets live in a model folder's ``voices/<name>.safetensors``; custom voices are
files of the same form anywhere. Every voice is checked when it is read — safetensors (never a
pickle), the model's width, a bounded row count, finite values — so a bad file is refused by
name at load time instead of failing (or speaking noise) on every request for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx

from .errors import file_error

EMBEDDING_KEY = "embedding"
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
    embedding = tensors[EMBEDDING_KEY]
    check_voice_embedding(embedding, dim, path, rows)
    return embedding, dict(metadata or {})

