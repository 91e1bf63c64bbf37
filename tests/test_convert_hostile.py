"""The converter against hostile and damaged release folders: nothing escapes, nothing is deleted,
nothing allocates without bound, and every refusal is one CheckpointError line naming the file.

Each test builds its release from a copy of the golden tiny release (``hostile_files``) and drives
the real converter: the Python API, or ``python convert.py`` where the exit status matters.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import REPO, TINY
from hostile_files import (
    edit_json,
    listing,
    patch_pt_data,
    read_safetensors,
    release_copy,
    run_convert,
    traversal_release,
    write_safetensors,
)

from mlx_speech.convert import convert, main
from mlx_speech.errors import CheckpointError
from mlx_speech.folder_swap import FolderError

WEIGHTS = "consolidated.safetensors"


def _convert(src: Path, out: Path, **kw) -> Path:
    return convert(hf_path=str(src), mlx_path=str(out), dtype="float32", verbose=False, **kw)


def _refused(tmp_path: Path, src: Path, pattern: str, error=CheckpointError) -> str:
    """Convert ``src`` expecting a one-line refusal matching ``pattern``; nothing may be written."""
    before = listing(tmp_path)
    with pytest.raises(error, match=pattern) as e:
        _convert(src, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert len(str(e.value)) < 400
    assert listing(tmp_path) == before  # no output, no partial folder, nothing elsewhere
    return str(e.value)


# ---- S1: names from tekken.json are never paths ---------------------------------------------------

@pytest.mark.parametrize("name", ["../../ESCAPED", "/tmp/abs_voice", "sub/dir", "..", "a" * 300, "",
                                  "x.y", "nul\u0000", "voice name", "\u00e9t\u00e9"])
def test_path_like_voice_names_are_refused(tmp_path, name):
    src = release_copy(tmp_path)

    def edit(t):
        table = t["audio"]["voice_num_audio_tokens"]
        table[name] = table.pop("casual_male")

    edit_json(src / "tekken.json", edit)
    # What a traversal would read (release/voice_embedding/../../ESCAPED.pt) is a valid voice.
    (tmp_path / "ESCAPED.pt").write_bytes((src / "voice_embedding" / "casual_male.pt").read_bytes())
    message = _refused(tmp_path, src, "tekken.json: audio.voice_num_audio_tokens: .* is not a valid voice name")
    assert str(src / "tekken.json") in message
    assert not Path("/tmp/abs_voice.safetensors").exists()


def test_traversal_name_through_the_cli_writes_nothing_outside(tmp_path):
    src = traversal_release(tmp_path, "../../ESCAPED")
    before = listing(tmp_path)
    r = run_convert("--hf-path", str(src), "--mlx-path", str(tmp_path / "out"))
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "'../../ESCAPED' is not a valid voice name" in r.stderr
    assert "Traceback" not in r.stderr
    assert listing(tmp_path) == before
    assert not (tmp_path.parent / "ESCAPED.safetensors").exists()


def test_params_voice_names_are_checked_too(tmp_path):
    src = release_copy(tmp_path)
    edit_json(src / "params.json", lambda p: p["multimodal"]["audio_tokenizer_args"]["voice"].update({"../x": 2}))
    _refused(tmp_path, src, r"params\.json: multimodal\.audio_tokenizer_args\.voice: '\.\./x' is not a valid")


def test_voice_file_linking_out_of_the_release_is_refused(tmp_path):
    src = release_copy(tmp_path)
    outside = tmp_path / "elsewhere.pt"
    (src / "voice_embedding" / "casual_male.pt").rename(outside)
    (src / "voice_embedding" / "casual_male.pt").symlink_to(outside)
    _refused(tmp_path, src, r"casual_male\.pt: is a link to a place outside its model folder")


def test_voice_folder_linking_out_of_the_release_is_refused(tmp_path):
    src = release_copy(tmp_path)
    (src / "voice_embedding").rename(tmp_path / "voices_elsewhere")
    (src / "voice_embedding").symlink_to(tmp_path / "voices_elsewhere")
    _refused(tmp_path, src, r"is a link to a place outside its model folder")


def test_voice_link_inside_the_release_is_followed(tmp_path):
    """Links that stay inside the folder (as in a Hub snapshot's blobs) are fine."""
    src = release_copy(tmp_path)
    (src / "voice_embedding" / "casual_male.pt").rename(src / "blob")
    (src / "voice_embedding" / "casual_male.pt").symlink_to(src / "blob")
    out = _convert(src, tmp_path / "out")
    converted = mx.load(str(out / "voices" / "casual_male.safetensors"))["embedding"]
    assert converted.shape == (7, 64)


# ---- S2/U4: non-finite weights and voices ---------------------------------------------------------

def _rewrite_weights(src: Path, edit) -> None:
    weights = dict(mx.load(str(src / WEIGHTS)))
    edit(weights)
    (src / WEIGHTS).unlink()
    mx.save_safetensors(str(src / WEIGHTS), weights)


@pytest.mark.parametrize("name,value", [
    ("acoustic_transformer.acoustic_codebook_output.weight", math.nan),
    ("norm.weight", math.inf),
    ("layers.1.attention.wq.weight", -math.inf),
    ("audio_tokenizer.decoder_blocks.2.conv.parametrizations.weight.original1", math.nan),
])
def test_non_finite_weight_is_refused_by_name(tmp_path, name, value):
    src = release_copy(tmp_path)

    def edit(w):
        a = np.array(w[name].astype(mx.float32))
        a.flat[a.size // 2] = value  # one bad element is enough
        w[name] = mx.array(a).astype(w[name].dtype)

    _rewrite_weights(src, edit)
    _refused(tmp_path, src, rf"{WEIGHTS}: tensor {name.replace('.', '[.]')} holds NaN or infinite values;")


def test_weight_norm_that_folds_to_nan_is_refused(tmp_path):
    """A zero direction makes g·v/‖v‖ = 0/0: finite inputs, NaN weights; caught after the transform."""
    src = release_copy(tmp_path)
    name = "audio_tokenizer.decoder_blocks.0.conv.parametrizations.weight.original1"
    _rewrite_weights(src, lambda w: w.__setitem__(name, mx.zeros_like(w[name])))
    _refused(tmp_path, src, r"tensor audio_tokenizer\.decoder_blocks\.0\.conv\.weight holds NaN or infinite "
                            r"values after conversion")


def test_non_finite_voice_is_refused(tmp_path):
    src = release_copy(tmp_path)
    # 0x7FC0 is a bfloat16 NaN; the voice is stored as bfloat16 words.
    patch_pt_data(src / "voice_embedding" / "neutral_female.pt", lambda d: b"\xc0\x7f" + d[2:])
    _refused(tmp_path, src, r"neutral_female\.pt: voice embedding holds NaN or infinite values")


def test_voice_of_the_wrong_width_is_refused(tmp_path):
    src = release_copy(tmp_path)
    edit_json(src / "tekken.json", lambda t: t["audio"]["voice_num_audio_tokens"].update(casual_male=9))
    _refused(tmp_path, src, r"casual_male\.pt: .*(9|rows)")


# ---- S6: absurd sizes are refused before anything is allocated ------------------------------------

ABSURD_PARAMS = [
    (("n_layers",), 10**6, r"n_layers is 1000000; expected an integer from 1 to 256"),
    (("dim",), 10**9, r"dim is 1000000000"),
    (("vocab_size",), 1 << 40, r"vocab_size is"),
    (("n_heads",), 0, r"n_heads is 0"),
    (("dim",), 64.0, r"dim is 64\.0; expected an integer"),
    (("n_layers",), "2", r"n_layers is '2'"),
    (("n_layers",), 2.5, r"n_layers is 2\.5"),
    (("n_layers",), True, r"n_layers is True"),
    (("n_layers",), None, r"n_layers is None"),
    (("norm_eps",), "x", r"norm_eps is 'x'; expected a finite number"),
    (("norm_eps",), math.nan, r"norm_eps is nan"),
    (("norm_eps",), 0, r"norm_eps is 0"),
    (("rope_theta",), -1, r"rope_theta is -1"),
    (("max_seq_len",), 0, r"max_seq_len is 0"),
    (("multimodal", "audio_model_args", "acoustic_transformer_args", "n_layers"), 10**6,
     r"multimodal\.audio_model_args\.acoustic_transformer_args\.n_layers is 1000000"),
    (("multimodal", "audio_model_args", "semantic_codebook_size"), -5,
     r"multimodal\.audio_model_args\.semantic_codebook_size is -5"),
    (("multimodal", "audio_tokenizer_args", "decoder_transformer_lengths_str"), "1000000,2,2,2",
     r"decoder_transformer_lengths_str\[0\] is 1000000"),
    (("multimodal", "audio_tokenizer_args", "decoder_convs_strides_str"), "a,b",
     r"decoder_convs_strides_str is 'a,b'; expected comma-separated integers"),
    (("multimodal", "audio_tokenizer_args", "decoder_convs_kernels_str"), 3,
     r"decoder_convs_kernels_str is 3"),
    (("multimodal", "audio_tokenizer_args", "pretransform_patch_size"), 10**7,
     r"pretransform_patch_size is 10000000"),
    (("multimodal", "audio_tokenizer_args", "attn_sliding_window_size"), 10**12,
     r"attn_sliding_window_size is 1000000000000"),
    (("multimodal", "audio_tokenizer_args", "dim"), -1, r"multimodal\.audio_tokenizer_args\.dim is -1"),
    (("multimodal", "audio_tokenizer_args", "causal"), 1, r"causal is 1; only true"),
    (("multimodal",), [], r"multimodal is a JSON array, expected an object"),
    (("multimodal", "audio_model_args"), "x", r"multimodal\.audio_model_args is a JSON str"),
    (("n_kv_heads",), 3, r"n_heads must be a multiple of n_kv_heads"),
    (("multimodal", "audio_model_args", "n_acoustic_codebook"), 35,
     r"n_acoustic_codebook must be equal to multimodal\.audio_tokenizer_args\.acoustic_dim"),
]


@pytest.mark.parametrize("keys,value,pattern", ABSURD_PARAMS, ids=lambda v: str(v)[:40])
def test_absurd_or_mistyped_params_are_refused_naming_the_field(tmp_path, keys, value, pattern):
    src = release_copy(tmp_path)

    def edit(p):
        d = p
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    edit_json(src / "params.json", edit)
    message = _refused(tmp_path, src, pattern)
    assert message.startswith(str(src / "params.json") + ": ")


@pytest.mark.parametrize("keys", [("multimodal",), ("multimodal", "audio_model_args"),
                                  ("multimodal", "audio_tokenizer_args"),
                                  ("multimodal", "audio_model_args", "acoustic_transformer_args"),
                                  ("multimodal", "audio_model_args", "semantic_codebook_size"), ("dim",)])
def test_missing_section_or_field_is_named(tmp_path, keys):
    src = release_copy(tmp_path)

    def edit(p):
        d = p
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]

    edit_json(src / "params.json", edit)
    _refused(tmp_path, src, rf"params\.json: {'[.]'.join(keys)} is missing")


def test_a_million_layers_is_refused_with_little_memory(tmp_path):
    src = release_copy(tmp_path)
    edit_json(src / "params.json", lambda p: p.update(n_layers=10**6))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="n_layers is 1000000"):
            _convert(src, tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # the name table alone would take gigabytes


def test_header_far_from_the_config_is_refused_before_the_name_table(tmp_path, monkeypatch):
    """200 layers is within bounds, but the file has 2: refused by count, the table never built."""
    import mlx_speech.checkpoint as checkpoint

    src = release_copy(tmp_path)
    edit_json(src / "params.json", lambda p: p.update(n_layers=200))
    monkeypatch.setattr(checkpoint, "expected_tensors", lambda c: pytest.fail("name table built"))
    _refused(tmp_path, src, r"has 170 tensors but params\.json implies 1952")


# ---- C3/U1: malformed files, one line each --------------------------------------------------------

def _deep(n: int) -> str:
    return "[" * n + "]" * n


JSON_CASES = [
    ("params.json", b"{not json", r"params\.json: is not valid JSON"),
    ("params.json", b"", r"params\.json: is empty"),
    ("params.json", b"\xff\xfe{}", r"params\.json: is not UTF-8 text \(byte 0xff at offset 0\)"),
    ("params.json", b"[1, 2]", r"params\.json: top level is a JSON array, expected a JSON object"),
    ("params.json", _deep(200_000).encode(), r"params\.json: JSON is nested too deeply"),
    ("params.json", b'{"dim": 1, "dim": 2}', r"params\.json: key 'dim' appears twice"),
    ("params.json", b" " * (2 << 20), r"params\.json: is larger than"),
    ("tekken.json", b"{}", r"tekken\.json: "),
    ("tekken.json", b"[]", r"tekken\.json: "),
    ("tekken.json", b"\xff", r"tekken\.json: "),
    ("tekken.json", _deep(200_000).encode(), r"tekken\.json: "),
]


@pytest.mark.parametrize("name,content,pattern", JSON_CASES, ids=lambda v: str(v)[:30])
def test_malformed_json_is_one_line_naming_the_file(tmp_path, name, content, pattern):
    src = release_copy(tmp_path)
    (src / name).write_bytes(content)
    _refused(tmp_path, src, pattern)


@pytest.mark.parametrize("edit,pattern", [
    (lambda t: t.pop("config"), r"config"),
    (lambda t: t["vocab"].__setitem__(0, {"rank": 5}), r"vocab\[0\]"),
    (lambda t: t["vocab"].__setitem__(0, "x"), r"vocab\[0\]"),
    (lambda t: t.__setitem__("special_tokens", t["special_tokens"][:3]), r"tekken\.json"),
    (lambda t: t.__setitem__("audio", []), r"tekken\.json"),
    (lambda t: t["audio"]["voice_num_audio_tokens"].update(casual_male="7"), r"casual_male"),
])
def test_malformed_tekken_is_one_line_naming_the_file(tmp_path, edit, pattern):
    src = release_copy(tmp_path)
    edit_json(src / "tekken.json", edit)
    message = _refused(tmp_path, src, pattern)
    assert str(src / "tekken.json") in message


def _header_case(edit):
    """A consolidated.safetensors whose header ``edit`` damages (data left as it was)."""
    def apply(path: Path):
        header, data = read_safetensors(path)
        out = edit(header, data)
        if isinstance(out, tuple):
            write_safetensors(path, *out)
        else:
            write_safetensors(path, header if out is None else out, data)
    return apply


_FIRST = "norm.weight"


def _set(key, value):
    return _header_case(lambda h, d: h[_FIRST].__setitem__(key, value))


def _drop(key):
    return _header_case(lambda h, d: h[_FIRST].pop(key) and None)


def _overlap(h, d):
    a, b = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])[:2]
    size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
    start = h[a]["data_offsets"][0]
    if h[a]["data_offsets"][1] - start >= size:
        h[b]["data_offsets"] = [start, start + size]


def _raw(blob: bytes, header_len: int | None = None):
    return lambda path: path.write_bytes(blob) if header_len is None else write_safetensors(path, b"{}", b"", header_len)


HEADER_CASES = [
    ("list header", _header_case(lambda h, d: ([1, 2], d)), r"top level is a JSON array"),
    ("entry a string", _header_case(lambda h, d: h.__setitem__(_FIRST, "x")), r"tensor 'norm.weight' entry is 'x'"),
    ("string offsets", _set("data_offsets", ["0", "128"]), r"data_offsets is \['0', '128'\]"),
    ("float offsets", _set("data_offsets", [0.0, 128.0]), r"data_offsets is"),
    ("bool shape", _set("shape", [True]), r"shape is \[True\]"),
    ("no data_offsets", _drop("data_offsets"), r"tensor 'norm.weight' has no 'data_offsets'"),
    ("no dtype", _drop("dtype"), r"has no 'dtype'"),
    ("no shape", _drop("shape"), r"has no 'shape'"),
    ("unknown dtype", _set("dtype", "Q4"), r"dtype is 'Q4'"),
    ("begin > end", _set("data_offsets", [200, 100]), r"begin after they end"),
    ("negative begin", _set("data_offsets", [-128, 0]), r"data_offsets is \[-128, 0\]"),
    ("out of range", _set("data_offsets", [0, 1 << 40]), r"is truncated: tensor 'norm.weight' needs bytes"),
    ("range too short", _header_case(lambda h, d: h[_FIRST].__setitem__(
        "data_offsets", [h[_FIRST]["data_offsets"][0], h[_FIRST]["data_offsets"][0] + 2])), r"hold 2 bytes; BF16"),
    ("overlapping", _header_case(_overlap), r"overlap in the file"),
    ("metadata not strings", _header_case(lambda h, d: h.__setitem__("__metadata__", {"a": 1})), r"__metadata__"),
    ("2^63 header length", _raw(b"", header_len=1 << 63), r"header says 9223372036854775808 bytes"),
    ("4-byte file", _raw(b"\x00\x01\x02\x03"), r"is not a safetensors file \(only 4 bytes\)"),
    ("header not JSON", _header_case(lambda h, d: (b"\xff" * 16, d)), r"safetensors header\): is not UTF-8"),
]


@pytest.mark.parametrize("label,damage,pattern", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_malformed_safetensors_header_is_one_line(tmp_path, label, damage, pattern):
    src = release_copy(tmp_path)
    damage(src / WEIGHTS)
    message = _refused(tmp_path, src, pattern)
    assert str(src / WEIGHTS) in message


def test_a_huge_tensor_name_gives_a_short_message(tmp_path):
    src = release_copy(tmp_path)
    _rewrite_weights(src, lambda w: w.__setitem__("x" * 100_000, mx.zeros((2,), mx.bfloat16)))
    _refused(tmp_path, src, r"unexpected: 'xxxx.* …")


def test_weights_that_are_a_folder_are_refused(tmp_path):
    src = release_copy(tmp_path)
    (src / WEIGHTS).unlink()
    (src / WEIGHTS).mkdir()
    _refused(tmp_path, src, rf"{WEIGHTS}: is a folder, expected a file")


def test_fifo_in_place_of_a_json_file_does_not_block(tmp_path):
    """Opening a FIFO for reading waits for a writer: run in a child with a timeout to prove it never does."""
    src = release_copy(tmp_path)
    for name in ("params.json",):
        (src / name).unlink()
        os.mkfifo(src / name)
    r = run_convert("--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), timeout=60)
    assert r.returncode == 1
    assert "params.json: is a FIFO, not a regular file" in r.stderr


def test_json_linked_to_proc_environ_is_refused_without_its_content(tmp_path, monkeypatch):
    if not Path("/proc/self/environ").exists():
        pytest.skip("no /proc on this system")
    monkeypatch.setenv("H3_SECRET_MARKER", "do-not-print-me")
    src = release_copy(tmp_path)
    (src / "params.json").unlink()
    (src / "params.json").symlink_to("/proc/self/environ")
    message = _refused(tmp_path, src, r"params\.json: is not valid JSON")
    assert "do-not-print-me" not in message


# ---- D1/D2/D5: --overwrite never deletes what is not ours ------------------------------------------

def test_overwrite_refuses_a_folder_that_is_not_a_model(tmp_path):
    src = release_copy(tmp_path)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "precious.txt").write_text("keep")
    r = run_convert("--hf-path", str(src), "--mlx-path", str(notes), "--overwrite")
    assert r.returncode == 1 and "--overwrite refused: it is not a converted model" in r.stderr
    assert (notes / "precious.txt").read_text() == "keep"
    assert listing(notes) == ["precious.txt"]


def test_overwrite_refuses_a_model_folder_holding_other_files(tmp_path):
    src = release_copy(tmp_path)
    out = _convert(src, tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FolderError, match=r"it holds files a converted model does not \(notes\.txt\)"):
        _convert(src, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("target", ["parent", "source", "inside"])
def test_overwrite_never_touches_the_source(tmp_path, target):
    holder = tmp_path / "holder"
    holder.mkdir()
    src = release_copy(holder)
    dst = {"parent": holder, "source": src, "inside": src / "mlx"}[target]
    before = listing(tmp_path)
    with pytest.raises(FolderError, match="source"):
        _convert(src, dst, overwrite=True)
    assert listing(tmp_path) == before


def test_a_file_in_place_of_the_folder_is_refused_and_kept(tmp_path):
    src = release_copy(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("data")
    with pytest.raises(FolderError, match="it is a file, not a model folder"):
        _convert(src, afile, overwrite=True)
    assert afile.read_text() == "data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "release"]  # no .afile.old-* left


def test_output_under_a_regular_file_is_a_clear_message(tmp_path):
    src = release_copy(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(FolderError, match=r"f is a file, not a folder; choose another output path"):
        _convert(src, tmp_path / "f" / "out")


def test_unwritable_parent_names_the_users_path(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    src = release_copy(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(FolderError) as e:
            _convert(src, locked / "out")
    finally:
        locked.chmod(0o755)
    assert str(locked / "out") in str(e.value) and ".partial-" not in str(e.value)


def test_permission_denied_names_the_users_path(tmp_path, monkeypatch):
    """As root nothing is unwritable, so the refusal of the temporary folder is simulated."""
    src = release_copy(tmp_path)
    real_mkdir = os.mkdir

    def mkdir(path, *a, **k):
        if ".partial-" in os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(FolderError) as e:
        _convert(src, tmp_path / "out")
    assert str(e.value).startswith(f"{tmp_path / 'out'}: cannot create the model folder in {tmp_path}")
    assert ".partial-" not in str(e.value)


def test_write_failure_names_the_users_path_and_leaves_nothing(tmp_path, monkeypatch):
    src = release_copy(tmp_path)

    def full_disk(path, *a, **k):
        raise RuntimeError(f"[save_safetensors] Failed to write {path}: No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    with pytest.raises(FolderError) as e:
        _convert(src, tmp_path / "out")
    assert str(tmp_path / "out") in str(e.value) and ".partial-" not in str(e.value)
    assert "No space left on device" in str(e.value) and "nothing was written" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_overwrite_replaces_an_empty_folder(tmp_path):
    src = release_copy(tmp_path)
    (tmp_path / "out").mkdir()
    out = _convert(src, tmp_path / "out", overwrite=True)
    assert (out / "config.json").is_file()


def test_swap_refuses_a_folder_that_appeared_meanwhile(tmp_path, monkeypatch):
    """The final swap re-checks: a folder that appears during the conversion is never replaced
    without --overwrite, and with it only if it is ours."""
    import mlx_speech.loading as utils

    src = release_copy(tmp_path)
    out = tmp_path / "out"
    save_model = utils.save_model

    def appear_then_save(path, model):
        out.mkdir(exist_ok=True)
        (out / "theirs.txt").write_text("theirs")
        save_model(path, model)

    monkeypatch.setattr(utils, "save_model", appear_then_save)
    with pytest.raises(FileExistsError, match="appeared while converting"):
        _convert(src, out)
    with pytest.raises(FolderError, match="--overwrite refused"):
        _convert(src, out, overwrite=True)
    assert listing(tmp_path / "out") == ["theirs.txt"]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_swap_replaces_a_model_that_appeared_meanwhile_only_with_overwrite(tmp_path, monkeypatch):
    import shutil

    import mlx_speech.loading as utils

    src = release_copy(tmp_path)
    first = convert(hf_path=str(src), mlx_path=str(tmp_path / "first"), dtype="bfloat16", verbose=False)
    out = tmp_path / "out"
    save_model = utils.save_model

    def appear_then_save(path, model):
        if not out.exists():
            shutil.copytree(first, out)  # another conversion finished first (bfloat16)
        save_model(path, model)

    monkeypatch.setattr(utils, "save_model", appear_then_save)
    with pytest.raises(FileExistsError, match="appeared while converting"):
        _convert(src, out)
    assert mx.load(str(out / "model.safetensors"))["backbone.norm.weight"].dtype == mx.bfloat16  # kept
    shutil.rmtree(out)
    _convert(src, out, overwrite=True)  # float32 replaces the bfloat16 one that appeared
    assert mx.load(str(out / "model.safetensors"))["backbone.norm.weight"].dtype == mx.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "out", "release"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_concurrent_conversions_of_the_same_target(tmp_path, overwrite):
    """Without --overwrite exactly one wins and the other says so; with it both succeed (the last
    swap wins). Either way the result is one complete model and nothing is left beside it."""
    src = release_copy(tmp_path)
    out = tmp_path / "out"
    args = ["--hf-path", str(src), "--mlx-path", str(out), "--dtype", "float32"] + ["--overwrite"] * overwrite
    procs = [subprocess.Popen([sys.executable, str(REPO / "convert.py"), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == ([0, 0] if overwrite else [0, 1]), results
    if not overwrite:
        loser = next(err for rc, err in results if rc == 1)
        assert "already exists" in loser or "appeared while converting" in loser
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "release"]
    from mlx_speech import load

    assert load(out).voices == ["casual_male", "neutral_female"]


def test_converted_folder_respects_the_umask(tmp_path):
    src = release_copy(tmp_path)
    old = os.umask(0o022)
    try:
        out = _convert(src, tmp_path / "out")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755  # mkdtemp would give 0o700
    assert (out / "voices").stat().st_mode & 0o777 == 0o755
    assert (out / "config.json").stat().st_mode & 0o777 == 0o644
    old = os.umask(0o077)
    try:
        private = _convert(src, tmp_path / "private")
    finally:
        os.umask(old)
    assert private.stat().st_mode & 0o777 == 0o700


# ---- D3: killed conversions leave nothing -------------------------------------------------------

# A conversion that stops inside "[5/5] writing" (after the weights are written into the partial
# folder) until it is signalled: the real converter, with save_model wrapped to say where it is.
_PAUSED = """
import sys, time
import mlx_speech.loading as utils
save = utils.save_model
def paused(path, model):
    save(path, model)
    print("WRITING", path, flush=True)
    time.sleep(60)
utils.save_model = paused
from mlx_speech.convert import main
main(sys.argv[1:])
"""


def _start_paused(src: Path, out: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _PAUSED, "--hf-path", str(src), "--mlx-path", str(out),
                          "--dtype", "float32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("WRITING"):
            partial = Path(line.split(None, 1)[1].strip())
            assert partial.is_dir() and partial.name.startswith(".out.partial-")
            return p
    pytest.fail(f"the conversion never reached the writing step: {p.stderr.read()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_mid_conversion_leaves_nothing(tmp_path, sig):
    src = release_copy(tmp_path)
    p = _start_paused(src, tmp_path / "out")
    p.send_signal(sig)
    rc = p.wait(timeout=60)
    err = p.stderr.read()
    assert rc == 128 + sig, err
    assert "Traceback" not in err and f"interrupted ({'SIGINT' if sig == signal.SIGINT else sig.name})" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_stale_partials_of_killed_runs_are_removed_but_live_ones_kept(tmp_path):
    src = release_copy(tmp_path)
    killed = _start_paused(src, tmp_path / "out")
    killed.kill()  # SIGKILL: no cleanup can run
    killed.wait(timeout=60)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(stale) == 1 and (stale[0] / "model.safetensors").is_file()

    live = _start_paused(src, tmp_path / "out")  # a concurrent conversion, still working
    live_partial = {p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")} - set(stale)
    time.sleep(0.05)
    out = _convert(src, tmp_path / "out")
    assert (out / "config.json").is_file()
    assert not stale[0].exists()  # the dead run's folder is gone
    assert all(p.exists() for p in live_partial)  # the live run's is not
    live.send_signal(signal.SIGTERM)
    assert live.wait(timeout=60) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "release"]


# ---- usage errors and first-run messages ---------------------------------------------------------

@pytest.mark.parametrize("args,pattern", [
    (["-q", "--q-bits", "7"], r"unsupported --q-bits 7"),
    (["-q", "--q-group-size", "48"], r"unsupported --q-group-size 48"),
    (["--q-bits", "4"], r"--q-bits only applies with -q/--quantize"),
    (["--q-group-size", "32", "--q-acoustic"], r"--q-group-size and --q-acoustic only apply with -q"),
    (["--dtype", "float64"], r"invalid choice: 'float64'"),
])
def test_usage_errors_exit_2(tmp_path, capsys, args, pattern):
    with pytest.raises(SystemExit) as e:
        main(["--hf-path", str(TINY), "--mlx-path", str(tmp_path / "x"), *args])
    assert e.value.code == 2
    assert __import__("re").search(pattern, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_first_run_offline_names_the_repo_the_size_and_the_flag(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "MLX_SPEECH_CACHE": str(tmp_path / "c")}
    r = subprocess.run([sys.executable, "-m", "mlx_speech.convert", "--mlx-path", str(tmp_path / "out")],
                       capture_output=True, text=True, env={**os.environ, **env}, timeout=120, cwd=tmp_path)
    assert r.returncode == 1
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "mistralai/Voxtral-4B-TTS-2603" in line and "8 GB" in line and "--model" in line
    assert "HF_HUB_OFFLINE" in line
    # An id that looks like a Hub repo but is neither a folder here nor reachable: both said.
    code = ("from mlx_speech.model_source import get_model_path\n"
            "try:\n    get_model_path('models/voxtral')\nexcept FileNotFoundError as e:\n    print(e)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=120, cwd=tmp_path)
    assert "there is no local folder models/voxtral, and cannot download models/voxtral" in r.stdout, r.stderr
    assert r.stdout.strip().count("\n") == 0


@pytest.mark.parametrize("given", ["./models/voxtral", "~/no-such-voxtral-folder", "voxtral", "a/b/c"])
def test_missing_local_folder_is_reported_as_a_folder(tmp_path, given):
    with pytest.raises(FileNotFoundError, match=r"model folder .* does not exist"):
        convert(hf_path=given, mlx_path=str(tmp_path / "out"), verbose=False)


def test_owner_part_that_is_a_local_folder_makes_it_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model folder models/voxtral does not exist"):
        convert(hf_path="models/voxtral", mlx_path=str(tmp_path / "out"), verbose=False)


def test_json_config_of_a_refused_release_is_untouched(tmp_path):
    """Refusals read, never write: the release's files are byte-identical afterwards."""
    src = release_copy(tmp_path)
    edit_json(src / "params.json", lambda p: p.update(n_layers=10**6))
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError):
        _convert(src, tmp_path / "out")
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    assert json.loads((src / "params.json").read_text())["n_layers"] == 10**6
