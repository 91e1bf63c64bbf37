"""Which of the three model layouts a folder holds, what to download for each, and its preset
voices — all without MLX (the command line lists voices and checks ``--voice`` before importing it).

- ``MLX_SPEECH``: our own folder (``python -m mlx_speech.convert``): ``config.json`` with
  ``backbone``/``acoustic``/``codec`` sections, ``model*.safetensors`` in our names,
  ``tekken.json``, ``voices/<name>.safetensors``.
- ``MLX_AUDIO``: a pack written by mlx-audio (the mlx-community conversions): ``config.json`` with
  the release's params.json shape (``multimodal``) plus ``quantization``, ``model*.safetensors``
  in mlx-audio's names, ``tekken.json``, ``voice_embedding/<name>.{safetensors,pt}``.
- ``RELEASE``: the original release: ``params.json``, ``consolidated.safetensors``,
  ``tekken.json``, ``voice_embedding/<name>.pt``. Read directly at load (no converted copy).

A mlx-audio conversion may also carry the release's ``params.json`` and
``consolidated.safetensors``; the pack's own ``config.json`` decides, so it is tested first.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError
from .untrusted_files import read_json

MLX_SPEECH = "mlx-speech folder"
MLX_AUDIO = "mlx-audio pack"
RELEASE = "original release"

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tekken.json"
RELEASE_WEIGHTS = "consolidated.safetensors"
RELEASE_PARAMS = "params.json"
MLX_VOICES_DIR = "voices"  # our folders' presets
RELEASE_VOICES_DIR = "voice_embedding"  # the release's (and mlx-audio's)

# Where each layout keeps its preset voices, and which suffixes (first found wins).
_VOICE_FILES = {
    MLX_SPEECH: (MLX_VOICES_DIR, (".safetensors",)),
    MLX_AUDIO: (RELEASE_VOICES_DIR, (".safetensors", ".pt")),
    RELEASE: (RELEASE_VOICES_DIR, (".pt",)),
}

# Only the files each layout needs: a Hub download fetches nothing else (a pack made by mlx-audio
# may also hold the release's 8 GB consolidated.safetensors, which it does not use).
DOWNLOAD_PATTERNS = {
    MLX_SPEECH: (CONFIG_FILE, "model*.safetensors", INDEX_FILE, TOKENIZER_FILE, "voices/*.safetensors"),
    MLX_AUDIO: (CONFIG_FILE, "model*.safetensors", INDEX_FILE, TOKENIZER_FILE,
                "voice_embedding/*.safetensors", "voice_embedding/*.pt"),
    RELEASE: (RELEASE_WEIGHTS, RELEASE_PARAMS, TOKENIZER_FILE, "voice_embedding/*.pt"),
}
# What a first, small download fetches to tell the layout of a Hub repo.
PROBE_PATTERNS = (CONFIG_FILE, RELEASE_PARAMS)


def config_layout(folder: str | os.PathLike) -> str | None:
    """The layout ``folder/config.json`` alone says (``MLX_SPEECH``, ``MLX_AUDIO``), or None.

    Ours has ``backbone``/``acoustic``/``codec`` sections; mlx-audio's has the release's
    ``multimodal`` one. An unreadable or foreign config.json says nothing: the loader of the
    layout the other files imply reports what is wrong.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        raw = read_json(path)
    except CheckpointError:
        return MLX_SPEECH  # damaged: our loader names the file and the problem
    if isinstance(raw.get("multimodal"), dict) and "backbone" not in raw:
        return MLX_AUDIO
    return MLX_SPEECH


def detect_layout(folder: str | os.PathLike) -> str | None:
    """The layout of a local folder, or None when it holds no model."""
    folder = Path(folder)
    has_weights = (folder / INDEX_FILE).is_file() or any(folder.glob("model*.safetensors"))
    layout = config_layout(folder)
    if layout == MLX_AUDIO and has_weights:
        return MLX_AUDIO
    if layout == MLX_SPEECH:
        return MLX_SPEECH
    if (folder / RELEASE_PARAMS).is_file() and (folder / RELEASE_WEIGHTS).is_file():
        return RELEASE
    return MLX_AUDIO if layout == MLX_AUDIO else None


def preset_voice_files(folder: str | os.PathLike, layout: str) -> dict[str, Path]:
    """The preset voice files of a folder in ``layout``: name → file, sorted by name.

    Names come from file names; the loader checks each name and file (this is for listings).
    """
    sub, suffixes = _VOICE_FILES[layout]
    found: dict[str, Path] = {}
    for suffix in suffixes:
        for f in sorted((Path(folder) / sub).glob(f"*{suffix}")):
            found.setdefault(f.name[: -len(suffix)], f)
    return dict(sorted(found.items()))
