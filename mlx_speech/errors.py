"""The one error type for damaged or hostile input files.

Every malformed ``params.json``, ``tekken.json``, ``config.json``, safetensors header or shard,
voice file and ``.pt`` archive is refused with a ``CheckpointError``: one line that names the
file and the field (or tensor) at fault, never a traceback. It is a ``ValueError``, so callers
that catch bad input in general keep working.
"""

from __future__ import annotations

import os

# The longest excerpt of an untrusted value quoted in a message: a 200 000-dimension shape or a
# 1 MB string must not become a 1 MB error line.
MAX_QUOTED_CHARS = 80


class CheckpointError(ValueError):
    """A model, tokenizer, weights or voice file that is damaged or not what it claims to be."""


def quoted(value, limit: int = MAX_QUOTED_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters, for quoting untrusted values in messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " …" + text[-3:]


def file_error(path: str | os.PathLike, problem: str) -> CheckpointError:
    """``CheckpointError("<path>: <problem>")``."""
    return CheckpointError(f"{os.fspath(path)}: {problem}")
