"""Read a single tensor from a ``torch.save`` zip archive without torch.

Voxtral ships its preset voices as ``voice_embedding/<voice>.pt``: a zip archive
``<prefix>/data.pkl`` + ``<prefix>/data/<key>`` (+ ``byteorder``, ``version``, ...)
whose pickle rebuilds ONE BF16 tensor. Unpickling an untrusted file can run
arbitrary code, so the pickle is read by an unpickler that resolves only the few
globals tensor rebuilding needs, each to a harmless local stand-in, and refuses
everything else before it is called.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass

import mlx.core as mx
import numpy as np


class PtFormatError(ValueError):
    """A ``.pt`` file that is not a readable single-tensor archive (message names the file)."""


class UnsafePickleError(PtFormatError):
    """The archive's pickle names a global that tensor rebuilding does not need."""


@dataclass(frozen=True)
class _StorageType:
    # Stand-in for torch.<X>Storage: only records how to view the raw bytes.
    torch_name: str
    np_dtype: str  # little-endian numpy dtype of one element on disk
    mx_dtype: mx.Dtype


_STORAGE_TYPES = {
    # bfloat16 has no numpy dtype: read the raw 16-bit words and view them in MLX.
    "BFloat16Storage": _StorageType("torch.BFloat16Storage", "<u2", mx.bfloat16),
    "HalfStorage": _StorageType("torch.HalfStorage", "<f2", mx.float16),
    "FloatStorage": _StorageType("torch.FloatStorage", "<f4", mx.float32),
}


@dataclass(frozen=True)
class _Storage:
    # What persistent_load hands back for ('storage', type, key, location, numel).
    storage_type: _StorageType
    entry: str
    numel: int


@dataclass(frozen=True)
class _TensorSpec:
    # What the stand-in _rebuild_tensor_v2 returns; turned into an array afterwards.
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _PtUnpickler(pickle.Unpickler):
    """Unpickler that only knows how to rebuild a plain tensor."""

    def __init__(self, file, path: str, prefix: str, entries: dict[str, zipfile.ZipInfo]):
        super().__init__(file)
        self._path = path
        self._prefix = prefix
        self._entries = entries

    def find_class(self, module: str, name: str):
        # Called for every GLOBAL/STACK_GLOBAL/INST/OBJ/EXT opcode, before anything is
        # imported, so a refused name never runs.
        full = f"{module}.{name}"
        if full == "torch._utils._rebuild_tensor_v2":
            return self._rebuild_tensor_v2
        if full == "collections.OrderedDict":
            return self._empty_ordered_dict
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        allowed = ["torch._utils._rebuild_tensor_v2", "collections.OrderedDict"] + [
            t.torch_name for t in _STORAGE_TYPES.values()
        ]
        raise UnsafePickleError(
            f"{self._path}: refused global {full!r} in the pickle; a tensor file may only "
            f"reference {allowed}"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise PtFormatError(f"{self._path}: unsupported persistent id {pid!r}, expected a storage")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise PtFormatError(f"{self._path}: persistent id names {storage_type!r}, not a storage type")
        if not isinstance(key, str) or not re.fullmatch(r"[0-9A-Za-z_]+", key):
            raise PtFormatError(f"{self._path}: invalid storage key {key!r}")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise PtFormatError(f"{self._path}: invalid storage size {numel!r}")
        entry = f"{self._prefix}/data/{key}"
        info = self._entries.get(entry)
        if info is None:
            raise PtFormatError(f"{self._path}: storage entry {entry!r} is missing from the archive")
        nbytes = numel * np.dtype(storage_type.np_dtype).itemsize
        if info.file_size != nbytes:
            raise PtFormatError(
                f"{self._path}: storage entry {entry!r} holds {info.file_size} bytes, expected "
                f"{nbytes} ({numel} x {storage_type.torch_name})"
            )
        return _Storage(storage_type, entry, numel)

    def _rebuild_tensor_v2(self, storage, offset, shape, stride, requires_grad=False, hooks=None, metadata=None):
        if not isinstance(storage, _Storage):
            raise PtFormatError(f"{self._path}: tensor rebuilt from {storage!r}, not from a storage entry")
        if not _is_int_tuple(shape) or not _is_int_tuple(stride) or len(shape) != len(stride):
            raise PtFormatError(f"{self._path}: invalid tensor shape {shape!r} / stride {stride!r}")
        if not isinstance(offset, int) or offset < 0 or any(s < 0 for s in shape):
            raise PtFormatError(f"{self._path}: invalid storage offset {offset!r} or shape {shape!r}")
        if hooks:
            raise PtFormatError(f"{self._path}: tensor carries backward hooks {hooks!r}; refusing")
        return _TensorSpec(storage, offset, tuple(shape), tuple(stride))

    def _empty_ordered_dict(self, *args):
        # The only OrderedDict in a tensor pickle is the (empty) backward-hooks argument.
        if args:
            raise PtFormatError(f"{self._path}: unexpected OrderedDict arguments {args!r}")
        return {}


def _is_int_tuple(value) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    # Row-major check; like torch, the stride of a size-1 dimension does not matter.
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _find_prefix(path: str, names: list[str]) -> str:
    # torch names the top folder after the file (or "archive"); it is not fixed.
    prefixes = sorted({n[: -len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1})
    if len(prefixes) != 1:
        raise PtFormatError(
            f"{path}: expected exactly one '<prefix>/data.pkl' in the archive, found {prefixes or 'none'}"
        )
    return prefixes[0]


def read_pt_tensor(path: str | os.PathLike) -> mx.array:
    """Read the single tensor stored in a ``torch.save`` zip archive.

    Only plain contiguous tensors with bfloat16, float16 or float32 storage are
    supported; the dtype is preserved. The pickle is never allowed to reference
    anything beyond what rebuilding such a tensor needs.

    Args:
        path: The ``.pt`` file, e.g. ``voice_embedding/casual_male.pt``.

    Returns:
        The tensor as an ``mx.array`` with the stored shape and dtype.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        UnsafePickleError: (a ``ValueError``) If the pickle names any other global,
            e.g. ``os.system``; nothing named in it is imported or called.
        ValueError: If the file is not a readable torch zip archive, is truncated or
            corrupt, is big-endian, holds anything but one tensor, or the tensor is
            non-contiguous.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such tensor file: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            return _read_archive(path, zf)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        # BadZipFile covers a missing central directory (truncation) and CRC mismatches.
        raise PtFormatError(f"{path}: not a readable torch.save zip archive ({e})") from e


def _read_archive(path: str, zf: zipfile.ZipFile) -> mx.array:
    entries = {info.filename: info for info in zf.infolist()}
    prefix = _find_prefix(path, list(entries))

    byteorder = entries.get(f"{prefix}/byteorder")
    if byteorder is not None:
        order = zf.read(byteorder).decode("ascii", "replace").strip()
        if order != "little":
            raise PtFormatError(f"{path}: byteorder {order!r} is not supported, only 'little'")

    # zf.read checks the CRC of the whole entry; streaming would stop at STOP unchecked.
    pickled = io.BytesIO(zf.read(entries[f"{prefix}/data.pkl"]))
    unpickler = _PtUnpickler(pickled, path, prefix, entries)
    try:
        obj = unpickler.load()
    except PtFormatError:
        raise
    except (
        pickle.UnpicklingError, ValueError, EOFError, TypeError, KeyError, IndexError,
        AttributeError, struct.error, OverflowError, RecursionError,
    ) as e:
        # Malformed opcodes, or stand-ins called with the wrong arguments.
        raise PtFormatError(f"{path}: malformed tensor pickle ({type(e).__name__}: {e})") from e

    if not isinstance(obj, _TensorSpec):
        raise PtFormatError(f"{path}: the pickle holds a {type(obj).__name__}, expected exactly one tensor")
    return _materialize(path, zf, obj)


def _materialize(path: str, zf: zipfile.ZipFile, spec: _TensorSpec) -> mx.array:
    if not _is_contiguous(spec.shape, spec.stride):
        raise PtFormatError(
            f"{path}: tensor with shape {spec.shape} and strides {spec.stride} is not contiguous; "
            "save it with tensor.contiguous()"
        )
    numel = int(np.prod(spec.shape, dtype=np.int64))
    if spec.offset + numel > spec.storage.numel:
        raise PtFormatError(
            f"{path}: tensor needs elements [{spec.offset}, {spec.offset + numel}) but its storage "
            f"holds {spec.storage.numel}"
        )
    dtype = spec.storage.storage_type
    flat = np.frombuffer(zf.read(spec.storage.entry), dtype=dtype.np_dtype)
    values = flat[spec.offset : spec.offset + numel].reshape(spec.shape)
    # Native byte order for MLX (the file is little-endian; so is every MLX host).
    values = np.ascontiguousarray(values.astype(values.dtype.newbyteorder("=")))
    out = mx.array(values)
    return out.view(dtype.mx_dtype) if dtype.mx_dtype == mx.bfloat16 else out
