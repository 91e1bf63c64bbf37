"""Reading and checking the original release layout (spec §1–§3) before any conversion.

The release is ``consolidated.safetensors`` (386 BF16 tensors with Mistral-native names),
``params.json``, ``tekken.json`` and ``voice_embedding/<voice>.pt``. Every tensor name and
shape is implied by params.json; we check the file against that list before loading anything,
so a wrong, truncated or foreign checkpoint is refused with the offending names. Every problem
is one ``CheckpointError`` line naming the file and the field or tensor (``read_release``).
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import MAX_VOICES, check_voice_name
from .errors import CheckpointError, file_error, quoted
from .untrusted_files import (
    MAX_TOKENIZER_BYTES,
    inside,
    open_regular_file,
    parse_json,
    read_bytes,
    read_json,
    source_roots,
)
from .model import ModelConfig

if TYPE_CHECKING:
    import mlx.core as mx

WEIGHTS_FILE = "consolidated.safetensors"
PARAMS_FILE = "params.json"
TOKENIZER_FILE = "tekken.json"
VOICES_DIR = "voice_embedding"
RELEASE_FILES = (WEIGHTS_FILE, PARAMS_FILE, TOKENIZER_FILE, f"{VOICES_DIR}/*.pt")

__all__ = ["CheckpointError", "Release", "check_checkpoint", "expected_tensor_count", "expected_tensors",
           "read_release", "read_release_voices", "read_safetensors_header", "read_tokenizer", "voice_path"]

# The dtypes the release may use; every safetensors dtype with its size, for checking headers.
_RELEASE_DTYPES = ("BF16", "F16", "F32")
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
# The release's header is 50 KB; the format's own reference reader refuses more than 100 MB.
MAX_HEADER_BYTES = 16 << 20
MAX_TENSOR_NDIM = 8
# A count this far from the config's is another model (or an edited config): refused without
# building the name table it would otherwise be compared with.
MAX_COUNT_GAP = 64


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


def expected_tensor_count(config: ModelConfig) -> int:
    """``len(expected_tensors(config))``, by arithmetic: 9 tensors per decoder layer, 13 per
    codec transformer layer, 2 per codec conv, and the fixed ones."""
    b, a, c = config.backbone, config.acoustic, config.codec
    return 3 + 9 * b.n_layers + 6 + 9 * a.n_layers + 2 + sum(2 + 13 * n for n in c.transformer_lengths) + 2


def read_safetensors_header(path: str | os.PathLike, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, dict]:
    """Tensor table of a safetensors file, every entry checked, without reading the data.

    Each entry must have a known ``dtype``, a ``shape`` of non-negative ints and ``data_offsets``
    [begin, end] holding exactly dtype × shape bytes inside the file, with no two ranges
    overlapping: then any reader (``mx.load`` included) reads only what the header promises.

    Raises:
        CheckpointError: "<path>: <problem>", naming the tensor and the field, for a file that is
            not a regular file, truncated, or whose header is malformed.
    """
    with open_regular_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise file_error(path, f"is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise file_error(path, f"is truncated or not a safetensors file (header says {n} bytes, file has {size})")
        if n > max_header_bytes:
            raise file_error(path, f"safetensors header of {n} bytes is over the limit of {max_header_bytes}")
        data = f.read(n)
    if len(data) < n:
        raise file_error(path, "is truncated: it shrank while being read")
    header = parse_json(data, f"{os.fspath(path)} (safetensors header)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise file_error(path, f"__metadata__ is {quoted(metadata)}; expected an object of strings")
    data_size = size - 8 - n
    spans = sorted((_check_entry(path, name, entry, data_size), name) for name, entry in header.items())
    for ((_, prev_end), prev), ((begin, _), name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise file_error(path, f"tensors {quoted(prev)} and {quoted(name)} overlap in the file")
    return header


def _check_entry(path, name: str, entry, data_size: int) -> tuple[int, int]:
    """The (begin, end) data range of one header entry, after checking every field of it."""
    where = f"tensor {quoted(name)}"
    if not isinstance(entry, dict):
        raise file_error(path, f"{where} entry is {quoted(entry)}; expected an object with dtype, shape, data_offsets")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise file_error(path, f"{where} has no {key!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BYTES:
        raise file_error(path, f"{where} dtype is {quoted(dtype)}; expected a safetensors dtype like BF16")
    if not (isinstance(shape, list) and len(shape) <= MAX_TENSOR_NDIM and all(_is_count(d) for d in shape)):
        raise file_error(path, f"{where} shape is {quoted(shape)}; expected at most {MAX_TENSOR_NDIM} non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise file_error(path, f"{where} data_offsets is {quoted(offsets)}; expected [begin, end], non-negative integers")
    begin, end = offsets
    if begin > end:
        raise file_error(path, f"{where} data_offsets {quoted(offsets)} begin after they end")
    if end > data_size:
        raise file_error(path, f"is truncated: {where} needs bytes up to {end} of the data but the file holds {data_size}")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
    if end - begin != nbytes:
        raise file_error(path, f"{where} data_offsets {quoted(offsets)} hold {end - begin} bytes; "
                               f"{dtype} × {quoted(tuple(shape))} needs {nbytes}")
    return begin, end


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_checkpoint(path: str | Path, config: ModelConfig) -> dict[str, dict]:
    """Refuse a checkpoint with missing, unexpected or mis-shaped tensors, naming them."""
    header = read_safetensors_header(path)
    count = expected_tensor_count(config)
    if abs(len(header) - count) > MAX_COUNT_GAP:
        raise file_error(path, f"has {len(header)} tensors but {PARAMS_FILE} implies {count}; "
                               "the file and params.json are not the same model")
    expected = expected_tensors(config)
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    misshaped = [
        f"{k} {tuple(header[k]['shape'])} (expected {expected[k]})"
        for k in sorted(set(expected) & set(header))
        if tuple(header[k]["shape"]) != expected[k]
    ]
    bad_dtype = [
        f"{k} {t['dtype']}" for k, t in sorted(header.items()) if t["dtype"] not in _RELEASE_DTYPES
    ]
    problems = []
    for label, names in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", misshaped),
        ("unsupported dtype (BF16, F16, F32 expected)", bad_dtype),
    ):
        if names:
            shown = ", ".join(n if len(n) <= 100 else quoted(n, 100) for n in names[:8])
            shown += f", … ({len(names)} in all)" if len(names) > 8 else ""
            problems.append(f"{label}: {shown}")
    if problems:
        raise file_error(path, f"does not match {PARAMS_FILE} ({len(header)} tensors, {len(expected)} expected) — "
                               + "; ".join(problems))
    return header


# ---- tokenizer and voices (shared with loading.load) ---------------------------------------------

def read_tokenizer(path: str | os.PathLike):
    """Load ``tekken.json`` (``Tokenizer``, which refuses a damaged file as one CheckpointError
    line), after checking it is a regular file without blocking on a FIFO, and check that every
    preset-voice name is a ``VOICE_NAME``: each becomes a file name.

    Raises:
        CheckpointError: naming the file and the problem.
    """
    from .tokenizer import Tokenizer

    open_regular_file(path).close()
    try:
        tokenizer = Tokenizer.from_file(path)
    except FileNotFoundError:
        raise file_error(path, "is missing") from None
    table = tokenizer.voice_num_audio_tokens
    if len(table) > MAX_VOICES:
        raise file_error(path, f"audio.voice_num_audio_tokens lists {len(table)} voices; at most {MAX_VOICES}")
    for name in table:
        check_voice_name(name, path, "audio.voice_num_audio_tokens")
    return tokenizer


def voice_path(folder: Path, name: str, suffix: str, roots: list[Path]) -> Path:
    """``folder/<name><suffix>``, refused unless it really lies inside ``roots`` (symlinks resolved).

    ``name`` is a checked ``VOICE_NAME``; this is the second guard: the file a voice name maps
    to is read or written only inside its folder.
    """
    check_voice_name(name, folder, "voice file name")
    path = folder / f"{name}{suffix}"
    if not inside(path.parent, roots) or not inside(path, roots):
        raise file_error(path, "is a link to a place outside its model folder; refusing to follow it")
    return path


def read_release_voices(source: Path, tokenizer, dim: int) -> dict[str, "mx.array"]:
    """Every voice tekken.json lists, read from its .pt without torch, checked for shape and values."""
    from .pt_reader import read_pt_tensor
    from .voice_file import check_voice_embedding

    folder = source / VOICES_DIR
    roots = source_roots(source)
    voices = {}
    for name, rows in tokenizer.voice_num_audio_tokens.items():
        f = voice_path(folder, name, ".pt", roots)
        if not f.is_file():
            raise file_error(f, f"is missing; {TOKENIZER_FILE} lists the voice {name}")
        try:
            # bounded by the voice's size (4 bytes an element: the widest dtype the reader takes)
            emb = read_pt_tensor(f, max_bytes=rows * dim * 4)
        except CheckpointError:
            raise
        except (ValueError, OSError, RuntimeError, OverflowError, NotImplementedError, MemoryError,
                EOFError, KeyError, AttributeError, TypeError, IndexError) as e:
            text = str(e) or type(e).__name__
            if os.fspath(f) in text:
                raise CheckpointError(text) from None
            raise file_error(f, f"unreadable voice file ({type(e).__name__}: {quoted(text, 200)})") from None
        check_voice_embedding(emb, dim, f, rows)
        voices[name] = emb
    return voices


@dataclass
class Release:
    """The original release, read and checked: everything the converter needs."""

    source: Path
    config: ModelConfig
    header: dict[str, dict]
    tokenizer: object  # tokenizer.Tokenizer
    tokenizer_bytes: bytes  # tekken.json as read and checked, copied into the output as is
    voices: dict[str, "mx.array"]


def read_release(source: Path) -> Release:
    """Read and check a release folder: params.json, the weights' header, tekken.json, voices.

    Nothing here reads the weights' data; every size is checked before anything is allocated.

    Raises:
        CheckpointError: naming the file and the field or tensor at fault.
    """
    for name in (WEIGHTS_FILE, PARAMS_FILE, TOKENIZER_FILE):
        if not (source / name).exists():
            raise file_error(source / name, f"is missing; the original release has {name}")
    config = ModelConfig.from_params(read_json(source / PARAMS_FILE), source / PARAMS_FILE)
    header = check_checkpoint(source / WEIGHTS_FILE, config)
    tokenizer_bytes = read_bytes(source / TOKENIZER_FILE, MAX_TOKENIZER_BYTES)
    tokenizer = read_tokenizer(source / TOKENIZER_FILE)
    voices = read_release_voices(source, tokenizer, config.backbone.dim)
    config.voices = list(voices)
    return Release(source, config, header, tokenizer, tokenizer_bytes, voices)
