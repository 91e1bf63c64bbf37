"""The converter: the release layout in, an MLX folder out; bad checkpoints refused with names."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY
from mlx.utils import tree_flatten

from mlx_speech.checkpoint import CheckpointError, expected_tensors
from mlx_speech.convert import convert, main
from mlx_speech.model import Model, ModelConfig

REAL_PARAMS = Path(__file__).parent / "data" / "params_real.json"


def test_output_folder_layout(tiny_mlx):
    names = sorted(str(p.relative_to(tiny_mlx)) for p in tiny_mlx.rglob("*") if p.is_file())
    assert names == ["config.json", "model.safetensors", "tekken.json",
                     "voices/casual_male.safetensors", "voices/neutral_female.safetensors"]
    config = json.loads((tiny_mlx / "config.json").read_text())
    assert config["voices"] == ["casual_male", "neutral_female"]
    assert config["quantization"] is None
    weights = mx.load(str(tiny_mlx / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {mx.float32}
    # Done once here, never per call: folded weight norm, no parametrizations, codebook divided.
    assert not [k for k in weights if "parametrizations" in k or "embedding_sum" in k or "cluster_usage" in k]


def test_bfloat16_keeps_precision_critical_tensors_in_float32(tmp_path):
    out = convert(hf_path=str(TINY), mlx_path=str(tmp_path / "bf16"), dtype="bfloat16", verbose=False)
    weights = mx.load(str(out / "model.safetensors"))
    assert weights["backbone.layers.0.self_attn.q_proj.weight"].dtype == mx.bfloat16
    assert weights["acoustic_transformer.semantic_codebook_output.weight"].dtype == mx.float32
    assert weights["audio_tokenizer.quantizer.semantic_codebook.embedding"].dtype == mx.float32


def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "out"
    convert(hf_path=str(TINY), mlx_path=str(out), dtype="float32", verbose=False)
    (out / "config.json").write_text((out / "config.json").read_text().replace('"voices"', '"voices" ', 1))
    stamp = (out / "config.json").read_text()
    with pytest.raises(FileExistsError, match="already exists"):
        convert(hf_path=str(TINY), mlx_path=str(out), dtype="float32", verbose=False)
    assert (out / "config.json").read_text() == stamp
    with pytest.raises(SystemExit) as e:
        main(["--hf-path", str(TINY), "--mlx-path", str(out)])
    assert e.value.code == 1
    convert(hf_path=str(TINY), mlx_path=str(out), dtype="float32", overwrite=True, verbose=False)
    assert (out / "config.json").read_text() != stamp  # our converted model was replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no leftovers beside it


def test_bad_options_name_the_choices(tmp_path):
    with pytest.raises(ValueError, match="float64.*bfloat16, float16, float32"):
        convert(hf_path=str(TINY), mlx_path=str(tmp_path / "x"), dtype="float64", verbose=False)
    with pytest.raises(ValueError, match="--q-bits 7"):
        convert(hf_path=str(TINY), mlx_path=str(tmp_path / "x"), quantize=True, q_bits=7, verbose=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(hf_path=str(tmp_path / "nowhere"), mlx_path=str(tmp_path / "x"), verbose=False)
    assert not (tmp_path / "x").exists()


# ---- broken checkpoints: each refused by name, nothing written -------------------------------

def _release_copy(tmp_path: Path) -> Path:
    src = tmp_path / "release"
    shutil.copytree(TINY, src)
    for p in src.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return src


def _rewrite_weights(src: Path, edit) -> None:
    weights = dict(mx.load(str(src / "consolidated.safetensors")))
    edit(weights)
    (src / "consolidated.safetensors").unlink()
    mx.save_safetensors(str(src / "consolidated.safetensors"), weights)


def _assert_refused(tmp_path: Path, src: Path, error, pattern: str):
    out = tmp_path / "out"
    with pytest.raises(error, match=pattern):
        convert(hf_path=str(src), mlx_path=str(out), dtype="float32", verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]  # no output, no partial folder


def test_missing_tensor_is_named(tmp_path):
    src = _release_copy(tmp_path)
    _rewrite_weights(src, lambda w: w.pop("layers.1.feed_forward.w2.weight"))
    _assert_refused(tmp_path, src, CheckpointError, r"missing: layers\.1\.feed_forward\.w2\.weight")


def test_unexpected_tensor_is_named(tmp_path):
    src = _release_copy(tmp_path)
    _rewrite_weights(src, lambda w: w.__setitem__("output.weight", mx.zeros((4, 4), mx.bfloat16)))
    _assert_refused(tmp_path, src, CheckpointError, r"unexpected: output\.weight")


def test_wrong_shape_is_named(tmp_path):
    src = _release_copy(tmp_path)

    def edit(w):
        w["acoustic_transformer.time_projection.weight"] = mx.zeros((64, 32), mx.bfloat16)

    _rewrite_weights(src, edit)
    _assert_refused(tmp_path, src, CheckpointError,
                    r"wrong shape: acoustic_transformer\.time_projection\.weight \(64, 32\) \(expected \(64, 64\)\)")


def test_truncated_safetensors_is_refused(tmp_path):
    src = _release_copy(tmp_path)
    f = src / "consolidated.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    _assert_refused(tmp_path, src, CheckpointError, "truncated")


def test_voice_with_foreign_pickle_is_refused(tmp_path):
    src = _release_copy(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("casual_male/data.pkl", pickle.dumps(Evil(), protocol=2))
        z.writestr("casual_male/data/0", b"\0" * (7 * 64 * 2))
    (src / "voice_embedding" / "casual_male.pt").write_bytes(buf.getvalue())
    _assert_refused(tmp_path, src, ValueError, r"casual_male\.pt.*(posix|os)\.system")
    assert not marker.exists()


def test_missing_voice_file_is_named(tmp_path):
    src = _release_copy(tmp_path)
    (src / "voice_embedding" / "neutral_female.pt").unlink()
    _assert_refused(tmp_path, src, CheckpointError, r"neutral_female")


# ---- the real release layout, at full size ----------------------------------------------------

def test_real_release_manifest():
    """params.json of the release implies exactly the 386 tensors listed in spec §3."""
    config = ModelConfig.from_params(json.loads(REAL_PARAMS.read_text()))
    expected = expected_tensors(config)
    assert len(expected) == 386
    assert len([k for k in expected if k.startswith("acoustic_transformer.")]) == 33
    assert len([k for k in expected if k.startswith("audio_tokenizer.")]) == 116
    spot = {
        "mm_audio_embeddings.tok_embeddings.weight": (131072, 3072),
        "mm_audio_embeddings.audio_codebook_embeddings.embeddings.weight": (9088, 3072),
        "layers.25.attention.wq.weight": (4096, 3072),
        "layers.0.attention.wk.weight": (1024, 3072),
        "layers.0.attention.wo.weight": (3072, 4096),
        "layers.7.feed_forward.w2.weight": (3072, 9216),
        "acoustic_transformer.input_projection.weight": (3072, 36),
        "acoustic_transformer.semantic_codebook_output.weight": (8320, 3072),
        "acoustic_transformer.acoustic_codebook_output.weight": (36, 3072),
        "acoustic_transformer.layers.2.ffn_norm.weight": (3072,),
        "audio_tokenizer.quantizer.semantic_codebook.embedding_sum": (8192, 256),
        "audio_tokenizer.quantizer.semantic_codebook.cluster_usage": (8192,),
        "audio_tokenizer.decoder_blocks.0.conv.parametrizations.weight.original0": (1024, 1, 1),
        "audio_tokenizer.decoder_blocks.0.conv.parametrizations.weight.original1": (1024, 292, 3),
        "audio_tokenizer.decoder_blocks.4.conv.parametrizations.weight.original1": (1024, 1024, 4),
        "audio_tokenizer.decoder_blocks.7.layers.1.attention.q_norm.weight": (1024,),
        "audio_tokenizer.decoder_blocks.7.layers.1.attention_scale": (1024,),
        "audio_tokenizer.decoder_blocks.1.layers.0.feed_forward.w1.weight": (4096, 1024),
        "audio_tokenizer.output_proj.conv.parametrizations.weight.original0": (240, 1, 1),
        "audio_tokenizer.output_proj.conv.parametrizations.weight.original1": (240, 1024, 7),
    }
    for name, shape in spot.items():
        assert expected[name] == shape, name
    assert "output.weight" not in expected
    assert not [k for k in expected if "encoder_blocks" in k or "input_proj." in k]


def test_real_release_maps_onto_the_model():
    """Every full-size release tensor lands on a model parameter of the right shape (lazily:
    nothing of the 4 B parameters is ever computed)."""
    config = ModelConfig.from_params(json.loads(REAL_PARAMS.read_text()))
    assert config.codec.window_sizes == [2, 4, 8, 16]
    assert config.samples_per_frame == 1920
    model = Model(config)
    raw = {k: mx.zeros(s, mx.bfloat16) for k, s in expected_tensors(config).items()}
    sanitized = model.sanitize(raw)
    params = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    assert {k: tuple(v.shape) for k, v in sanitized.items()} == params
    n = sum(int(np.prod(s)) for s in params.values())
    assert 3.95e9 < n < 4.05e9  # ≈ 4.0 B parameters (spec §3.3)
