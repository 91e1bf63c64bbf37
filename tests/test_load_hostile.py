"""``load`` against hostile and damaged model folders: one CheckpointError line naming the file and
the field or tensor, before anything large is allocated; voices checked at load, not per request.

Each test edits a copy of the float32 conversion of the golden tiny release (``tiny_mlx``).
"""

from __future__ import annotations

import math
import shutil
import struct
import tracemalloc
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hostile_files import (
    edit_json,
    listing,
    model_copy,
    read_safetensors,
    release_copy,
    traversal_release,
    write_safetensors,
)

from mlx_speech import load
from mlx_speech.convert import convert
from mlx_speech.errors import CheckpointError

WEIGHTS = "model.safetensors"


def _refused(path: Path, pattern: str) -> str:
    with pytest.raises(CheckpointError, match=pattern) as e:
        load(path)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400
    return str(e.value)


def _rewrite(path: Path, edit) -> None:
    weights, meta = mx.load(str(path), return_metadata=True)
    edit(weights)
    path.unlink()
    mx.save_safetensors(str(path), weights, metadata=meta)


# ---- S2/U4: non-finite weights --------------------------------------------------------------------

@pytest.mark.parametrize("name,value", [
    ("acoustic_transformer.acoustic_codebook_output.weight", math.nan),  # the SIGSEGV of S2
    ("backbone.norm.weight", math.inf),
    ("audio_tokenizer.decoder_blocks.0.conv.weight", math.nan),
])
def test_non_finite_weight_is_refused_at_load(tiny_mlx, tmp_path, name, value):
    model = model_copy(tiny_mlx, tmp_path)

    def edit(w):
        a = np.array(w[name])
        a.flat[0] = value
        w[name] = mx.array(a)

    _rewrite(model / WEIGHTS, edit)
    _refused(model, rf"{WEIGHTS}: tensor {name.replace('.', '[.]')} holds NaN or infinite values")


def test_all_nan_weights_name_the_first_and_count_the_rest(tiny_mlx, tmp_path):
    model = model_copy(tiny_mlx, tmp_path)
    _rewrite(model / WEIGHTS, lambda w: w.update({k: mx.full(v.shape, math.nan) for k, v in w.items()}))
    _refused(model, r"holds NaN or infinite values \(and \d+ more tensors\)")


def test_non_finite_quantization_scales_are_refused(tmp_path):
    q = convert(hf_path=str(release_copy(tmp_path)), mlx_path=str(tmp_path / "q4"), dtype="float32",
                quantize=True, q_bits=4, q_group_size=32, verbose=False)
    name = "backbone.layers.0.self_attn.q_proj.scales"

    def edit(w):
        assert w[name.replace("scales", "weight")].dtype == mx.uint32
        w[name] = mx.full(w[name].shape, math.inf, w[name].dtype)

    _rewrite(q / WEIGHTS, edit)
    _refused(q, rf"tensor {name.replace('.', '[.]')} holds NaN")


# ---- S6/C3/U3: config.json --------------------------------------------------------------------------

CONFIG_CASES = [
    (lambda c: [c], r"config\.json: top level is a JSON array, expected a JSON object"),
    (lambda c: c.update(backbone=[1]), r"config\.json: backbone is a JSON array, expected an object"),
    (lambda c: c["backbone"].update(dim="64"), r"backbone\.dim is '64'; expected an integer"),
    (lambda c: c["backbone"].update(n_layers="2"), r"backbone\.n_layers is '2'"),
    (lambda c: c["backbone"].update(n_layers=30_000), r"backbone\.n_layers is 30000; expected an integer from 1 to 256"),
    (lambda c: c["backbone"].update(n_layers=10**6), r"backbone\.n_layers is 1000000"),
    (lambda c: c["backbone"].update(dim=-1), r"backbone\.dim is -1"),
    (lambda c: c["backbone"].update(rope_theta=-1.0), r"backbone\.rope_theta is -1\.0"),
    (lambda c: c["codec"].update(conv_strides=["a", "b"]), r"codec\.conv_strides\[0\] is 'a'"),
    (lambda c: c["codec"].update(window_sizes=[2, 4]), r"codec: transformer_lengths, conv_kernels"),
    (lambda c: c["acoustic"].update(n_decoding_steps=10**6), r"acoustic\.n_decoding_steps is 1000000"),
    (lambda c: c["acoustic"].update(cfg_alpha=math.nan), r"acoustic\.cfg_alpha is nan"),
    (lambda c: c.update(max_seq_len=0), r"max_seq_len is 0"),
    (lambda c: c.update(quantization="yes"), r"quantization is a JSON str, expected an object"),
    (lambda c: c.update(quantization={"bits": 4}), r"quantization\.group_size is missing; expected one of 32, 64, 128"),
    (lambda c: c.update(quantization={"bits": 7, "group_size": 64}), r"quantization\.bits is 7"),
    (lambda c: c.update(model_type="llama"), r"model_type is 'llama'; this loader reads 'voxtral_tts'"),
    (lambda c: c.update(voices=["../../x"]), r"voices: '\.\./\.\./x' is not a valid voice name"),
    (lambda c: c.update(voices="casual_male"), r"voices is 'casual_male'; expected a list"),
    (lambda c: c.update(audio_token_id=10**5), r"audio_token_id must be below backbone\.vocab_size"),
]


@pytest.mark.parametrize("edit,pattern", CONFIG_CASES, ids=[p[:40] for _, p in CONFIG_CASES])
def test_bad_config_json_is_one_line_naming_the_field(tiny_mlx, tmp_path, edit, pattern):
    model = model_copy(tiny_mlx, tmp_path)
    edit_json(model / "config.json", edit)
    message = _refused(model, pattern)
    assert message.startswith(str(model / "config.json") + ": ")


@pytest.mark.parametrize("content,pattern", [
    (b"\xff\xfe", r"config\.json: is not UTF-8 text"),
    (b"{", r"config\.json: is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, r"config\.json: JSON is nested too deeply"),
])
def test_unreadable_config_json_names_the_file(tiny_mlx, tmp_path, content, pattern):
    model = model_copy(tiny_mlx, tmp_path)
    (model / "config.json").write_bytes(content)
    _refused(model, pattern)


def test_thirty_thousand_layers_is_refused_before_building(tiny_mlx, tmp_path):
    model = model_copy(tiny_mlx, tmp_path)
    edit_json(model / "config.json", lambda c: c["backbone"].update(n_layers=30_000))
    tracemalloc.start()
    try:
        _refused(model, "backbone.n_layers is 30000")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # building them took 2.8 GB


def test_layers_within_bounds_but_not_in_the_weights_are_refused_by_count(tiny_mlx, tmp_path, monkeypatch):
    import mlx_speech.model as model_module

    model = model_copy(tiny_mlx, tmp_path)
    edit_json(model / "config.json", lambda c: c["backbone"].update(n_layers=200))
    monkeypatch.setattr(model_module.Model, "__init__", lambda *a: pytest.fail("model built"))
    n = 164  # the tiny folder's tensors; each further backbone layer has 9
    _refused(model, rf"holds {n} weight tensors but config\.json implies {n + 198 * 9}")


def test_weights_of_another_shape_are_refused_by_name_before_reading(tiny_mlx, tmp_path):
    model = model_copy(tiny_mlx, tmp_path)
    edit_json(model / "config.json", lambda c: c["backbone"].update(hidden_dim=256))
    _refused(model, r"weights do not match config\.json: wrong shape: backbone\.layers\.0\.mlp\.down_proj\.weight")


# ---- C3: shards -------------------------------------------------------------------------------------

def _truncate(f: Path):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _folder(f: Path):
    f.unlink()
    f.mkdir()


def _header_list(f: Path):
    _, data = read_safetensors(f)
    write_safetensors(f, [1], data)


def _string_entry(f: Path):
    header, data = read_safetensors(f)
    header["backbone.norm.weight"] = "x"
    write_safetensors(f, header, data)


def _huge_len(f: Path):
    f.write_bytes(struct.pack("<Q", 1 << 63) + b"{}")


def _duplicate_shard(f: Path):
    shutil.copy(f, f.with_name("model-extra.safetensors"))


@pytest.mark.parametrize("damage,pattern", [
    (_truncate, r"model\.safetensors: is truncated"),
    (lambda f: f.write_bytes(b"\0\0\0\0"), r"model\.safetensors: is not a safetensors file \(only 4 bytes\)"),
    (_folder, r"model\.safetensors: is a folder, expected a file"),
    (_huge_len, r"header says 9223372036854775808 bytes"),
    (_header_list, r"top level is a JSON array"),
    (_string_entry, r"tensor 'backbone.norm.weight' entry is 'x'"),
    (_duplicate_shard, r"model\.safetensors: tensor '.*' is also in model-extra\.safetensors"),
    (lambda f: f.unlink(), r"has no model\*\.safetensors weights"),
], ids=["truncated", "4 bytes", "folder", "2^63 header", "list header", "string entry", "duplicate", "none"])
def test_damaged_shard_is_one_line(tiny_mlx, tmp_path, damage, pattern):
    model = model_copy(tiny_mlx, tmp_path)
    damage(model / WEIGHTS)
    _refused(model, pattern)


# ---- C2/U3/S1: voices checked at load ------------------------------------------------------------

def test_missing_voices_folder_is_named(tiny_mlx, tmp_path):
    model = model_copy(tiny_mlx, tmp_path)
    shutil.rmtree(model / "voices")
    _refused(model, r"voices: is missing; a model folder keeps its preset voices")


def test_voice_of_the_wrong_width_is_refused_at_load(tiny_mlx, tmp_path):
    """C2's common cause: a (7, 5) voice loaded fine and failed on every request for it."""
    model = model_copy(tiny_mlx, tmp_path)
    mx.save_safetensors(str(model / "voices" / "casual_male.safetensors"), {"embedding": mx.zeros((7, 5))})
    _refused(model, r"casual_male\.safetensors: voice embedding has shape \(7, 5\); the model needs \(rows, 64\)")


def test_voice_with_other_rows_than_tekken_json_is_refused(tiny_mlx, tmp_path):
    model = model_copy(tiny_mlx, tmp_path)
    mx.save_safetensors(str(model / "voices" / "casual_male.safetensors"), {"embedding": mx.zeros((6, 64))})
    _refused(model, r"casual_male\.safetensors: voice embedding has 6 rows but tekken\.json gives this voice 7")


def test_nan_voice_is_refused_at_load(tiny_mlx, tmp_path):
    model = model_copy(tiny_mlx, tmp_path)
    emb = np.zeros((4, 64), np.float32)
    emb[2, 3] = np.nan
    mx.save_safetensors(str(model / "voices" / "neutral_female.safetensors"), {"embedding": mx.array(emb)})
    _refused(model, r"neutral_female\.safetensors: voice embedding holds NaN or infinite values")


def test_truncated_voice_is_refused(tiny_mlx, tmp_path):
    model = model_copy(tiny_mlx, tmp_path)
    f = model / "voices" / "casual_male.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    _refused(model, r"casual_male\.safetensors: is truncated")


def test_voice_file_name_that_is_not_a_name_is_refused(tiny_mlx, tmp_path):
    model = model_copy(tiny_mlx, tmp_path)
    shutil.copy(model / "voices" / "casual_male.safetensors", model / "voices" / "my voice.safetensors")
    _refused(model, r"voice file name: 'my voice' is not a valid voice name")


def test_voice_linking_out_of_the_folder_is_refused(tiny_mlx, tmp_path):
    model = model_copy(tiny_mlx, tmp_path)
    f = model / "voices" / "casual_male.safetensors"
    f.rename(tmp_path / "outside.safetensors")
    f.symlink_to(tmp_path / "outside.safetensors")
    _refused(model, r"casual_male\.safetensors: is a link to a place outside its model folder")


def test_voice_listed_in_config_but_absent_is_named(tiny_mlx, tmp_path):
    model = model_copy(tiny_mlx, tmp_path)
    (model / "voices" / "neutral_female.safetensors").unlink()
    _refused(model, r"neutral_female\.safetensors: is missing; config\.json lists the voice neutral_female")


def test_tekken_without_special_tokens_is_one_line(tiny_mlx, tmp_path):
    model = model_copy(tiny_mlx, tmp_path)
    edit_json(model / "tekken.json", lambda t: t.update(special_tokens=t["special_tokens"][:3]))
    _refused(model, r"tekken\.json")


def test_good_folder_still_loads_with_checked_voices(tiny_mlx, tmp_path):
    model = model_copy(tiny_mlx, tmp_path)
    m = load(model)
    assert m.voices == ["casual_male", "neutral_female"]
    ref = mx.load(str(tiny_mlx / "voices" / "casual_male.safetensors"))["embedding"]
    assert np.array_equal(np.array(m.voice("casual_male")), np.array(ref))


# ---- S1 through load's direct reading of a release ------------------------------------------------

def test_loading_a_release_refuses_traversal_names_and_writes_nothing(tmp_path):
    src = traversal_release(tmp_path, "../../../ESCAPED")
    before = listing(tmp_path)
    _refused(src, r"is not a valid voice name")
    assert listing(tmp_path) == before


def test_checked_load_gives_exactly_the_files_tensors(tiny_mlx, tmp_path):
    """The checks change nothing: every parameter equals the tensor of that name in the file."""
    from mlx.utils import tree_flatten

    m = load(model_copy(tiny_mlx, tmp_path))
    params = dict(tree_flatten(m.parameters()))
    ref = mx.load(str(tiny_mlx / WEIGHTS))
    assert set(params) == set(ref)
    for k, v in ref.items():
        assert np.array_equal(np.array(params[k]), np.array(v)), k


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_exponent_bit_finiteness_test_agrees_with_numpy_on_every_bit_pattern(dtype):
    """all_finite (the fast check load uses) against np.isfinite: every 16-bit pattern, and for
    float32 every exponent with random mantissas and signs."""
    from mlx_speech.finite import all_finite

    rng = np.random.default_rng(0)
    if dtype == "float32":
        exps = np.repeat(np.arange(256, dtype=np.uint32), 64)
        bits = (rng.integers(0, 2, exps.size, dtype=np.uint32) << 31) | (exps << 23) | \
            rng.integers(0, 1 << 23, exps.size, dtype=np.uint32)
        values = bits.view(np.float32)
    else:
        bits = np.arange(1 << 16, dtype=np.uint16)
        values = bits.view(np.float16) if dtype == "float16" else (bits.astype(np.uint32) << 16).view(np.float32)
    raw = mx.array(bits).view(getattr(mx, dtype))
    finite = np.isfinite(values)
    assert bool(all_finite(raw[mx.array(np.flatnonzero(finite))]).item())  # every finite pattern at once
    for i in np.flatnonzero(~finite):  # every NaN and infinity, each alone among finite values
        assert not bool(all_finite(raw[mx.array([0, int(i), 1])]).item()), hex(int(bits[i]))
