"""Which rows to speak with: a preset or added voice by name, a voice file, or a ``Voice``.

Every entry point (``stream_generate``, long text, the CLI, the server) takes ``voice`` as one of

- a name the model knows (``model.voices``: the presets, plus voices added with
  ``Model.add_voice`` or the server's ``--voices``);
- a path to a voice file (``me.safetensors``, a ``Path``), read and checked;
- a name in the user's voice folder (``voices.user_voice_dir()``);
- a ``Voice`` object (e.g. from ``enroll``).

``select_voice`` resolves it once into a ``SelectedVoice``: the checked rows and a cache key (the
name for model voices, a digest of the rows for the others, so the voice-prefix KV cache is
reused for the same custom voice and never confused between two).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .voice_file import Voice, check_voice_embedding
from .voices import looks_like_voice_file, unknown_voice_message, user_voice_files


@dataclass(frozen=True)
class SelectedVoice:
    """A resolved voice: ``rows`` (N, dim) to place at the [AUDIO] slots, ``key`` for caches,
    ``name`` for messages and listings."""

    name: str
    key: str
    rows: mx.array

    @property
    def n_rows(self) -> int:
        return int(self.rows.shape[0])


def _custom(model, voice: Voice, source) -> SelectedVoice:
    rows = np.asarray(voice.embedding, np.float32)
    check_voice_embedding(mx.array(rows), model.config.backbone.dim, source)
    digest = hashlib.sha256(rows.tobytes()).hexdigest()[:16]
    return SelectedVoice(voice.name or "custom", f"custom:{digest}", mx.array(rows))


def select_voice(model, voice) -> SelectedVoice:
    """Resolve ``voice`` (see the module docstring) for ``model``.

    Raises:
        ValueError: an unknown name (the message lists the model's voices and the user's
            custom ones); ``CheckpointError`` (a ValueError) for a bad voice file.
        FileNotFoundError: a voice file that does not exist.
    """
    if isinstance(voice, SelectedVoice):
        return voice
    if isinstance(voice, Voice):
        return _custom(model, voice, voice.name or "the Voice object")
    if isinstance(voice, str) and voice in model.voices:
        return SelectedVoice(voice, voice, model.voice(voice))
    dim = model.config.backbone.dim
    if looks_like_voice_file(voice):
        path = Path(voice).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"voice file {path} does not exist")
        return _custom(model, Voice.load(path, dim), path)
    if isinstance(voice, str):
        custom = user_voice_files()
        if voice in custom:
            return _custom(model, Voice.load(custom[voice], dim), custom[voice])
        raise ValueError(unknown_voice_message(voice, model.voices, custom))
    raise TypeError(f"voice must be a name, a path or a Voice, got {type(voice).__name__}")


__all__ = ["SelectedVoice", "select_voice"]
