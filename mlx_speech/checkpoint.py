"""Reading and checking the original release layout (spec §1–§3) before any conversion.

The release is ``consolidated.safetensors`` (386 BF16 tensors with Mistral-native names),
``params.json``, ``tekken.json`` and ``voice_embedding/<voice>.pt``. Every tensor name and
shape is implied by params.json; we check the file against that list before loading anything,
so a wrong, truncated or foreign checkpoint is refused with the offending names.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .model import ModelConfig

WEIGHTS_FILE = "consolidated.safetensors"
PARAMS_FILE = "params.json"
TOKENIZER_FILE = "tekken.json"
VOICES_DIR = "voice_embedding"
RELEASE_FILES = (WEIGHTS_FILE, PARAMS_FILE, TOKENIZER_FILE, f"{VOICES_DIR}/*.pt")

_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4}


class CheckpointError(ValueError):
    """The original checkpoint does not match what params.json describes."""


def _decoder_layer(prefix: str, dim: int, hidden: int, n_heads: int, n_kv: int, head_dim: int):
    return {
        f"{prefix}attention.wq.weight": (n_heads * head_dim, dim),
        f"{prefix}attention.wk.weight": (n_kv * head_dim, dim),
        f"{prefix}attention.wv.weight": (n_kv * head_dim, dim),
        f"{prefix}attention.wo.weight": (dim, n_heads * head_dim),
        f"{prefix}attention_norm.weight": (dim,),
        f"{prefix}feed_forward.w1.weight": (hidden, dim),
        f"{prefix}feed_forward.w2.weight": (dim, hidden),
        f"{prefix}feed_forward.w3.weight": (hidden, dim),
        f"{prefix}ffn_norm.weight": (dim,),
    }


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the original release and its shape, as implied by the config (spec §3)."""
    b, a, c = config.backbone, config.acoustic, config.codec
    out: dict[str, tuple[int, ...]] = {
        "mm_audio_embeddings.tok_embeddings.weight": (b.vocab_size, b.dim),
        "mm_audio_embeddings.audio_codebook_embeddings.embeddings.weight": (
            config.audio_embedding_rows,
            b.dim,
        ),
        "norm.weight": (b.dim,),
    }
    for i in range(b.n_layers):
        out.update(_decoder_layer(f"layers.{i}.", b.dim, b.hidden_dim, b.n_heads, b.n_kv_heads, b.head_dim))

    p = "acoustic_transformer."
    out.update(
        {
            f"{p}input_projection.weight": (a.dim, a.n_acoustic_codebook),
            f"{p}time_projection.weight": (a.dim, a.dim),
            f"{p}llm_projection.weight": (a.dim, a.input_dim),
            f"{p}semantic_codebook_output.weight": (a.semantic_head_size, a.dim),
            f"{p}acoustic_codebook_output.weight": (a.n_acoustic_codebook, a.dim),
            f"{p}norm.weight": (a.dim,),
        }
    )
    for i in range(a.n_layers):
        out.update(_decoder_layer(f"{p}layers.{i}.", a.dim, a.hidden_dim, a.n_heads, a.n_kv_heads, a.head_dim))

    p = "audio_tokenizer."
    wn = "conv.parametrizations.weight"
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    out[f"{p}quantizer.semantic_codebook.embedding_sum"] = (c.semantic_codebook_size, c.semantic_dim)
    out[f"{p}quantizer.semantic_codebook.cluster_usage"] = (c.semantic_codebook_size,)
    stages = zip(c.conv_kernels, c.conv_strides, c.transformer_lengths)
    for i, (kernel, _stride, n_layers) in enumerate(stages):
        conv = f"{p}decoder_blocks.{2 * i}.{wn}"
        # Stage 0 is a Conv1d [out, in, k] from the latent; later stages are ConvTranspose1d [in, out, k].
        in_ch = c.semantic_dim + c.acoustic_dim if i == 0 else c.dim
        out[f"{conv}.original0"] = (c.dim, 1, 1) if i == 0 else (in_ch, 1, 1)
        out[f"{conv}.original1"] = (c.dim, in_ch, kernel) if i == 0 else (in_ch, c.dim, kernel)
        for j in range(n_layers):
            lp = f"{p}decoder_blocks.{2 * i + 1}.layers.{j}."
            out.update(
                {
                    f"{lp}attention.wq.weight": (q, c.dim),
                    f"{lp}attention.wk.weight": (kv, c.dim),
                    f"{lp}attention.wv.weight": (kv, c.dim),
                    f"{lp}attention.wo.weight": (c.dim, q),
                    f"{lp}attention.q_norm.weight": (q,),
                    f"{lp}attention.k_norm.weight": (kv,),
                    f"{lp}attention_norm.weight": (c.dim,),
                    f"{lp}ffn_norm.weight": (c.dim,),
                    f"{lp}attention_scale": (c.dim,),
                    f"{lp}ffn_scale": (c.dim,),
                    f"{lp}feed_forward.w1.weight": (c.hidden_dim, c.dim),
                    f"{lp}feed_forward.w2.weight": (c.dim, c.hidden_dim),
                    f"{lp}feed_forward.w3.weight": (c.hidden_dim, c.dim),
                }
            )
    out[f"{p}output_proj.{wn}.original0"] = (c.patch_size, 1, 1)
    out[f"{p}output_proj.{wn}.original1"] = (c.patch_size, c.dim, c.output_kernel_size)
    return out


def read_safetensors_header(path: str | Path) -> dict[str, dict]:
    """Tensor table of a safetensors file, checked for truncation without reading the data."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file (header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: its tensors need {8 + n + end} bytes but the file has {size}"
        )
    return header


def check_checkpoint(path: str | Path, config: ModelConfig) -> dict[str, dict]:
    """Refuse a checkpoint with missing, unexpected or mis-shaped tensors, naming them."""
    header = read_safetensors_header(path)
    expected = expected_tensors(config)
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    misshaped = [
        f"{k} {tuple(header[k]['shape'])} (expected {expected[k]})"
        for k in sorted(set(expected) & set(header))
        if tuple(header[k]["shape"]) != expected[k]
    ]
    bad_dtype = [
        f"{k} {t['dtype']}" for k, t in sorted(header.items()) if t["dtype"] not in _DTYPE_BYTES
    ]
    problems = []
    for label, names in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", misshaped),
        ("unsupported dtype (BF16, F16, F32 expected)", bad_dtype),
    ):
        if names:
            shown = ", ".join(names[:8]) + (f", … ({len(names)} in all)" if len(names) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(
            f"{path} does not match {PARAMS_FILE} ({len(header)} tensors, {len(expected)} expected) — "
            + "; ".join(problems)
        )
    return header
