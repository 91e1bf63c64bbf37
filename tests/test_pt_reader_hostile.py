"""mlx_speech.pt_reader against hostile .pt files (review 2026-12: S4, S5, S9, C3, U2, U4).

Every file is built here byte by byte (no torch): pickles from opcodes, zips field by field, so
the tests can write what torch and zipfile's writer never would.
"""

import os
import pickletools
import struct
import threading
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import GOLDEN
from test_pt_reader import _global, _int, _int_tuple, _pickle, _str, _tensor_ops

from mlx_speech import pt_reader
from mlx_speech.errors import CheckpointError
from mlx_speech.pickle_scan import ALLOWED_OPCODES, MAX_MEMO_INDEX, RefusedPickle, check_tensor_pickle
from mlx_speech.pt_reader import PtFormatError, UnsafePickleError, read_pt_tensor

VOICES = GOLDEN / "tiny-voxtral" / "voice_embedding"
MiB = 1 << 20


def _long(i: int) -> bytes:
    """LONG1: how protocol 2 pickles an int beyond 32 bits."""
    data = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def _zip(entries: list[dict]) -> bytes:
    """A zip archive written field by field. Each entry: name (str or bytes), payload (the bytes
    as stored, already deflated for method 8) and optionally method, flags, size (the declared
    uncompressed size) and crc, so a test can set what zipfile's writer would refuse to."""
    out, central = bytearray(), bytearray()
    for e in entries:
        name = e["name"].encode() if isinstance(e["name"], str) else e["name"]
        payload = e["payload"]
        method, flags = e.get("method", 0), e.get("flags", 0)
        size, crc = e.get("size", len(payload)), e.get("crc", zlib.crc32(payload))
        common = struct.pack("<HHHHIIIH", flags, method, 0, 0x21, crc, len(payload), size, len(name))
        central += b"PK\x01\x02" + struct.pack("<HH", 20, 20) + common + struct.pack("<HHHHII", 0, 0, 0, 0, 0, len(out)) + name
        out += b"PK\x03\x04" + struct.pack("<H", 20) + common + struct.pack("<H", 0) + name + payload
    n = len(entries)
    return bytes(out + central + b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, n, n, len(central), len(out), 0))


def _deflated_zeros(mib: int) -> bytes:
    """A raw deflate stream of ``mib`` MiB of zeros, ~1 KB per MiB, without compressing them all:
    after a full flush the compressor starts afresh, so every 1 MiB block encodes the same."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    return block * mib + c.flush()


def _tensor_pickle(storage="FloatStorage", numel=1, shape=(1,), stride=(1,)) -> bytes:
    return _pickle(_tensor_ops(storage, "0", numel, 0, shape, stride))


def _archive(tmp_path: Path, name: str, pkl: bytes, storage: bytes = b"", extra: list[dict] = ()) -> Path:
    """A minimal torch-style archive, written with _zip: a/data.pkl, a/data/0, then ``extra``."""
    path = tmp_path / name
    entries = [{"name": "a/data.pkl", "payload": pkl}, {"name": "a/data/0", "payload": storage}]
    path.write_bytes(_zip(entries + list(extra)))
    return path


def _refusal(path, **kw) -> str:
    """read_pt_tensor's message for ``path``, which must be one bounded line naming the file."""
    with pytest.raises(PtFormatError) as info:
        read_pt_tensor(path, **kw)
    message = str(info.value)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, ValueError)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message and len(message) < len(str(path)) + 320, message[:500]
    return message


def _peak_bytes_while(fn) -> int:
    """Peak Python-heap bytes (tracemalloc: bytes, bytearrays, numpy buffers, the unpickler's
    memo) allocated while ``fn`` runs: a structural bound on what a read allocates."""
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def _golden_bits(voice="neutral_female") -> np.ndarray:
    return np.array(read_pt_tensor(VOICES / f"{voice}.pt").view(mx.uint16))


# --- S4: opcode allowlist, checked before unpickling ---

def test_golden_pickles_use_only_allowed_opcodes():
    # The allowlist is what real torch.save output needs, no less.
    for pt in sorted(VOICES.glob("*.pt")):
        with zipfile.ZipFile(pt) as zf:
            data = zf.read(f"{pt.stem}/data.pkl")
        used = {op.name for op, _, _ in pickletools.genops(data)}
        assert used <= ALLOWED_OPCODES, used - ALLOWED_OPCODES
        check_tensor_pickle(data)


def test_build_poison_is_refused_and_later_reads_are_unchanged(tmp_path):
    # The review's repro: BUILD on the BFloat16Storage stand-in set np_dtype to '>u2', so every
    # later bf16 voice read came out byte-swapped.
    poison = _global("torch", "BFloat16Storage") + b"}" + _str("np_dtype") + _str(">u2") + b"sb0"
    tensor = _tensor_ops("FloatStorage", "0", 1, 0, (1,), (1,))
    path = _archive(tmp_path, "poison.pt", _pickle(poison + tensor), bytes(4))
    before = _golden_bits()
    message = _refusal(path)
    assert "EMPTY_DICT" in message  # the first opcode outside the allowlist, before BUILD runs
    np.testing.assert_array_equal(_golden_bits(), before)

    # BUILD straight on the stand-in (no dict opcodes), and on the tensor spec after validation.
    for n, body in enumerate([
        _global("torch", "BFloat16Storage") + _global("torch", "FloatStorage") + b"b0" + tensor,
        tensor + _global("torch", "FloatStorage") + b"b",
    ]):
        path = _archive(tmp_path, f"build{n}.pt", _pickle(body), bytes(4))
        with pytest.raises(UnsafePickleError, match="refused pickle opcode BUILD"):
            read_pt_tensor(path)
    np.testing.assert_array_equal(_golden_bits(), before)


def test_stand_ins_are_immutable_slots():
    # Even if a write opcode got through, there is no __dict__ to write into and no field to set.
    for stand_in in pt_reader._STORAGE_TYPES.values():
        assert not hasattr(stand_in, "__dict__")
        with pytest.raises(AttributeError):
            stand_in.np_dtype = ">u2"
    for cls in (pt_reader._StorageType, pt_reader._Storage, pt_reader._TensorSpec):
        assert "__slots__" in vars(cls)


def test_materialize_validates_again(tmp_path):
    # A spec whose fields changed after it was built (what BUILD used to do) is refused before
    # any bytes are read.
    values = np.arange(4, dtype="<f4")
    path = _archive(tmp_path, "ok.pt", _tensor_pickle(numel=4, shape=(4,)), values.tobytes())
    with zipfile.ZipFile(path) as zf:
        entries = {i.filename: i for i in zf.infolist()}
        storage = pt_reader._Storage(pt_reader._STORAGE_TYPES["FloatStorage"], "a/data/0", 4)
        good = pt_reader._TensorSpec(storage, 0, (4,), (1,))
        np.testing.assert_array_equal(np.array(pt_reader._materialize(str(path), zf, good, entries, 16)), values)
        for field, value in [("offset", 3), ("shape", (8,)), ("stride", (2,)), ("offset", -1),
                             ("storage", pt_reader._Storage(storage.storage_type, "a/data.pkl", 4))]:
            spec = pt_reader._TensorSpec(storage, 0, (4,), (1,))
            object.__setattr__(spec, field, value)
            with pytest.raises(PtFormatError):
                pt_reader._materialize(str(path), zf, spec, entries, 16)


REFUSED_OPCODES = {
    # opcode name: the bytes that start it (the scan refuses it before reading its argument)
    "BUILD": b"Nb", "INST": b"(ios\nsystem\n", "OBJ": b"(o", "NEWOBJ": b"\x81", "NEWOBJ_EX": b"\x92",
    "EXT1": b"\x82\x01", "EXT2": b"\x83\x01\x00", "EXT4": b"\x84\x01\x00\x00\x00",
    "SETITEM": b"s", "SETITEMS": b"(u", "APPEND": b"a", "APPENDS": b"(e", "ADDITEMS": b"\x90",
    "PERSID": b"P0\n", "BYTEARRAY8": b"\x96" + struct.pack("<Q", 2**62),
    "BINBYTES8": b"\x8e" + struct.pack("<Q", 2**62), "BINUNICODE8": b"\x8d" + struct.pack("<Q", 2**62),
    "LONG4": b"\x8b" + struct.pack("<i", 2**31 - 1), "POP": b"N0", "DUP": b"N2",
    "STRING": b"S'x'\n", "INT": b"I1\n", "GET": b"g0\n", "PUT": b"p0\n", "NEXT_BUFFER": b"\x97",
}


@pytest.mark.parametrize("opcode", sorted(REFUSED_OPCODES))
def test_refused_opcodes_name_the_opcode_and_file(tmp_path, opcode):
    body = _tensor_ops("FloatStorage", "0", 1, 0, (1,), (1,)) + REFUSED_OPCODES[opcode]
    path = _archive(tmp_path, f"{opcode}.pt", _pickle(body), bytes(4))
    with pytest.raises(UnsafePickleError):
        read_pt_tensor(path)
    assert f"refused pickle opcode {opcode} at byte " in _refusal(path)


def test_protocol4_tensor_pickle_reads(tmp_path):
    # torch.save(..., pickle_protocol=4) frames the same tensor and names globals by STACK_GLOBAL.
    def sg(module, name):
        return b"\x8c" + bytes([len(module)]) + module.encode() + b"\x94\x8c" + bytes([len(name)]) + name.encode() + b"\x94\x93"
    body = (sg("torch._utils", "_rebuild_tensor_v2") + b"((" + _str("storage") + sg("torch", "FloatStorage")
            + _str("0") + _str("cpu") + _int(2) + b"tQ" + _int(0) + _int_tuple((2,)) + _int_tuple((1,))
            + b"\x89" + sg("collections", "OrderedDict") + b")RtR.")
    pkl = b"\x80\x04\x95" + struct.pack("<Q", len(body)) + body
    values = np.array([2.5, -1.0], dtype="<f4")
    np.testing.assert_array_equal(np.array(read_pt_tensor(_archive(tmp_path, "p4.pt", pkl, values.tobytes()))), values)

    oversized = b"\x80\x04\x95" + struct.pack("<Q", 2**40) + body
    assert "FRAME" in _refusal(_archive(tmp_path, "frame.pt", oversized, values.tobytes()))


def test_malformed_pickles_are_format_errors(tmp_path):
    cases = {
        "nostop": _tensor_pickle()[:-1],
        "trailing": _tensor_pickle() + b"junk",
        "unknown": b"\x80\x02\xff.",
        "truncated_str": b"\x80\x02X\xff\xff\x00\x00ab.",
        "not_callable": b"\x80\x02" + _global("torch", "FloatStorage") + b")R.",
        "top_level_tuple": b"\x80\x02K\x01\x85.",
        "memo_miss": b"\x80\x02h\x05.",
    }
    for name, pkl in cases.items():
        _refusal(_archive(tmp_path, f"{name}.pt", pkl, bytes(4)))
    assert "holds a tuple, expected exactly one tensor" in _refusal(
        _archive(tmp_path, "tuple.pt", cases["top_level_tuple"], bytes(4)))


# --- S5: bounded memory, whatever the file declares ---

def _write_bombs(tmp: Path) -> dict[str, Path]:
    """The review's table of memory bombs (and a directory bomb), one file each, each under 1 MB."""
    zeros512 = _deflated_zeros(512)
    tensor = _tensor_pickle()
    numel = 128 * MiB  # 512 MiB of float32, shape (134217728,)
    big = _pickle(_tensor_ops("FloatStorage", "0", numel, 0, (numel,), (1,)))
    files = {
        # NONE, LONG_BINPUT 2**26, POP, then a normal tensor: CPython sized its memo by the index.
        "memo": _archive(tmp, "memo.pt", b"\x80\x02Nr" + struct.pack("<I", 2**26) + b"0" + tensor[2:], bytes(4)),
        # BYTEARRAY8 claiming 2**62 bytes: the C unpickler allocated them before reading.
        "bytearray8": _archive(tmp, "ba8.pt", b"\x80\x02\x96" + struct.pack("<Q", 2**62) + b"abc.", bytes(4)),
        # A 512 MiB byteorder entry.
        "byteorder": _archive(tmp, "byteorder.pt", tensor, bytes(4), extra=[
            {"name": "a/byteorder", "payload": zeros512, "method": 8, "size": 512 * MiB}]),
    }
    # data.pkl of 512 MiB, declared honestly and declared as 200 bytes (inflating stops there).
    for name, size in [("pickle", 512 * MiB), ("pickle_lying", 200)]:
        files[name] = tmp / f"{name}.pt"
        files[name].write_bytes(_zip([{"name": "a/data.pkl", "payload": zeros512, "method": 8, "size": size},
                                      {"name": "a/data/0", "payload": bytes(4)}]))
    # A 512 MiB storage whose sizes all agree: the review saw it accepted at +1.5 GiB.
    files["storage"] = tmp / "storage.pt"
    files["storage"].write_bytes(_zip([{"name": "a/data.pkl", "payload": big},
                                       {"name": "a/data/0", "payload": zeros512, "method": 8, "size": 512 * MiB}]))
    # 8000 empty entries (430 KB of directory): zipfile builds the whole entry list while opening the archive.
    files["directory"] = tmp / "entries.pt"
    files["directory"].write_bytes(_zip([{"name": f"a/x{i}", "payload": b""} for i in range(8000)]))
    return files


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    return _write_bombs(tmp_path_factory.mktemp("bombs"))


@pytest.mark.parametrize("bomb, problem", [
    ("memo", "memo index 67108864"),
    ("pickle", "more than the 65536 allowed"),
    ("pickle_lying", "not a readable torch.save zip archive"),
    ("storage", "more than the 67108864 expected"),
    ("byteorder", "more than the 16 allowed"),
    ("bytearray8", "refused pickle opcode BYTEARRAY8"),
    ("directory", "the zip directory needs more than"),
])
def test_memory_bombs_are_refused_cheaply(bombs, bomb, problem):
    assert bombs[bomb].stat().st_size < MiB  # each claims 512 MiB .. 2**62 bytes
    messages = []

    def read():
        with pytest.raises(PtFormatError) as info:
            read_pt_tensor(bombs[bomb])
        messages.append(str(info.value))

    peak = _peak_bytes_while(read)
    assert problem in messages[0]
    # The largest legitimate buffer here is the 256 KiB directory budget, or one compressed
    # read of ~520 KB; the unbounded reader allocated 512 MiB to 2**62 bytes for these.
    assert peak < 2 * MiB, f"{bomb}: {peak / MiB:.1f} MiB"


def test_memo_indices_are_bounded_at_the_limit():
    def put(index):
        return b"\x80\x02Nr" + struct.pack("<I", index) + b"."
    check_tensor_pickle(put(MAX_MEMO_INDEX - 1))
    with pytest.raises(RefusedPickle, match=f"memo index {MAX_MEMO_INDEX}"):
        check_tensor_pickle(put(MAX_MEMO_INDEX))


def test_many_entries_within_the_directory_budget_are_refused(tmp_path):
    path = tmp_path / "many.pt"
    path.write_bytes(_zip([{"name": f"a/x{i}", "payload": b""} for i in range(65)]))
    assert "65 entries" in _refusal(path)


def test_max_bytes_bounds_the_tensor_and_the_archive(tmp_path):
    exact = 7 * 64 * 2  # casual_male: 7 rows x dim 64 x bf16
    golden = VOICES / "casual_male.pt"
    assert read_pt_tensor(golden, max_bytes=exact).shape == (7, 64)
    assert f"more than the {exact - 2} expected" in _refusal(golden, max_bytes=exact - 2)

    # The file itself may not exceed the budget plus 1 MiB of zip structure.
    path = _archive(tmp_path, "padded.pt", _tensor_pickle(), bytes(4), extra=[
        {"name": "a/padding", "payload": bytes(2 * MiB)}])
    assert "bytes; a tensor of at most 1000 bytes needs at most" in _refusal(path, max_bytes=1000)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="max_bytes"):
            read_pt_tensor(golden, max_bytes=bad)


# --- S9: zip oddities ---

def _valid_entries(**first):
    pkl = _tensor_pickle()
    return [dict({"name": "a/data.pkl", "payload": pkl}, **first), {"name": "a/data/0", "payload": bytes(4)}]


@pytest.mark.parametrize("entries, problem", [
    ([{"name": "a/data.pkl", "payload": b"\x80\x02N."}] + _valid_entries(), "'a/data.pkl' appears twice"),
    (_valid_entries() + [{"name": "/etc/data.pkl", "payload": b""}], "absolute name"),
    (_valid_entries() + [{"name": "C:/x", "payload": b""}], "absolute name"),
    (_valid_entries() + [{"name": "../data.pkl", "payload": b""}], "'..' component"),
    (_valid_entries() + [{"name": "a/../../x", "payload": b""}], "'..' component"),
    (_valid_entries() + [{"name": b"a/data.pkl\0.txt", "payload": b""}], "NUL byte"),
    (_valid_entries(flags=0x1), "'a/data.pkl' is encrypted"),
    (_valid_entries(flags=0x40), "strong encryption"),
    (_valid_entries(method=98), "compression method 98; only stored (0) and deflated (8)"),
    (_valid_entries(method=12), "compression method 12"),  # bzip2 garbage raised OSError
])
def test_zip_oddities_are_refused(tmp_path, entries, problem):
    path = tmp_path / "odd.pt"
    path.write_bytes(_zip(entries))
    assert problem in _refusal(path)


def test_deflated_entries_still_read(tmp_path):
    # Not what torch writes, but a re-zipped voice folder is: deflate stays supported, bounded.
    values = np.array([1.0, 2.0], dtype="<f4")
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/data.pkl", _tensor_pickle(numel=2, shape=(2,)))
        zf.writestr("a/data/0", values.tobytes())
    np.testing.assert_array_equal(np.array(read_pt_tensor(path)), values)


# --- C3 / U2: one error type, bounded messages, dtype and file-kind messages ---

def test_error_types_are_checkpoint_errors():
    assert issubclass(PtFormatError, CheckpointError) and issubclass(UnsafePickleError, PtFormatError)


@pytest.mark.parametrize("storage, dtype", [
    ("DoubleStorage", "float64"), ("LongStorage", "int64"), ("BoolStorage", "bool"), ("ByteStorage", "uint8"),
])
def test_unsupported_dtypes_say_so(tmp_path, storage, dtype):
    path = _archive(tmp_path, "d.pt", _tensor_pickle(storage=storage), bytes(8))
    with pytest.raises(PtFormatError) as info:
        read_pt_tensor(path)
    assert not isinstance(info.value, UnsafePickleError)
    assert f"dtype {dtype} is not supported (bfloat16, float16, float32 are)" in _refusal(path)


def test_huge_shapes_are_refused_with_short_messages(tmp_path):
    big = 2**31 - 1
    cases = {
        # (2**32, 2**32) wrapped int64 to 0 elements: "cannot reshape array of size 0" before.
        "wrap": ((2**32, 2**32), (2**32, 1), "has a dimension above 2147483647"),
        "product": ((big,) * 3, (big * big, big, 1), f"needs elements [0, {big**3}) but its storage holds 1"),
        "ndim": ((1,) * 12000, (1,) * 12000, "tensor has 12000 dimensions, at most 32"),
        "ndim_big": ((1,) * 200_000, (1,) * 200_000, "more than the 65536 allowed"),  # was a 1.49 MB message
        "negative": ((-1, 2), (2, 1), "invalid tensor shape (-1, 2)"),
    }

    def tup(values):  # BININT1 where it fits, so 12 000 dimensions stay under the 64 KiB pickle bound
        return b"(" + b"".join(b"K" + bytes([v]) if 0 <= v < 256 else _long(v) for v in values) + b"t"

    for name, (shape, stride, problem) in cases.items():
        body = (_global("torch._utils", "_rebuild_tensor_v2") + b"((" + _str("storage") + _global("torch", "FloatStorage")
                + _str("0") + _str("cpu") + _int(1) + b"tQ" + _int(0) + tup(shape) + tup(stride) + b"\x89"
                + _global("collections", "OrderedDict") + b")RtR")
        assert problem in _refusal(_archive(tmp_path, f"{name}.pt", _pickle(body), bytes(4))), name


def test_long_untrusted_strings_are_cut_in_messages(tmp_path):
    key = "k" * 40_000
    body = _tensor_ops("FloatStorage", key, 1, 0, (1,), (1,))
    _refusal(_archive(tmp_path, "key.pt", _pickle(body), bytes(4)))
    _refusal(_archive(tmp_path, "glob.pt", _pickle(_global("os", "x" * 30_000) + b")R"), bytes(4)))
    entries = _valid_entries() + [{"name": "../" + "y" * 30_000, "payload": b""}]
    path = tmp_path / "name.pt"
    path.write_bytes(_zip(entries))
    _refusal(path)


def test_directory_and_devices_are_not_regular_files(tmp_path):
    (tmp_path / "x.pt").mkdir()
    assert "is a folder, expected a file" in _refusal(tmp_path / "x.pt")
    if os.path.exists("/dev/zero"):
        assert "is a character device, not a regular file" in _refusal("/dev/zero")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "x.pt"
    os.mkfifo(fifo)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(_refusal(fifo)), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # blocked in open(): give it a writer so the thread can end
        open(fifo, "wb").close()
        reader.join(10)
        pytest.fail("read_pt_tensor blocked opening a FIFO")
    assert outcome and "is a FIFO, not a regular file" in outcome[0]


# --- U4: a 0-dim tensor keeps shape () ---

def test_zero_dim_and_empty_tensors_keep_their_shape(tmp_path):
    f32 = np.array(2.5, dtype="<f4")
    path = _archive(tmp_path, "scalar.pt", _tensor_pickle(numel=1, shape=(), stride=()), f32.tobytes())
    out = read_pt_tensor(path)
    assert out.shape == () and out.dtype == mx.float32 and out.item() == 2.5

    bf16 = (np.array([-3.0], dtype=np.float32).view(np.uint32) >> 16).astype("<u2")
    path = _archive(tmp_path, "bscalar.pt", _tensor_pickle("BFloat16Storage", 1, (), ()), bf16.tobytes())
    out = read_pt_tensor(path)
    assert out.shape == () and out.dtype == mx.bfloat16 and out.astype(mx.float32).item() == -3.0

    path = _archive(tmp_path, "empty.pt", _tensor_pickle(numel=0, shape=(0, 64), stride=(64, 1)), b"")
    assert read_pt_tensor(path).shape == (0, 64)
