"""mlx-audio's Voxtral packs (the mlx-community layout) read onto our model.

The packs are written at test time by mlx-audio's own converter (tests/mlx_audio_fixture.py)
from one tiny release, which our converter converts too. The reader must give our model the
very parameters our conversion gives it: the two paths apply the same casts, and every one of
them is exact (the release is bf16; bf16 stays bf16, or goes to float32), so the tolerance on
the audio is zero and any difference is a mapping error. Where mlx-audio quantized a layer that
our recipe keeps in float (the text embedding table, the semantic head), our reference applies
mlx-audio's rounding itself with mx.quantize / mx.dequantize.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import TINY
from huggingface_hub.utils import filter_repo_objects
from mlx.utils import tree_flatten
from mlx_audio_fixture import SAFETENSORS_VOICE, mlx_audio_missing, write_pack, write_release

from mlx_speech.convert import convert
from mlx_speech.errors import CheckpointError
from mlx_speech.generation import generate
from mlx_speech.mlx_audio_pack import (
    PACK_PATTERNS,
    check_pack_header,
    expected_pack_tensors,
    is_mlx_audio_config,
    is_mlx_audio_pack,
    read_mlx_audio_pack,
    split_quantized,
)
from mlx_speech.model import Model, ModelConfig
from mlx_speech.loading import load

REAL_PARAMS = Path(__file__).parent / "data" / "params_real.json"
TEXT = "Hello there."
SEMANTIC_HEAD = "acoustic_transformer.semantic_codebook_output"
# name: (mlx-audio's --dtype, its --q-bits, our convert() options for the same weights)
VARIANTS = {
    "bf16": (None, None, {"dtype": "bfloat16"}),  # as mlx-community's -bf16: the release's dtype
    "float32": ("float32", None, {"dtype": "float32"}),
    # mlx-community's -4bit and -6bit; mlx-audio quantizes the flow transformer too
    "4bit": (None, 4, {"dtype": "bfloat16", "quantize": True, "q_bits": 4, "q_group_size": 64, "q_acoustic": True}),
    "6bit": (None, 6, {"dtype": "bfloat16", "quantize": True, "q_bits": 6, "q_group_size": 64, "q_acoustic": True}),
}


@pytest.fixture(scope="module")
def mlx_audio() -> None:
    if reason := mlx_audio_missing():
        pytest.skip(reason)


@pytest.fixture(scope="module")
def release(mlx_audio, tmp_path_factory) -> Path:
    return write_release(TINY, tmp_path_factory.mktemp("mlx_audio") / "release")


def _hub_copy(pack: Path, out: Path) -> Path:
    """Only the files a Hub download with PACK_PATTERNS fetches (snapshot_download's own filter)."""
    files = [str(p.relative_to(pack)) for p in pack.rglob("*") if p.is_file()]
    for name in filter_repo_objects(files, allow_patterns=list(PACK_PATTERNS)):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pack / name, out / name)
    return out


@pytest.fixture(scope="module")
def packs(release, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packs")
    out = {}
    for name, (dtype, bits, _) in VARIANTS.items():
        written = write_pack(release, root / f"{name}-written", dtype=dtype, bits=bits)
        out[name] = _hub_copy(written, root / name)
    # mlx-audio's converter copies the release's files beside its own; a download skips them
    assert (written / "consolidated.safetensors").is_file() and not (out[name] / "consolidated.safetensors").exists()
    return out


def load_pack(folder: Path) -> Model:
    """The pack read by our own ``load`` (its layout told from the folder alone)."""
    model = load(folder)
    assert model.source.startswith("mlx-audio Voxtral pack"), model.source
    return model


def _round_trip(w: mx.array, bits: int, group_size: int) -> mx.array:
    """What mlx-audio's quantization leaves of a layer our recipe does not quantize."""
    return mx.dequantize(*mx.quantize(w, group_size=group_size, bits=bits), group_size=group_size, bits=bits)


def _ours(release: Path, tmp_path: Path, options: dict) -> Model:
    """Our own conversion of the same release, loaded by utils.load, with mlx-audio's extra rounding."""
    model = load(convert(hf_path=str(release), mlx_path=str(tmp_path / "ours"), verbose=False, **options))
    if options.get("quantize"):
        bits, gs = options["q_bits"], options["q_group_size"]
        model.backbone.embed_tokens.weight = _round_trip(model.backbone.embed_tokens.weight, bits, gs)
        head = getattr(model.acoustic_transformer, SEMANTIC_HEAD.split(".")[1])
        # mlx-audio quantized the release's bf16 head; we keep the result in float32
        head.weight = _round_trip(head.weight.astype(mx.bfloat16), bits, gs).astype(mx.float32)
    return model


def test_our_layouts_are_not_packs(tiny_mlx):  # runs without mlx-audio
    assert not is_mlx_audio_pack(tiny_mlx) and not is_mlx_audio_config(tiny_mlx)  # our layout
    assert not is_mlx_audio_pack(TINY) and not is_mlx_audio_config(TINY)  # the release


def test_recognises_packs(packs, release):
    assert all(is_mlx_audio_pack(p) for p in packs.values())
    assert is_mlx_audio_config(release)  # what a config.json-only first download can tell
    assert not is_mlx_audio_pack(release)  # params.json + a config.json copy, but no model*.safetensors


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pack_gives_our_conversion(variant, packs, release, tmp_path):
    ours = _ours(release, tmp_path, VARIANTS[variant][2])
    theirs = load_pack(packs[variant])

    mine, other = dict(tree_flatten(ours.parameters())), dict(tree_flatten(theirs.parameters()))
    assert sorted(other) == sorted(mine)  # the same layers quantized, the same names
    for name, value in mine.items():
        assert other[name].dtype == value.dtype, name
        assert mx.array_equal(other[name], value).item(), name
    assert theirs.config.quantization == ours.config.quantization
    assert theirs.voices == ours.voices == ["casual_male", "neutral_female"]
    for voice in theirs.voices:  # casual_male from the .safetensors, neutral_female from the .pt
        assert mx.array_equal(theirs.voice(voice).astype(mx.float32), ours.voice(voice).astype(mx.float32)).item()

    for voice in theirs.voices:
        a = generate(ours, TEXT, voice, seed=3, max_frames=6)
        b = generate(theirs, TEXT, voice, seed=3, max_frames=6)
        assert a.frames == 6 and np.abs(a.audio).max() > 0  # the fixture's END row is zeroed
        np.testing.assert_array_equal(b.codes, a.codes)
        np.testing.assert_array_equal(b.audio, a.audio)  # tolerance 0: see the module docstring


def test_quantized_pack_keeps_our_float_layers_float(packs):
    pack = read_mlx_audio_pack(packs["4bit"])
    assert pack.quantization == {"bits": 4, "group_size": 64, "acoustic": True}
    assert f"{SEMANTIC_HEAD}.scales" not in pack.weights
    assert pack.weights[f"{SEMANTIC_HEAD}.weight"].dtype == mx.float32  # argmax in float32 (T9)
    assert "backbone.embed_tokens.scales" not in pack.weights
    assert "backbone.layers.0.self_attn.q_proj.scales" in pack.weights
    assert "acoustic_transformer.layers.0.feed_forward.w1.scales" in pack.weights
    # The codec as our converter leaves it: weight norm folded, the codebook divided in float32.
    assert not [k for k in pack.weights if "parametrizations" in k or "cluster_usage" in k]
    assert pack.weights["audio_tokenizer.quantizer.semantic_codebook.embedding"].dtype == mx.float32
    assert "mlx-audio" in pack.description and "4-bit group 64" in pack.description
    assert f"{SEMANTIC_HEAD} → float32" in pack.description
    assert "backbone.embed_tokens → bfloat16" in pack.description


def _edited_copy(pack: Path, tmp_path: Path) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(pack, out)
    return out


@pytest.mark.parametrize("tensor", [
    "acoustic_transformer.norm.weight",
    "language_model.model.model.layers.1.self_attn.q_proj.biases",  # part of a quantized layer
    "audio_tokenizer.output_proj.conv.parametrizations.weight.original0",
])
def test_missing_tensor_is_named(tensor, packs, tmp_path):
    folder = _edited_copy(packs["4bit"], tmp_path)
    weights = mx.load(str(folder / "model.safetensors"))
    del weights[tensor]
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    with pytest.raises(CheckpointError) as e:
        read_mlx_audio_pack(folder)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(str(folder / "model.safetensors")) and f"missing: {tensor}" in message


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_quantized_weights_without_quantization_block(packs, tmp_path):
    folder = _edited_copy(packs["4bit"], tmp_path)
    _edit_config(folder, lambda c: (c.pop("quantization"), c.pop("quantization_config")))
    with pytest.raises(CheckpointError) as e:
        read_mlx_audio_pack(folder)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(folder / "config.json"))
    assert "no quantization block" in message and ".scales" in message


@pytest.mark.parametrize("field, value, expected", [
    ("bits", None, "quantization.bits is missing"),
    ("group_size", 48, "quantization.group_size is 48"),
    ("mode", "mxfp4", "quantization.mode is 'mxfp4'"),
])
def test_bad_quantization_field_is_named(field, value, expected, packs, tmp_path):
    folder = _edited_copy(packs["4bit"], tmp_path)

    def edit(config):
        for key in ("quantization", "quantization_config"):
            if value is None:
                config[key].pop(field)
            else:
                config[key][field] = value
    _edit_config(folder, edit)
    with pytest.raises(CheckpointError, match=expected) as e:
        read_mlx_audio_pack(folder)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(folder / "config.json"))


def test_bits_that_do_not_fit_the_weights_are_named(packs, tmp_path):
    folder = _edited_copy(packs["4bit"], tmp_path)
    _edit_config(folder, lambda c: [c[k].update(bits=8) for k in ("quantization", "quantization_config")])
    with pytest.raises(CheckpointError, match=r"wrong shape or dtype: .*\.weight U32 .*8-bit group 64"):
        read_mlx_audio_pack(folder)


def test_unquantized_pack_with_a_config_shape_mismatch(packs, tmp_path):
    folder = _edited_copy(packs["bf16"], tmp_path)
    _edit_config(folder, lambda c: c.update(hidden_dim=96))
    expected = r"wrong shape or dtype: .*mlp\.down_proj\.weight BF16 \(64, 128\) \(expected \(64, 96\)\)"
    with pytest.raises(CheckpointError, match=expected):
        read_mlx_audio_pack(folder)


def test_sharded_pack_reads_like_one_file(packs, tmp_path):
    """mlx-community's -bf16 ships 2 shards and an index; a shard the index lists must exist."""
    folder = _edited_copy(packs["bf16"], tmp_path)
    weights = mx.load(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        mx.save_safetensors(str(folder / file), {k: weights[k] for k in keys}, metadata={"format": "mlx"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    one, two = read_mlx_audio_pack(packs["bf16"]).weights, read_mlx_audio_pack(folder).weights
    assert sorted(one) == sorted(two) and all(mx.array_equal(one[k], two[k]).item() for k in one)

    (folder / "model-00002-of-00002.safetensors").unlink()
    missing = r"index\.json: lists model-00002-of-00002\.safetensors, which is missing"
    with pytest.raises(CheckpointError, match=missing):
        read_mlx_audio_pack(folder)


def test_voice_safetensors_is_preferred_to_its_pt(packs, tmp_path):
    folder = _edited_copy(packs["bf16"], tmp_path)
    (folder / "voice_embedding" / f"{SAFETENSORS_VOICE}.pt").write_bytes(b"not a zip")  # never read
    assert SAFETENSORS_VOICE in read_mlx_audio_pack(folder).voices
    (folder / "voice_embedding" / "neutral_female.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="neutral_female.pt"):
        read_mlx_audio_pack(folder)


def test_real_size_4bit_layout(mlx_audio):
    """mlx-audio's own model and quantization at the real size (lazy: no weight is computed).

    The mlx-community 4-bit pack has 802 tensors: 183 quantized language-model layers (182
    linears + the text embedding table), 25 quantized flow-head layers (all its linears but the
    36-wide input projection, the semantic head included), 116 codec tensors and the audio
    embedding table in float. Our reader must accept exactly that table, keep 206 layers
    quantized (our recipe with acoustic=true) and dequantize the other two.
    """
    from mlx_audio.convert import build_quant_predicate
    from mlx_audio.lm.convert import quantize_model
    from mlx_audio.tts.models.voxtral_tts import Model as TheirModel
    from mlx_audio.tts.models.voxtral_tts import ModelConfig as TheirConfig

    params = json.loads(REAL_PARAMS.read_text())
    theirs = TheirModel(TheirConfig.from_dict(params))
    theirs, their_config = quantize_model(theirs, params, 64, 4, quant_predicate=build_quant_predicate(theirs))
    header = {k: {"dtype": "U32" if v.dtype == mx.uint32 else "BF16", "shape": list(v.shape)}
              for k, v in tree_flatten(theirs.parameters())}
    assert len(header) == 802
    assert sum(k.startswith("audio_tokenizer.") for k in header) == 116

    config = ModelConfig.from_params(params)
    expected = expected_pack_tensors(config)
    q = {"bits": 4, "group_size": 64}
    assert their_config["quantization"] == {**q, "mode": "affine"}
    quantized = check_pack_header(header, expected, q, Path("model.safetensors"), Path("config.json"))
    assert sum(k.startswith("language_model.") for k in quantized) == 183
    assert sum(k.startswith("acoustic_transformer.") for k in quantized) == 25

    recipe, kept, dequantized = split_quantized(quantized, expected, q)
    assert recipe == {**q, "acoustic": True}
    assert sorted(dequantized) == ["acoustic_transformer.semantic_codebook_output", "backbone.embed_tokens"]
    ours = Model(config)
    ours.config.quantization = recipe
    nn.quantize(ours, group_size=64, bits=4, class_predicate=ours.quant_predicate)  # as convert -q --q-acoustic
    ours_quantized = [k[: -len(".scales")] for k, _ in tree_flatten(ours.parameters()) if k.endswith(".scales")]
    assert sorted(ours_quantized) == sorted(kept)
