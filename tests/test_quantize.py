"""Quantization recipes: what gets quantized, that the result loads and speaks, and how close
it stays to the float model.

Closeness measure: the relative L2 error ‖h_q − h‖ / ‖h‖ of the backbone hidden state of every
frame, teacher-forced on the golden g2 codes (so both models see identical inputs). That hidden
state is the only thing the semantic head and the flow-matching head read from the backbone, so
it is where backbone quantization shows; the codes themselves are a discontinuous function of it
(an argmax and a rounding) and on a random tiny model a small error can flip one, so comparing
codes would test luck rather than the recipe. Affine b-bit quantization has a step of about
range/2^b, so the error should roughly halve per extra bit; the bounds below are ~2.5× the errors
observed on the golden checkpoint (8-bit 0.011, 6-bit 0.037, 4-bit 0.11).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY

from mlx_speech import generate, load
from mlx_speech.convert import convert

TEXT = "Hello world, this is a test."
VOICE = "casual_male"
BOUNDS = {8: 0.03, 6: 0.09, 4: 0.25}


def _hidden(model, codes: mx.array) -> np.ndarray:
    ids = model.tokenizer.encode_speech(TEXT, VOICE)
    emb = model.prompt_embeddings(mx.array(ids), model.voice(VOICE))
    cache = model.make_cache()
    hs = [model(emb[None], cache)[:, -1]]
    for k in range(codes.shape[0] - 1):
        hs.append(model(model.audio_code_embeddings(codes[k : k + 1])[:, None], cache)[:, -1])
    return np.array(mx.concatenate(hs))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {
        bits: convert(hf_path=str(TINY), mlx_path=str(root / f"q{bits}"), dtype="float32",
                      quantize=True, q_bits=bits, q_group_size=32, verbose=False)
        for bits in BOUNDS
    }


def test_recipe_is_recorded_and_only_backbone_linears_are_quantized(quantized):
    path = quantized[4]
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"] == {"bits": 4, "group_size": 32, "acoustic": False}
    weights = mx.load(str(path / "model.safetensors"))
    quantized_layers = {k[: -len(".scales")] for k in weights if k.endswith(".scales")}
    assert quantized_layers and all(k.startswith("backbone.layers.") for k in quantized_layers)
    assert len(quantized_layers) == 2 * 7  # 2 layers × (q, k, v, o, gate, up, down)
    # Never quantized: the embedding tables used for the prompt and for code feedback, the codec.
    assert weights["backbone.embed_tokens.weight"].dtype == mx.float32
    assert weights["audio_embeddings.weight"].dtype == mx.float32
    assert not [k for k in weights if k.startswith(("audio_tokenizer.", "acoustic_transformer.")) and k.endswith(".scales")]


def test_quantized_models_stay_close_to_the_float_model(model, quantized, cases):
    codes = cases["g2_e2e_eoa"]["codes"].astype(mx.int32)
    h = _hidden(model, codes)
    errors = {}
    for bits, path in quantized.items():
        hq = _hidden(load(path), codes)
        errors[bits] = float((np.linalg.norm(hq - h, axis=-1) / np.linalg.norm(h, axis=-1)).max())
        assert errors[bits] <= BOUNDS[bits], (bits, errors[bits])
    assert errors[8] < errors[6] < errors[4]  # fewer bits, larger error


def test_quantized_model_speaks(quantized):
    m = load(quantized[4])
    result = generate(m, TEXT, VOICE, seed=2, max_frames=6)
    assert result.codes.shape[1] == 37 and len(result.audio) == 1920 * result.frames
    assert np.isfinite(result.audio).all()
    assert ((result.codes[:, 1:] >= 2) & (result.codes[:, 1:] <= 22)).all()


def test_quantizing_the_flow_transformer_too(tmp_path, model, cases):
    path = convert(hf_path=str(TINY), mlx_path=str(tmp_path / "qa"), dtype="float32", quantize=True,
                   q_bits=8, q_group_size=32, q_acoustic=True, verbose=False)
    weights = mx.load(str(path / "model.safetensors"))
    acoustic = {k for k in weights if k.startswith("acoustic_transformer.") and k.endswith(".scales")}
    assert "acoustic_transformer.layers.0.attention.wq.scales" in acoustic
    assert "acoustic_transformer.semantic_codebook_output.scales" not in acoustic  # fp32 head
    m = load(path)
    c = cases["e1_flow_frame"]
    ref = np.array(model.acoustic_transformer.sample_acoustic(c["llm_hidden"], c["x0"], 7, 1.2))
    ours = np.array(m.acoustic_transformer.sample_acoustic(c["llm_hidden"], c["x0"], 7, 1.2))
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 0.05
    with pytest.raises(ValueError, match="only applies with -q"):
        convert(hf_path=str(TINY), mlx_path=str(tmp_path / "bad"), q_acoustic=True, verbose=False)
