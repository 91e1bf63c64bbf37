"""mlx-speech: Voxtral-4B-TTS text-to-speech in pure MLX.

    import mlx_speech
    model = mlx_speech.load("mistralai/Voxtral-4B-TTS-2603")
    result = mlx_speech.generate(model, "Hello!", voice="neutral_female")

Names are imported on first use: importing the package (as every ``python -m mlx_speech.*``
command does) loads neither MLX nor mlx-lm, so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "batch_generate": "batch_generation",
    "stream_batch_generate": "batch_generation",
    "GenerationResponse": "generation",
    "GenerationResult": "generation",
    "generate": "generation",
    "stream_generate": "generation",
    "Tokenizer": "tokenizer",
    "load": "loading",
    "Voice": "voice_file",
    "codes_to_voice": "voice_codes",
    "voice_to_codes": "voice_codes",
    "enroll": "enroll",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlx_speech' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
