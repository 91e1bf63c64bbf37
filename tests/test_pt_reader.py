"""Tests for mlx_speech.pt_reader: torch-free, pickle-safe reading of voice .pt files."""

import os
import pickle
import struct
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import GOLDEN

from mlx_speech.pt_reader import PtFormatError, UnsafePickleError, read_pt_tensor

VOICES = GOLDEN / "tiny-voxtral" / "voice_embedding"



# --- a tiny pickle writer (protocol-2 opcodes), so tests need neither torch nor its classes ---

def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _int_tuple(values) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"


def _tensor_ops(storage: str, key: str, numel: int, offset: int, shape, stride) -> bytes:
    """Opcodes that torch.save writes for one tensor (without PROTO/STOP)."""
    persistent_id = (
        b"(" + _str("storage") + _global("torch", storage) + _str(key) + _str("cpu") + _int(numel) + b"t"
    )
    hooks = _global("collections", "OrderedDict") + b")R"
    return (
        _global("torch._utils", "_rebuild_tensor_v2")
        + b"(" + persistent_id + b"Q" + _int(offset) + _int_tuple(shape) + _int_tuple(stride)
        + b"\x89" + hooks + b"t"
        + b"R"
    )


def _pickle(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def _write_pt(path: Path, pkl: bytes, data: dict[str, bytes], prefix="archive", byteorder: str | None = "little"):
    """Write a zip laid out like torch.save's: <prefix>/data.pkl, <prefix>/data/<key>, byteorder."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", pkl)
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, raw in data.items():
            zf.writestr(f"{prefix}/data/{key}", raw)
        zf.writestr(f"{prefix}/version", "3\n")
    return path


def _float_pt(path: Path, values: np.ndarray, offset=0, shape=None, stride=None, **kw) -> Path:
    values = np.ascontiguousarray(values, dtype="<f4").ravel()
    shape = tuple(values.shape) if shape is None else shape
    if stride is None:
        stride = tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))
    pkl = _pickle(_tensor_ops("FloatStorage", "0", values.size, offset, shape, stride))
    return _write_pt(path, pkl, {"0": values.tobytes()}, **kw)


# --- golden files ---

@pytest.mark.parametrize("voice, shape", [("casual_male", (7, 64)), ("neutral_female", (4, 64))])
def test_golden_voice_shape_and_dtype(voice, shape):
    emb = read_pt_tensor(VOICES / f"{voice}.pt")
    assert emb.shape == shape
    assert emb.dtype == mx.bfloat16


def test_golden_voice_values_match_reference_harness():
    # cases.safetensors was written by the torch harness from the same .pt (upcast to fp32).
    ref = mx.load(str(GOLDEN / "cases.safetensors"))["g1_e2e/voice_embedding"]
    emb = read_pt_tensor(VOICES / "casual_male.pt")
    assert ref.dtype == mx.float32
    np.testing.assert_array_equal(np.array(emb.astype(mx.float32)), np.array(ref))


def test_golden_bf16_bits_are_the_raw_buffer():
    # Independent of the pickle path: the BF16 words are the zip entry's bytes verbatim.
    with zipfile.ZipFile(VOICES / "neutral_female.pt") as zf:
        raw = np.frombuffer(zf.read("neutral_female/data/0"), dtype="<u2").reshape(4, 64)
    emb = read_pt_tensor(VOICES / "neutral_female.pt")
    np.testing.assert_array_equal(np.array(emb.view(mx.uint16)), raw)


# --- hand-built archives ---

def test_float32_roundtrip_with_custom_prefix(tmp_path):
    values = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    path = _float_pt(tmp_path / "t.pt", values, shape=(3, 4), prefix="voice_embed")
    out = read_pt_tensor(path)
    assert out.dtype == mx.float32
    np.testing.assert_array_equal(np.array(out), values)


def test_float16_and_bfloat16_storages(tmp_path):
    half = (np.arange(6, dtype=np.float16) - 2.5).reshape(2, 3)
    pkl = _pickle(_tensor_ops("HalfStorage", "7", 6, 0, (2, 3), (3, 1)))
    out = read_pt_tensor(_write_pt(tmp_path / "h.pt", pkl, {"7": half.astype("<f2").tobytes()}))
    assert out.dtype == mx.float16
    np.testing.assert_array_equal(np.array(out), half)

    # bf16 = top 16 bits of fp32; these values are exactly representable.
    f32 = np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)
    words = (f32.view(np.uint32) >> 16).astype("<u2")
    pkl = _pickle(_tensor_ops("BFloat16Storage", "0", 4, 0, (4,), (1,)))
    out = read_pt_tensor(_write_pt(tmp_path / "b.pt", pkl, {"0": words.tobytes()}))
    assert out.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(out.astype(mx.float32)), f32)


def test_storage_offset_is_honoured(tmp_path):
    storage = np.arange(10, dtype=np.float32)
    path = _float_pt(tmp_path / "o.pt", storage, offset=2, shape=(2, 3), stride=(3, 1))
    np.testing.assert_array_equal(np.array(read_pt_tensor(path)), storage[2:8].reshape(2, 3))


def test_size_one_dims_ignore_stride(tmp_path):
    storage = np.arange(4, dtype=np.float32)
    path = _float_pt(tmp_path / "s.pt", storage, shape=(1, 4), stride=(99, 1))
    np.testing.assert_array_equal(np.array(read_pt_tensor(path)), storage.reshape(1, 4))


def test_transposed_strides_are_refused(tmp_path):
    # A (3, 2) view of a (2, 3) storage, as x.t() would save it.
    path = _float_pt(tmp_path / "t.pt", np.arange(6, dtype=np.float32), shape=(3, 2), stride=(1, 3))
    with pytest.raises(ValueError, match="not contiguous"):
        read_pt_tensor(path)


def test_tensor_larger_than_storage_is_refused(tmp_path):
    path = _float_pt(tmp_path / "big.pt", np.arange(6, dtype=np.float32), offset=3, shape=(2, 3), stride=(3, 1))
    with pytest.raises(ValueError, match="storage holds 6"):
        read_pt_tensor(path)


def test_storage_size_mismatch_is_refused(tmp_path):
    pkl = _pickle(_tensor_ops("FloatStorage", "0", 8, 0, (8,), (1,)))
    path = _write_pt(tmp_path / "m.pt", pkl, {"0": np.zeros(6, "<f4").tobytes()})
    with pytest.raises(ValueError, match="holds 24 bytes, expected 32"):
        read_pt_tensor(path)


def test_missing_storage_entry_is_refused(tmp_path):
    pkl = _pickle(_tensor_ops("FloatStorage", "5", 2, 0, (2,), (1,)))
    path = _write_pt(tmp_path / "k.pt", pkl, {"0": np.zeros(2, "<f4").tobytes()})
    with pytest.raises(ValueError, match="archive/data/5"):
        read_pt_tensor(path)


def test_big_endian_archive_is_refused(tmp_path):
    path = _float_pt(tmp_path / "be.pt", np.zeros(2, np.float32), byteorder="big")
    with pytest.raises(ValueError, match="byteorder 'big'"):
        read_pt_tensor(path)


def test_archive_without_byteorder_entry_reads_as_little_endian(tmp_path):
    values = np.array([1.5, -3.0], dtype=np.float32)
    path = _float_pt(tmp_path / "x.pt", values, byteorder=None)
    np.testing.assert_array_equal(np.array(read_pt_tensor(path)), values)


# --- refusals: unsafe or foreign pickles ---

def _assert_refused(path: Path, global_name: str):
    with pytest.raises(UnsafePickleError) as info:
        read_pt_tensor(path)
    message = str(info.value)
    assert global_name in message
    assert str(path) in message
    assert isinstance(info.value, ValueError)


def test_os_system_is_refused_and_not_run(tmp_path):
    sentinel = tmp_path / "pwned"
    body = _global("os", "system") + b"(" + _str(f"touch {sentinel}") + b"tR"
    path = _write_pt(tmp_path / "evil.pt", _pickle(body), {})
    _assert_refused(path, "os.system")
    assert not sentinel.exists()


def test_reduce_class_naming_os_system_is_refused(tmp_path):
    sentinel = tmp_path / "pwned2"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    path = _write_pt(tmp_path / "evil2.pt", pickle.dumps(Evil(), protocol=2), {})
    # os.system pickles under its defining module (posix on Linux and macOS).
    _assert_refused(path, f"{os.system.__module__}.system")
    assert not sentinel.exists()


def test_builtins_eval_is_refused(tmp_path):
    sentinel = tmp_path / "pwned3"
    code = f"open({str(sentinel)!r}, 'w')"
    body = _global("builtins", "eval") + b"(" + _str(code) + b"tR"
    _assert_refused(_write_pt(tmp_path / "eval.pt", _pickle(body), {}), "builtins.eval")
    assert not sentinel.exists()


def test_stack_global_protocol4_is_refused(tmp_path):
    # Protocol >= 4 names globals with STACK_GLOBAL instead of GLOBAL; same gate applies.
    path = _write_pt(tmp_path / "p4.pt", pickle.dumps(os.getcwd, protocol=4), {})
    _assert_refused(path, f"{os.getcwd.__module__}.getcwd")


def test_foreign_class_is_refused(tmp_path):
    body = _global("__main__", "Foo") + b")R"
    _assert_refused(_write_pt(tmp_path / "foo.pt", _pickle(body), {}), "__main__.Foo")


def test_other_storage_dtypes_are_unsupported_not_unsafe(tmp_path):
    # torch's own storage classes are harmless: the message is about the dtype, not an attack.
    pkl = _pickle(_tensor_ops("LongStorage", "0", 2, 0, (2,), (1,)))
    path = _write_pt(tmp_path / "long.pt", pkl, {"0": bytes(16)})
    with pytest.raises(PtFormatError, match=r"torch.LongStorage: dtype int64 is not supported "
                                            r"\(bfloat16, float16, float32 are\)") as info:
        read_pt_tensor(path)
    assert not isinstance(info.value, UnsafePickleError)
    assert str(path) in str(info.value)


def test_dict_of_tensors_is_refused(tmp_path):
    # A state_dict-style archive: {"w": tensor}. Only a single tensor is accepted.
    body = b"}" + _str("w") + _tensor_ops("FloatStorage", "0", 2, 0, (2,), (1,)) + b"s"
    path = _write_pt(tmp_path / "sd.pt", _pickle(body), {"0": np.zeros(2, "<f4").tobytes()})
    with pytest.raises(ValueError, match="holds a dict, expected exactly one tensor"):
        read_pt_tensor(path)


def test_plain_data_pickle_is_refused(tmp_path):
    path = _write_pt(tmp_path / "list.pt", pickle.dumps([1, 2, 3], protocol=2), {})
    with pytest.raises(ValueError, match="holds a list"):
        read_pt_tensor(path)


# --- damaged files ---

def test_truncated_archive_is_refused(tmp_path):
    raw = (VOICES / "casual_male.pt").read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cut.pt") as info:
        read_pt_tensor(path)
    assert isinstance(info.value, PtFormatError)


def test_corrupted_tensor_bytes_fail_the_crc(tmp_path):
    raw = bytearray((VOICES / "casual_male.pt").read_bytes())
    with zipfile.ZipFile(VOICES / "casual_male.pt") as zf:
        info = zf.getinfo("casual_male/data/0")
    # Data starts after the 30-byte local header, the name and the local extra field.
    header_extra = struct.unpack("<H", raw[info.header_offset + 28 : info.header_offset + 30])[0]
    start = info.header_offset + 30 + len(info.filename.encode()) + header_extra
    raw[start + 10] ^= 0xFF
    path = tmp_path / "flip.pt"
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="flip.pt"):
        read_pt_tensor(path)


def test_garbage_and_legacy_files_are_refused(tmp_path):
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps({"not": "a zip"}))
    with pytest.raises(ValueError, match="legacy.pt"):
        read_pt_tensor(path)


def test_archive_without_data_pkl_is_refused(tmp_path):
    path = tmp_path / "empty.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x/data/0", b"\0" * 4)
    with pytest.raises(ValueError, match="data.pkl"):
        read_pt_tensor(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_pt_tensor(tmp_path / "nope.pt")
