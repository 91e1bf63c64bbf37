"""Reading untrusted files: regular files only, bounded sizes, JSON errors that name the file.

A model folder or release holds three JSON files (``params.json``, ``tekken.json``,
``config.json``) and safetensors files whose header is JSON. Each may be damaged or hostile:
invalid or non-UTF-8 text, nesting deep enough to exhaust the parser's recursion, gigabytes of
text, or not a file at all (a FIFO would block forever, ``/proc/self/environ`` has no size).
Everything here raises ``CheckpointError`` ("<file>: <problem>") instead.
"""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

from .errors import CheckpointError, file_error, quoted

# params.json and config.json are about 3 KB; the real tekken.json about 15 MB.
MAX_CONFIG_BYTES = 1 << 20
MAX_TOKENIZER_BYTES = 64 << 20


_FILE_KINDS = {stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
               stat.S_ISBLK: "a block device"}


def open_regular_file(path: str | os.PathLike) -> io.BufferedReader:
    """Open ``path`` for reading, refusing anything but a regular file, without ever blocking.

    ``O_NONBLOCK`` makes opening a FIFO return at once (a plain open waits for a writer); the
    ``fstat`` of the opened descriptor then refuses it, a device or a directory, so no check
    races with the open. Every refusal is a ``CheckpointError`` naming the file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise file_error(path, "file does not exist") from None
    except IsADirectoryError:
        raise file_error(path, "is a folder, expected a file") from None
    except OSError as e:
        raise file_error(path, f"cannot be opened ({e.strerror or e})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            if stat.S_ISDIR(mode):
                raise file_error(path, "is a folder, expected a file")
            kind = next((name for test, name in _FILE_KINDS.items() if test(mode)), "a special file")
            raise file_error(path, f"is {kind}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The whole of a regular file of at most ``max_bytes`` bytes (read, not trusted from stat)."""
    chunks, total = [], 0
    with open_regular_file(path) as f:
        try:  # in 64 KiB reads: a single read(max_bytes) would allocate the bound up front
            while total <= max_bytes and (chunk := f.read(min(1 << 16, max_bytes + 1 - total))):
                chunks.append(chunk)
                total += len(chunk)
        except OSError as e:
            raise file_error(path, f"cannot be read ({e.strerror or e})") from None
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise file_error(path, f"is larger than {max_bytes} bytes; this is not the file expected here")
    return data


def parse_json(data: bytes, source: str | os.PathLike, expect: type | None = dict):
    """Decode UTF-8 JSON from ``source``; CheckpointError naming it on any failure.

    Duplicate keys are refused (two readers could pick different values), and so is a top
    level of another type than ``expect`` (None: any).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise file_error(source, f"is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_refuse_duplicates)
    except RecursionError:
        raise file_error(source, "JSON is nested too deeply") from None
    except CheckpointError as e:
        raise file_error(source, str(e)) from None
    except json.JSONDecodeError as e:
        problem = "is empty" if not text.strip() else f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        raise file_error(source, problem) from None
    except ValueError as e:  # e.g. an integer literal beyond Python's digit limit
        raise file_error(source, f"is not valid JSON ({e})") from None
    if expect is not None and not isinstance(value, expect):
        raise file_error(source, f"top level is a JSON {_json_type(value)}, expected a JSON {_json_type(expect())}")
    return value


def read_json(path: str | os.PathLike, max_bytes: int = MAX_CONFIG_BYTES, expect: type | None = dict):
    """Read a JSON file (``expect``: the top-level type, a dict by default), refused by name if bad."""
    return parse_json(read_bytes(path, max_bytes), path, expect)


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise CheckpointError(f"key {quoted(key)} appears twice")
        out[key] = value
    return out


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def inside(path: Path, roots: list[Path]) -> bool:
    """Whether ``path``, with every symlink resolved, lies inside one of ``roots`` (resolved)."""
    real = path.resolve()
    return any(real == r or r in real.parents for r in roots)


def source_roots(folder: Path) -> list[Path]:
    """Where files of ``folder`` may really live: the folder, and for a Hugging Face Hub snapshot
    (``…/models--o--n/snapshots/<rev>``, whose files are symlinks into ``../../blobs``) that
    repository's blob store."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots
