"""Read a single tensor from a ``torch.save`` zip archive without torch.

Voxtral ships its preset voices as ``voice_embedding/<voice>.pt``: a zip archive
``<prefix>/data.pkl`` + ``<prefix>/data/<key>`` (+ ``byteorder``, ``version``, ...) whose pickle
rebuilds ONE BF16 tensor. The file may be hostile (it comes with a downloaded release), so every
layer is bounded and checked before the next one runs:

1. the path must be a regular file (a FIFO is never opened blocking), at most the tensor's byte
   budget plus 1 MiB;
2. the zip's central directory is read through a byte budget, then every entry is checked:
   no duplicates, no absolute or ``..`` names, not encrypted, stored or deflated only;
3. entries are read through a bounded read (``limit + 1`` bytes at most), so a zip bomb or a
   lying declared size is refused after reading little;
4. ``data.pkl`` (at most 64 KiB) is scanned opcode by opcode (``pickle_scan``) before unpickling;
5. the unpickler resolves only the globals tensor rebuilding needs, each to an immutable local
   stand-in (``__slots__``, frozen), and refuses everything else before it is called;
6. the rebuilt tensor is validated when built and again before its bytes are read.

Every failure is a ``PtFormatError``, a ``CheckpointError``: one bounded line naming the file.
"""

from __future__ import annotations

import errno
import io
import math
import os
import pickle
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .errors import CheckpointError, quoted
from .pickle_scan import BadPickle, RefusedPickle, check_tensor_pickle
from .untrusted_files import open_regular_file

# Default ceiling on the tensor's bytes when the caller does not know them; a real voice is
# <= 1.4 MB, and the converter passes the exact size (rows x dim x 2).
DEFAULT_MAX_BYTES = 64 << 20
_ARCHIVE_SLACK = 1 << 20  # zip headers, data.pkl and the small entries around the tensor
_MAX_DIRECTORY_BYTES = 256 << 10  # what zipfile may read to list the entries (torch's: < 1 KB)
_MAX_ENTRIES = 64  # torch writes 7 for one tensor
_MAX_PICKLE_BYTES = 64 << 10  # a tensor pickle is ~160 bytes
_MAX_SMALL_ENTRY = 16  # 'byteorder' holds "little", 'version' a number
_MAX_NDIM = 32
_MAX_DIM = 2**31 - 1  # MLX shapes are int32


class PtFormatError(CheckpointError):
    """A ``.pt`` file that is not a readable single-tensor archive (message names the file)."""


class UnsafePickleError(PtFormatError):
    """The archive's pickle names a global, or uses an opcode, that tensor rebuilding does not need."""


def _error(path: str, problem: str, kind: type[PtFormatError] = PtFormatError) -> PtFormatError:
    return kind(f"{path}: {problem}")


@dataclass(frozen=True, slots=True)
class _StorageType:
    # Stand-in for torch.<X>Storage: only records how to view the raw bytes. Slots: a pickle has
    # no __dict__ to write into (and the opcode scan refuses BUILD anyway).
    torch_name: str
    np_dtype: str  # little-endian numpy dtype of one element on disk
    mx_dtype: mx.Dtype


_STORAGE_TYPES = {
    # bfloat16 has no numpy dtype: read the raw 16-bit words and view them in MLX.
    "BFloat16Storage": _StorageType("torch.BFloat16Storage", "<u2", mx.bfloat16),
    "HalfStorage": _StorageType("torch.HalfStorage", "<f2", mx.float16),
    "FloatStorage": _StorageType("torch.FloatStorage", "<f4", mx.float32),
}
_SUPPORTED_DTYPES = "bfloat16, float16, float32"

# torch's other storage classes, so that an unsupported dtype is reported as such, not as an attack.
_UNSUPPORTED_STORAGES = {
    "DoubleStorage": "float64", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8", "QUInt8Storage": "quint8", "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}
_ALLOWED_GLOBALS = ["torch._utils._rebuild_tensor_v2", "collections.OrderedDict"] + [
    t.torch_name for t in _STORAGE_TYPES.values()
]


@dataclass(frozen=True, slots=True)
class _Storage:
    # What persistent_load hands back for ('storage', type, key, location, numel).
    storage_type: _StorageType
    entry: str
    numel: int


@dataclass(frozen=True, slots=True)
class _TensorSpec:
    # What the stand-in _rebuild_tensor_v2 returns; turned into an array afterwards.
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _PtUnpickler(pickle.Unpickler):
    """Unpickler that only knows how to rebuild a plain tensor."""

    def __init__(self, data: bytes, path: str, prefix: str, entries: dict[str, zipfile.ZipInfo], max_bytes: int):
        super().__init__(io.BytesIO(data))
        self._path = path
        self._prefix = prefix
        self._entries = entries
        self._max_bytes = max_bytes

    def find_class(self, module: str, name: str):
        # Called for every GLOBAL/STACK_GLOBAL opcode before anything is imported, so a refused
        # name never runs.
        full = f"{module}.{name}"
        if full == "torch._utils._rebuild_tensor_v2":
            return self._rebuild_tensor_v2
        if full == "collections.OrderedDict":
            return self._no_hooks
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        if module == "torch" and name in _UNSUPPORTED_STORAGES:
            raise _error(self._path, f"torch.{name}: dtype {_UNSUPPORTED_STORAGES[name]} is not "
                                     f"supported ({_SUPPORTED_DTYPES} are)")
        raise _error(self._path, f"refused global {quoted(full)} in the pickle; a tensor file may "
                                 f"only reference {_ALLOWED_GLOBALS}", UnsafePickleError)

    def persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise _error(self._path, f"unsupported persistent id {quoted(pid)}, expected a storage")
        _, storage_type, key, _location, numel = pid
        if type(key) is not str or not re.fullmatch(r"[0-9A-Za-z_]{1,64}", key):
            raise _error(self._path, f"invalid storage key {quoted(key)}")
        storage = _Storage(storage_type, f"{self._prefix}/data/{key}", numel)
        _check_storage(self._path, storage, self._entries, self._max_bytes)
        return storage

    def _no_hooks(self, *args):
        # The only OrderedDict in a tensor pickle is the empty backward-hooks argument: the same as none.
        if args:
            raise _error(self._path, f"unexpected OrderedDict arguments {quoted(args)}")
        return None

    def _rebuild_tensor_v2(self, storage, offset, shape, stride, requires_grad=False, hooks=None, metadata=None):
        if type(requires_grad) is not bool or hooks is not None or metadata is not None:
            raise _error(self._path, "tensor carries backward hooks or metadata, or an invalid requires_grad")
        spec = _TensorSpec(storage, offset, shape, stride)
        _check_spec(self._path, spec, self._entries, self._max_bytes)
        return spec


def _is_index(value) -> bool:
    return type(value) is int and value >= 0


def _check_storage(path: str, storage, entries: dict[str, zipfile.ZipInfo], max_bytes: int) -> None:
    if type(storage) is not _Storage:
        raise _error(path, f"tensor rebuilt from {quoted(storage)}, not from a storage entry")
    dtype = storage.storage_type
    if not any(dtype is known for known in _STORAGE_TYPES.values()):
        raise _error(path, f"persistent id names {quoted(dtype)}, not a storage type")
    if not _is_index(storage.numel):
        raise _error(path, f"invalid storage size {quoted(storage.numel)}")
    info = entries.get(storage.entry)
    if info is None:
        raise _error(path, f"storage entry {quoted(storage.entry)} is missing from the archive")
    nbytes = storage.numel * np.dtype(dtype.np_dtype).itemsize
    if nbytes > max_bytes:
        raise _error(path, f"storage {quoted(storage.entry)} claims {quoted(nbytes)} bytes, more than "
                           f"the {max_bytes} expected")
    if info.file_size != nbytes:
        raise _error(path, f"storage entry {quoted(storage.entry)} holds {info.file_size} bytes, "
                           f"expected {nbytes} ({storage.numel} x {dtype.torch_name})")


def _check_spec(path: str, spec, entries: dict[str, zipfile.ZipInfo], max_bytes: int) -> None:
    """Validate everything ``_materialize`` relies on: the storage, offset, shape and strides."""
    if type(spec) is not _TensorSpec:
        raise _error(path, f"the pickle holds a {type(spec).__name__}, expected exactly one tensor")
    _check_storage(path, spec.storage, entries, max_bytes)
    shape, stride, offset = spec.shape, spec.stride, spec.offset
    if type(shape) is not tuple or type(stride) is not tuple:
        raise _error(path, f"invalid tensor shape {quoted(shape)} / stride {quoted(stride)}")
    if len(shape) > _MAX_NDIM:
        raise _error(path, f"tensor has {len(shape)} dimensions, at most {_MAX_NDIM} are supported")
    if len(stride) != len(shape) or not all(_is_index(s) for s in shape + stride):
        raise _error(path, f"invalid tensor shape {quoted(shape)} / stride {quoted(stride)}")
    if any(size > _MAX_DIM for size in shape):
        raise _error(path, f"tensor shape {quoted(shape)} has a dimension above {_MAX_DIM}")
    if not _is_index(offset):
        raise _error(path, f"invalid storage offset {quoted(offset)}")
    if not _is_contiguous(shape, stride):
        raise _error(path, f"tensor with shape {quoted(shape)} and strides {quoted(stride)} is not "
                           "contiguous; save it with tensor.contiguous()")
    end = offset + math.prod(shape)  # Python ints: a shape like (2**32, 2**32) cannot wrap
    if end > spec.storage.numel:
        raise _error(path, f"tensor needs elements [{quoted(offset)}, {quoted(end)}) but its storage "
                           f"holds {spec.storage.numel}")


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    # Row-major check; like torch, the stride of a size-1 dimension does not matter.
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def read_pt_tensor(path: str | os.PathLike, max_bytes: int | None = None) -> mx.array:
    """Read the single tensor stored in a ``torch.save`` zip archive.

    Only plain contiguous tensors with bfloat16, float16 or float32 storage are supported; the
    dtype and shape (including a 0-dim shape ``()``) are preserved. The pickle may not reference
    anything beyond what rebuilding such a tensor needs, and nothing is allocated beyond
    ``max_bytes`` plus small fixed bounds, whatever the file declares.

    Args:
        path: The ``.pt`` file, e.g. ``voice_embedding/casual_male.pt``.
        max_bytes: The most bytes the tensor's data may hold, e.g. rows x dim x 2 for a voice
            known from ``tekken.json`` and ``params.json``. ``None``: ``DEFAULT_MAX_BYTES`` (64 MiB).

    Returns:
        The tensor as an ``mx.array`` with the stored shape and dtype.

    Raises:
        FileNotFoundError: If ``path`` does not exist (kept apart so callers can say "missing").
        UnsafePickleError: (a ``PtFormatError``) If the pickle names any other global, e.g.
            ``os.system``, or uses an opcode a tensor pickle never does, e.g. BUILD; nothing
            named in it is imported or called.
        PtFormatError: (a ``CheckpointError``, hence a ``ValueError``) For every other problem:
            not a regular file, not a readable zip archive, truncated or corrupt, larger than
            the bounds, odd zip entries, big-endian, not exactly one tensor, an unsupported
            dtype, or a non-contiguous tensor.
        ValueError: If ``max_bytes`` is not a non-negative int (a caller's mistake).
    """
    path = os.fspath(path)
    if max_bytes is None:
        max_bytes = DEFAULT_MAX_BYTES
    if not _is_index(max_bytes):
        raise ValueError(f"max_bytes must be a non-negative int or None, got {quoted(max_bytes)}")
    with _open_regular_file(path) as file:
        try:
            return _read_archive(path, file, max_bytes)
        except PtFormatError:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, ValueError,
                LookupError, TypeError, AttributeError, struct.error, OverflowError, MemoryError) as e:
            # What zipfile, zlib and numpy raise for damaged data: CRC mismatches, truncation,
            # bad local headers. RuntimeError covers NotImplementedError and RecursionError.
            raise _error(path, f"not a readable torch.save zip archive ({type(e).__name__}: "
                               f"{quoted(str(e))})") from e


def _open_regular_file(path: str):
    """``untrusted_files.open_regular_file`` (never blocks on a FIFO; refuses anything but a
    regular file), its refusals as ``PtFormatError``; a missing file stays FileNotFoundError."""
    try:
        return open_regular_file(path)
    except CheckpointError as e:
        if not os.path.lexists(path):
            raise FileNotFoundError(errno.ENOENT, "No such tensor file", path) from None
        raise PtFormatError(str(e)) from None


class _DirectoryBudget:
    """A binary file whose reads count against ``budget`` bytes until it is set to None.

    zipfile reads the whole central directory, one record per entry for as many entries as the
    end record declares, while the ``ZipFile`` is built; budgeting those reads bounds the entry
    list before it is allocated.
    """

    def __init__(self, file, budget: int, path: str):
        self._file, self.budget, self._path = file, budget, path

    def read(self, n: int = -1) -> bytes:
        if self.budget is None:
            return self._file.read(n)
        data = self._file.read(self.budget + 1 if n is None or n < 0 else min(n, self.budget + 1))
        self.budget -= len(data)
        if self.budget < 0:
            raise _error(self._path, f"the zip directory needs more than {_MAX_DIRECTORY_BYTES} "
                                     "bytes; a tensor archive's is under 1 KB")
        return data

    def seek(self, *args) -> int:
        return self._file.seek(*args)

    def tell(self) -> int:
        return self._file.tell()

    def seekable(self) -> bool:
        return True


def _read_archive(path: str, file, max_bytes: int) -> mx.array:
    size = os.fstat(file.fileno()).st_size
    if size > max_bytes + _ARCHIVE_SLACK:
        raise _error(path, f"is {size} bytes; a tensor of at most {max_bytes} bytes needs at most "
                           f"{max_bytes + _ARCHIVE_SLACK}")
    # Finding the end record reads at most its 22 bytes + a 64 KiB comment (+ 76 for zip64).
    budgeted = _DirectoryBudget(file, (64 << 10) + 22 + 76 + _MAX_DIRECTORY_BYTES, path)
    with zipfile.ZipFile(budgeted) as zf:
        budgeted.budget = None  # listed; each entry is read through its own bound below
        entries = _check_entries(path, zf.infolist())
        prefix = _find_prefix(path, list(entries))

        if f"{prefix}/byteorder" in entries:
            order = _read_entry(path, zf, entries[f"{prefix}/byteorder"], _MAX_SMALL_ENTRY)
            if order.strip() != b"little":
                raise _error(path, f"byteorder {quoted(order.decode('ascii', 'replace').strip())} "
                                   "is not supported, only 'little'")
        if f"{prefix}/version" in entries:
            version = _read_entry(path, zf, entries[f"{prefix}/version"], _MAX_SMALL_ENTRY)
            if not version.strip().isdigit():
                raise _error(path, f"version entry holds {quoted(version)}, not a format number")

        pickled = _read_entry(path, zf, entries[f"{prefix}/data.pkl"], _MAX_PICKLE_BYTES)
        try:
            check_tensor_pickle(pickled)
        except RefusedPickle as e:
            raise _error(path, str(e), UnsafePickleError) from None
        except BadPickle as e:
            raise _error(path, f"malformed tensor pickle ({e})") from None
        try:
            obj = _PtUnpickler(pickled, path, prefix, entries, max_bytes).load()
        except PtFormatError:
            raise
        except (pickle.UnpicklingError, ValueError, EOFError, TypeError, LookupError,
                AttributeError, struct.error, OverflowError, RecursionError, MemoryError) as e:
            # Malformed opcodes, or stand-ins called with the wrong arguments.
            raise _error(path, f"malformed tensor pickle ({type(e).__name__}: {quoted(str(e))})") from e
        return _materialize(path, zf, obj, entries, max_bytes)


def _check_entries(path: str, infos: list[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
    """The archive's entries by name, after refusing whatever torch.save never writes."""
    if len(infos) > _MAX_ENTRIES:
        raise _error(path, f"the archive has {len(infos)} entries; a tensor archive has at most {_MAX_ENTRIES}")
    entries = {}
    for info in infos:
        name = quoted(info.orig_filename)
        if info.orig_filename != info.filename:
            raise _error(path, f"zip entry {name} has a NUL byte in its name")
        if info.filename in entries:
            raise _error(path, f"zip entry {name} appears twice")
        if re.match(r"[/\\]|[A-Za-z]:", info.filename):
            raise _error(path, f"zip entry {name} has an absolute name")
        if ".." in re.split(r"[/\\]", info.filename):
            raise _error(path, f"zip entry {name} has a '..' component")
        if info.flag_bits & 0x1:
            raise _error(path, f"zip entry {name} is encrypted")
        if info.flag_bits & 0x60:
            raise _error(path, f"zip entry {name} uses patch data or strong encryption (flags {info.flag_bits:#x})")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _error(path, f"zip entry {name} uses compression method {info.compress_type}; only "
                               "stored (0) and deflated (8) are supported")
        entries[info.filename] = info
    return entries


def _find_prefix(path: str, names: list[str]) -> str:
    # torch names the top folder after the file (or "archive"); it is not fixed.
    prefixes = sorted({n[: -len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1})
    if len(prefixes) != 1:
        raise _error(path, f"expected exactly one '<prefix>/data.pkl' in the archive, found "
                           f"{quoted(prefixes) if prefixes else 'none'}")
    return prefixes[0]


def _read_entry(path: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    # Declared sizes can lie, so the read is bounded too: a deflate bomb stops after limit + 1
    # bytes. Reading to the end of the entry makes zipfile check its CRC.
    if info.file_size > limit:
        raise _error(path, f"zip entry {quoted(info.filename)} is {info.file_size} bytes, more than "
                           f"the {limit} allowed")
    with zf.open(info) as entry:
        data = entry.read(limit + 1)
    if len(data) != info.file_size:
        raise _error(path, f"zip entry {quoted(info.filename)} holds more or fewer bytes than its "
                           f"declared {info.file_size}")
    return data


def _materialize(path: str, zf: zipfile.ZipFile, spec: _TensorSpec, entries, max_bytes: int) -> mx.array:
    # Again, right before use: nothing that reaches the bytes below is unvalidated.
    _check_spec(path, spec, entries, max_bytes)
    dtype = spec.storage.storage_type
    raw = _read_entry(path, zf, entries[spec.storage.entry], max_bytes)
    flat = np.frombuffer(raw, dtype=dtype.np_dtype)
    values = flat[spec.offset : spec.offset + math.prod(spec.shape)].reshape(spec.shape)
    # A C-ordered copy in native byte order for MLX (the file is little-endian; so is every MLX
    # host). astype keeps a 0-dim shape, where np.ascontiguousarray would make it (1,).
    values = values.astype(values.dtype.newbyteorder("="), order="C")
    out = mx.array(values)
    return out.view(dtype.mx_dtype) if dtype.mx_dtype == mx.bfloat16 else out
