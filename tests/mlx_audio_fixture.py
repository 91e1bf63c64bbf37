"""Tiny model packs in mlx-audio's Voxtral layout, written at test time by mlx-audio's own code.

mlx-audio (an optional test dependency, ``pip install mlx-audio==0.6.2``) wrote the
mlx-community packs: its ``mlx_audio.convert.convert`` loads a release folder, renames with its
``Model.sanitize``, optionally casts and quantizes with its own predicate, and saves
``model*.safetensors`` + ``config.json`` (the source's config plus a ``quantization`` block),
copying the other files (tekken.json, voice_embedding/) beside them.

The golden tiny checkpoint trips its loader: mlx-audio sizes the audio embedding table as
``(S // 128 + 1) * 128 + round_up(36 * 21, 128)`` rows (no room for the 2 special codes of each
acoustic codebook), which is 896 rows for S = 100 where the checkpoint (and the release's own
rule, ours) has 1024. The real size happens to agree (9088). So the fixture is the golden tiny
configuration with a semantic codebook of 64 codes (1024 rows by both rules), seeded random
weights in the release's names and bf16 (as the release ships), and the golden voices.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_speech.checkpoint import expected_tensors
from mlx_speech.model import ModelConfig
from mlx_speech.pt_reader import read_pt_tensor

MLX_AUDIO_VERSION = "0.6.2"  # the version whose code these tests exercise
SEMANTIC_CODES = 64  # mlx-audio's table size rule and the release's agree for this size
SEMANTIC_HEAD = "acoustic_transformer.semantic_codebook_output.weight"
END_AUDIO_ROW = 1
SAFETENSORS_VOICE = "casual_male"  # given a .safetensors beside its .pt; the other stays .pt only


def mlx_audio_missing() -> str | None:
    """Why mlx-audio's Voxtral converter cannot be used here, or None when it can."""
    try:
        from importlib.metadata import version

        import mlx_audio.convert  # noqa: F401
        import mlx_audio.tts.models.voxtral_tts  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "skip, and say why"
        return f"mlx-audio is not importable ({type(e).__name__}: {e}); pip install mlx-audio=={MLX_AUDIO_VERSION}"
    found = version("mlx-audio")
    if found != MLX_AUDIO_VERSION:
        return f"mlx-audio {found} is installed; these fixtures are written for {MLX_AUDIO_VERSION}"
    return None


def _params(golden: Path) -> dict:
    params = json.loads((golden / "params.json").read_text())
    mm = params["multimodal"]
    mm["audio_model_args"]["semantic_codebook_size"] = SEMANTIC_CODES
    mm["audio_tokenizer_args"]["semantic_codebook_size"] = SEMANTIC_CODES
    return params


def _random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Norms and weight-norm gains near 1, LayerScale 0.01, matrices N(0, 1/fan_in)."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith(("norm.weight", ".original0")):
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if name.endswith("cluster_usage"):
        return rng.uniform(0.5, 4.0, shape)  # the codebook divides by it
    if leaf in ("attention_scale", "ffn_scale"):
        return np.full(shape, 0.01)
    if name.endswith("embedding_sum"):
        return rng.standard_normal(shape)
    return rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))


def write_release(golden: Path, out: Path, seed: int = 0) -> Path:
    """A tiny release folder (params.json, consolidated.safetensors in bf16, tekken.json, voices).

    Also writes ``config.json`` = params.json: mlx-audio's converter reads only config.json, and
    the mlx-community packs' config.json is params.json's content plus ``quantization``.
    """
    out.mkdir(parents=True)
    params = _params(golden)
    config = ModelConfig.from_params(params)
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in sorted(expected_tensors(config).items()):
        w = _random_tensor(name, shape, rng).astype(np.float32)
        if name == SEMANTIC_HEAD:
            w[END_AUDIO_ROW] = 0  # random weights would otherwise end some utterances at frame 0
        weights[name] = mx.array(w).astype(mx.bfloat16)
    mx.save_safetensors(str(out / "consolidated.safetensors"), weights)
    for name in ("params.json", "config.json"):
        (out / name).write_text(json.dumps(params, indent=2))
    shutil.copyfile(golden / "tekken.json", out / "tekken.json")
    (out / "voice_embedding").mkdir()
    for pt in sorted((golden / "voice_embedding").glob("*.pt")):
        shutil.copyfile(pt, out / "voice_embedding" / pt.name)
    return out


def write_pack(release: Path, out: Path, *, dtype: str | None = None, bits: int | None = None,
               group_size: int = 64) -> Path:
    """Convert ``release`` with mlx-audio's own converter: plain (``dtype``) or quantized (``bits``).

    One voice also gets a ``voice_embedding/<name>.safetensors`` (key ``embedding``, float32),
    the form mlx-audio 0.6.2 reads; mlx-audio writes none itself (its converter copies the .pt
    files), so packs may hold .pt only, .safetensors only, or both.
    """
    from mlx_audio.convert import convert

    convert(hf_path=str(release), mlx_path=str(out), dtype=dtype, quantize=bits is not None,
            q_bits=bits, q_group_size=group_size if bits is not None else None, model_domain="tts")
    pt = out / "voice_embedding" / f"{SAFETENSORS_VOICE}.pt"
    mx.save_safetensors(str(pt.with_suffix(".safetensors")),
                        {"embedding": read_pt_tensor(pt).astype(mx.float32)})
    return out
