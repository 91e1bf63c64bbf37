"""Loading a model in any of the three layouts (``model_layout``), and saving our own.

``load`` resolves the folder (a Hub repo is downloaded: only the files its layout needs) and
reads it with the reader of its layout, each checking everything before it allocates and
refusing a damaged or hostile file with one ``CheckpointError`` line naming the file and the
field or tensor:

- our MLX folder (``config.json``, ``model*.safetensors``, ``tekken.json``,
  ``voices/<name>.safetensors``): read the config (``read_config``) → build the model from the
  weights' headers (``build_model``: nothing allocated until every size and shape is checked) →
  load the weights (``load_weights``: every tensor finite) → tokenizer and voices
  (``load_voices``);
- the original release: read directly (``release_loader``), no converted copy on disk;
- a mlx-community pack (mlx-audio's layout): mapped once onto our model (``mlx_audio_pack``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .checkpoint import (
    expected_tensor_count,
    read_safetensors_header,
    read_tokenizer,
    voice_path,
)
from .config import MAX_VOICES
from .errors import CheckpointError, file_error, quoted
from .untrusted_files import read_json, source_roots
from .model_layout import MLX_AUDIO, RELEASE, detect_layout
from .model_source import ModelNotFoundError, get_model_path

from .model_layout import CONFIG_FILE, TOKENIZER_FILE  # noqa: E402  (one definition of the names)
from .model_layout import MLX_VOICES_DIR as VOICES_DIR  # noqa: E402
MAX_SHARD_BYTES = 5 << 30
MAX_SHARDS = 256
_FLOAT_DTYPES = ("F16", "BF16", "F32")

log = logging.getLogger("mlx_speech")


def resolve_model(path_or_repo: str | Path, revision: str | None = None) -> tuple[Path, str]:
    """The local folder of a model (downloading a Hub repo) and its ``model_layout`` layout.

    Raises:
        ModelNotFoundError: no such folder or repo, or a folder that holds no model.
    """
    path = get_model_path(path_or_repo, revision)
    layout = detect_layout(path)
    if layout is None:
        raise ModelNotFoundError(
            f"{path} holds no model: neither an MLX model ({CONFIG_FILE}), a mlx-community pack, nor "
            "the original release (params.json + consolidated.safetensors)"
        )
    return path, layout


# ---- reading an MLX folder --------------------------------------------------------------

def read_config(path: Path):
    """The checked ``ModelConfig`` of an MLX folder's config.json."""
    from .model import ModelConfig

    return ModelConfig.from_dict(read_json(path / CONFIG_FILE), path / CONFIG_FILE)


def model_tensor_count(config) -> int:
    """Tensors of an unquantized MLX folder: the release's, with each weight-normed conv's pair
    (original0/1) folded into one weight and the codebook's pair into one embedding."""
    return expected_tensor_count(config) - (len(config.codec.transformer_lengths) + 1) - 1


def weight_headers(path: Path) -> dict[Path, dict[str, dict]]:
    """The checked header of every ``model*.safetensors`` shard; a tensor in two shards is refused."""
    files = sorted(f for f in path.glob("model*.safetensors"))
    if not files:
        raise file_error(path, "has no model*.safetensors weights")
    if len(files) > MAX_SHARDS:
        raise file_error(path, f"has {len(files)} model*.safetensors shards; at most {MAX_SHARDS}")
    headers, seen = {}, {}
    for f in files:
        headers[f] = read_safetensors_header(f)
        for name in headers[f]:
            if name in seen:
                raise file_error(f, f"tensor {quoted(name)} is also in {seen[name].name}")
            seen[name] = f
    return headers


def quantize_as_stored(model, quantization: dict | None, names) -> None:
    """Quantize the layers of ``model`` that the recipe covers and that are stored quantized
    (their ``<layer>.scales`` is among the weight ``names``), so a strict load then fits."""
    if quantization:
        import mlx.nn as nn

        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                    class_predicate=lambda p, m: model.quant_predicate(p, m) and f"{p}.scales" in names)


def build_model(config, headers: dict[Path, dict[str, dict]]):
    """The (unloaded) model the config and the weights' headers describe, quantized as they say.

    The tensor count is compared with the config before anything is built, and every
    parameter's name, shape and dtype against the headers after: a mismatch is refused naming
    the tensors, with no weight data read.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .checkpoint import MAX_COUNT_GAP
    from .model import Model

    entries = {name: (f, t) for f, header in headers.items() for name, t in header.items()}
    plain = sum(not n.endswith((".scales", ".biases")) for n in entries)
    count = model_tensor_count(config)
    first = next(iter(headers))
    if abs(plain - count) > MAX_COUNT_GAP:
        raise file_error(first, f"holds {plain} weight tensors but {CONFIG_FILE} implies {count}; "
                                "the weights and config.json are not the same model")
    model = Model(config)
    quantize_as_stored(model, config.quantization, entries)
    params = dict(tree_flatten(model.parameters()))
    misshaped, bad_dtype = [], []
    for name in sorted(set(params) & set(entries)):
        t, want = entries[name][1], params[name]
        want_int = not mx.issubdtype(want.dtype, mx.floating)
        if tuple(t["shape"]) != tuple(want.shape):
            misshaped.append(f"{name} {tuple(t['shape'])} (expected {tuple(want.shape)})")
        elif (t["dtype"] == "U32") != want_int or (not want_int and t["dtype"] not in _FLOAT_DTYPES):
            bad_dtype.append(f"{name} {t['dtype']} (expected {'U32' if want_int else 'F16, BF16 or F32'})")
    problems = [
        f"{label}: {_names(names)}"
        for label, names in (("missing", sorted(set(params) - set(entries))),
                             ("unexpected", sorted(set(entries) - set(params))),
                             ("wrong shape", misshaped), ("wrong dtype", bad_dtype))
        if names
    ]
    if problems:
        raise file_error(first if len(headers) == 1 else first.parent,
                         f"weights do not match {CONFIG_FILE}: " + "; ".join(problems))
    return model


def _names(names: list[str], limit: int = 3) -> str:
    shown = [n if len(n) <= 100 else quoted(n, 100) for n in names[:limit]]
    return ", ".join(shown) + (f", … ({len(names)} in all)" if len(names) > limit else "")


def load_weights(model, headers: dict[Path, dict[str, dict]], check_finite: bool = True) -> None:
    """Load every shard into ``model`` (its shapes already match ``headers``) and evaluate it.

    With ``check_finite``, every floating tensor (for quantized layers: the scales and biases)
    is checked for NaN and infinities in the same evaluation that loads it, and the first bad
    one is refused by name.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .finite import refuse_non_finite

    weights, where = {}, {}
    for f in headers:
        try:
            shard = mx.load(str(f))
        except (RuntimeError, ValueError, OSError) as e:
            raise file_error(f, f"unreadable safetensors file ({quoted(str(e), 200)})") from None
        weights.update(shard)
        where.update(dict.fromkeys(shard, f))
    model.load_weights(list(weights.items()), strict=True)
    del weights
    if check_finite:
        refuse_non_finite(dict(tree_flatten(model.parameters())), next(iter(headers)).parent, where=where)


def load_voices(path: Path, dim: int, rows: dict[str, int] | None = None,
                required: list[str] | tuple[str, ...] = ()) -> dict:
    """The checked preset voices of an MLX folder: ``voices/<name>.safetensors`` → (rows, dim).

    Each file stem is a voice name and must be a ``VOICE_NAME``; each file must really lie in
    the folder (no link out of it) and pass ``voice_file.read_voice_file`` with the row count
    tekken.json gives that voice (``rows``). Every name in ``required`` (config.json's list)
    must have its file.

    Raises:
        CheckpointError: a missing voices folder or voice, or a bad voice file, named.
    """
    from .voice_file import read_voice_file

    folder = path / VOICES_DIR
    if not folder.is_dir():
        raise file_error(folder, "is missing; a model folder keeps its preset voices in "
                                 f"{VOICES_DIR}/<name>.safetensors (convert the release again)")
    files = sorted(folder.glob("*.safetensors"))
    if len(files) > MAX_VOICES:
        raise file_error(folder, f"holds {len(files)} voice files; at most {MAX_VOICES}")
    roots, rows = source_roots(path), rows or {}
    voices = {}
    for f in files:
        voice_path(folder, f.stem, ".safetensors", roots)  # a name, and a file inside the folder
        voices[f.stem], _ = read_voice_file(f, dim, rows.get(f.stem))
    missing = [n for n in required if n not in voices]
    if missing:
        raise file_error(folder / f"{missing[0]}.safetensors", f"is missing; {CONFIG_FILE} lists the voice {missing[0]}")
    if not voices:
        raise file_error(folder, "holds no voices (<name>.safetensors files)")
    return voices


def load(path_or_repo: str | Path, revision: str | None = None, lazy: bool = False,
         verbose: bool = False, dtype: str = "bfloat16"):
    """Load a model for generation.

    Args:
        path_or_repo: a local folder or a Hub repo id, in any layout: our MLX folder
            (``python -m mlx_speech.convert``), the original release (default:
            ``mistralai/Voxtral-4B-TTS-2603``, read directly, nothing written to disk), or a
            mlx-community pack made by mlx-audio (e.g. ``mlx-community/Voxtral-4B-TTS-2603-mlx-4bit``).
        revision: Hub revision to download.
        lazy: leave an MLX folder's weights unevaluated until first use; this also skips the
            check that every weight is finite (it would read them all).
        verbose: print which layout was read (also logged to the ``mlx_speech`` logger).
        dtype: the weight dtype when reading the original release (bfloat16, float16, float32);
            the other layouts keep the dtype they were saved in.

    Returns:
        A ``Model`` with ``.tokenizer`` (a ``Tokenizer``), ``.voices``, ``.config`` and
        ``.source`` (a line saying which layout was read) set.

    Raises:
        CheckpointError: a damaged or hostile file, named with the field or tensor at fault.
        ModelNotFoundError: no such folder, or a Hub repo that cannot be downloaded.
    """
    path, layout = resolve_model(path_or_repo, revision)
    if layout == RELEASE:
        from .release_loader import load_release

        model = load_release(path, dtype)
        source = f"{RELEASE} {path.name} (read directly, {dtype})"
    elif layout == MLX_AUDIO:
        model, source = _load_pack(path)
    else:
        model = _load_mlx_folder(path, lazy)
        q = model.config.quantization
        source = f"{layout} {path.name}" + (f" ({q['bits']}-bit, group {q['group_size']})" if q else "")
    model.source = source
    log.info("read %s", source)
    if verbose:
        print(f"read {source}")
    return model


def _load_mlx_folder(path: Path, lazy: bool):
    config = read_config(path)
    headers = weight_headers(path)
    model = build_model(config, headers)
    load_weights(model, headers, check_finite=not lazy)
    model.eval()
    model.tokenizer = read_tokenizer(path / TOKENIZER_FILE)
    rows = model.tokenizer.voice_num_audio_tokens
    model.set_voices(load_voices(path, config.backbone.dim, rows, config.voices))
    return model


def _load_pack(path: Path):
    """A mlx-community pack mapped onto our model (``mlx_audio_pack``), checked like our folders."""
    from mlx.utils import tree_flatten

    from .finite import refuse_non_finite
    from .mlx_audio_pack import read_mlx_audio_pack
    from .model import Model

    tokenizer = read_tokenizer(path / TOKENIZER_FILE)
    pack = read_mlx_audio_pack(path, voice_rows=tokenizer.voice_num_audio_tokens)
    model = Model(pack.config)
    quantize_as_stored(model, pack.quantization, pack.weights)
    model.load_weights(list(pack.weights.items()), strict=True)
    refuse_non_finite(dict(tree_flatten(model.parameters())), path)
    model.eval()
    model.tokenizer = tokenizer
    model.set_voices(pack.voices)
    return model, pack.description


def save_model(path: Path, model) -> None:
    """Write weights (sharded above MAX_SHARD_BYTES) and config.json into an existing folder."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    shards, current, size = [], {}, 0
    for k in sorted(weights):
        nbytes = weights[k].nbytes
        if current and size + nbytes > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[k] = weights[k]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        mx.save_safetensors(str(path / "model.safetensors"), shards[0], metadata={"format": "mlx"})
    else:
        index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())}, "weight_map": {}}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            mx.save_safetensors(str(path / name), shard, metadata={"format": "mlx"})
            index["weight_map"].update({k: name for k in shard})
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    (path / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True))


__all__ = ["CheckpointError", "ModelNotFoundError", "build_model", "get_model_path", "load",
           "load_voices", "load_weights", "read_config", "resolve_model", "save_model", "weight_headers"]
