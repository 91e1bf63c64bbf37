"""What voices there are, without MLX: the 20 presets' language and gender by name, and the
user's folder of custom voices.

The preset embeddings live in the model folder (``voices/<name>.safetensors``); custom voices
(made by ``python -m mlx_speech.clone``) are files of the same form, anywhere or in
``user_voice_dir()``. Nothing here reads a tensor: listings (CLI ``--list-voices``) stay fast.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")  # as config.VOICE_NAME: a name is never a path
_LANGUAGES = {
    "ar": "Arabic", "de": "German", "es": "Spanish", "fr": "French", "hi": "Hindi",
    "it": "Italian", "nl": "Dutch", "pt": "Portuguese",
}
_ENGLISH_STYLES = ("casual", "cheerful", "neutral")

# The release's 20 presets and their rows ([AUDIO] slots = frames of reference audio + the END
# row), in tekken.json order (spec §4.4): what a full-size tekken.json's audio section lists.
PRESET_ROWS = {
    "casual_female": 214, "casual_male": 147, "cheerful_female": 132, "neutral_female": 218,
    "neutral_male": 169, "pt_male": 144, "pt_female": 175, "nl_male": 138, "nl_female": 146,
    "it_male": 168, "it_female": 172, "fr_male": 97, "fr_female": 97, "es_male": 208,
    "es_female": 138, "de_male": 163, "de_female": 147, "ar_male": 67, "hi_male": 94, "hi_female": 86,
}


def voice_info(name: str) -> tuple[str, str]:
    """(language, gender) of a preset from its name, e.g. ``fr_male`` → ("French", "male").

    Names outside the release's scheme give ("unknown", "unknown").
    """
    prefix, _, gender = name.rpartition("_")
    if gender not in ("male", "female"):
        return "unknown", "unknown"
    if prefix in _ENGLISH_STYLES:
        return f"English ({prefix})", gender
    return _LANGUAGES.get(prefix, "unknown"), gender


# ---- custom voices in the user's voice folder ---------------------------------------------------
VOICE_SUFFIX = ".safetensors"


def user_voice_dir() -> Path:
    """Where ``--voice NAME`` also looks for ``NAME.safetensors``: ``$MLX_SPEECH_VOICES``, else
    ``~/.cache/mlx_speech/voices`` (``python -m mlx_speech.clone`` output can be saved there)."""
    return Path(os.environ.get("MLX_SPEECH_VOICES", Path.home() / ".cache" / "mlx_speech" / "voices")).expanduser()


def user_voice_files(folder: Path | None = None) -> dict[str, Path]:
    """Custom voices found in ``folder`` (default ``user_voice_dir()``): name → file, sorted.

    Only names that are valid voice names (letters, digits, ``_``) are listed; an absent
    folder lists nothing.
    """
    folder = user_voice_dir() if folder is None else Path(folder)
    if not folder.is_dir():
        return {}
    found = {f.name[: -len(VOICE_SUFFIX)]: f for f in folder.iterdir()
             if f.name.endswith(VOICE_SUFFIX) and f.is_file()}
    return {name: found[name] for name in sorted(found) if _NAME.fullmatch(name)}


def looks_like_voice_file(voice: str | os.PathLike) -> bool:
    """Whether a ``voice`` argument names a file rather than a voice: a path object, a name
    ending in ``.safetensors``, or one with a folder separator (voice names have neither)."""
    if isinstance(voice, os.PathLike):
        return True
    return isinstance(voice, str) and (voice.endswith(VOICE_SUFFIX) or "/" in voice or os.sep in voice)


def unknown_voice_message(voice: str, known: list[str], custom: dict[str, Path] | None = None) -> str:
    """"unknown voice 'x'; choose one of: …" listing ``known`` voices, the user's custom ones
    (``user_voice_files()`` unless given) and that a voice file will do."""
    custom = user_voice_files() if custom is None else custom
    extra = f"; custom voices in {user_voice_dir()}: {', '.join(custom)}" if custom else ""
    return f"unknown voice {voice!r}; choose one of: {', '.join(known)}{extra}, or give a voice file (.safetensors)"
