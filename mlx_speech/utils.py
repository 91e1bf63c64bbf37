"""Finding, loading and saving MLX model folders.

An MLX model folder holds ``config.json``, ``model*.safetensors`` (sharded above 5 GB with an
index), ``tekken.json`` and ``voices/<name>.safetensors`` (key ``embedding``). ``load`` also
accepts the original release (a folder or a Hub repo id): it is converted once into a local
cache and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .model import Model, ModelConfig
from .tokenizer import Tokenizer

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tekken.json"
VOICES_DIR = "voices"
MAX_SHARD_BYTES = 5 << 30


def cache_dir() -> Path:
    """Where auto-converted models go: $MLX_SPEECH_CACHE, else ~/.cache/mlx_speech."""
    return Path(os.environ.get("MLX_SPEECH_CACHE", Path.home() / ".cache" / "mlx_speech"))


def is_mlx_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def is_release_folder(path: Path) -> bool:
    return (path / "params.json").is_file() and (path / "consolidated.safetensors").is_file()


def get_model_path(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local folder as is, or a Hub repo downloaded (only the files a model needs)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"model path {path} is a file; give the model folder")
        return path
    text = str(path_or_repo)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(
            f"model {text!r} is neither an existing folder nor a Hub repo id like 'owner/name'"
        )
    from huggingface_hub import snapshot_download

    from .checkpoint import RELEASE_FILES

    patterns = [CONFIG_FILE, "model*.safetensors", "model.safetensors.index.json",
                TOKENIZER_FILE, f"{VOICES_DIR}/*.safetensors", *RELEASE_FILES]
    return Path(snapshot_download(text, revision=revision, allow_patterns=patterns))


def _converted_cache_dir(source: Path) -> Path:
    """Where an auto-converted copy of an original release lives (one per source and version)."""
    weights = source / "consolidated.safetensors"
    stat = weights.stat()
    key = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{source.name}-{digest}"


def resolve_model(path_or_repo: str | Path, revision: str | None = None, verbose: bool = False) -> Path:
    """The MLX folder for a model: converting an original release once, into the cache."""
    path = get_model_path(path_or_repo, revision)
    if is_mlx_folder(path):
        return path
    if is_release_folder(path):
        target = _converted_cache_dir(path)
        if not is_mlx_folder(target):
            from .convert import convert

            convert(hf_path=str(path), mlx_path=str(target), verbose=verbose)
        return target
    raise FileNotFoundError(
        f"{path} holds neither an MLX model ({CONFIG_FILE}) nor the original release "
        "(params.json + consolidated.safetensors)"
    )


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors weights in {path}")
    return files


def load_voices(path: Path) -> dict[str, mx.array]:
    voices = {}
    for f in sorted((path / VOICES_DIR).glob("*.safetensors")):
        data = mx.load(str(f))
        if "embedding" not in data:
            raise ValueError(f"voice file {f} has no 'embedding' tensor (has {sorted(data)})")
        voices[f.stem] = data["embedding"]
    return voices


def load(path_or_repo: str | Path, revision: str | None = None, lazy: bool = False,
         verbose: bool = False) -> Model:
    """Load a model for generation.

    Args:
        path_or_repo: an MLX model folder, a folder with the original release, or a Hub repo id
            of either (default release: ``mistralai/Voxtral-4B-TTS-2603``). An original release
            is converted once (bfloat16) into ``$MLX_SPEECH_CACHE`` (``~/.cache/mlx_speech``).
        revision: Hub revision to download.
        lazy: leave weights unevaluated until first use.
        verbose: print progress while converting.

    Returns:
        A ``Model`` with ``.tokenizer`` (a ``Tokenizer``), ``.voices`` and ``.config`` set.
    """
    path = resolve_model(path_or_repo, revision, verbose=verbose)
    try:
        config_dict = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / CONFIG_FILE} is not valid JSON: {e}") from None
    config = ModelConfig.from_dict(config_dict)
    model = Model(config)
    weights = {}
    for f in _weight_files(path):
        weights.update(mx.load(str(f)))
    if config.quantization:
        q = config.quantization
        nn.quantize(
            model,
            group_size=q["group_size"],
            bits=q["bits"],
            class_predicate=lambda p, m: model.quant_predicate(p, m) and f"{p}.scales" in weights,
        )
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    model.tokenizer = Tokenizer.from_file(path / TOKENIZER_FILE)
    model.set_voices(load_voices(path))
    return model


def save_model(path: Path, model: Model) -> None:
    """Write weights (sharded above MAX_SHARD_BYTES) and config.json into an existing folder."""
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
