"""The package's commands, for ``python -m mlx_speech`` and every command's ``--version``."""

from __future__ import annotations

import argparse

from . import __version__

# name -> (module run by ``python -m mlx_speech.<name>``, what it does)
COMMANDS = {
    "generate": ("mlx_speech.generate", "speak text: to the speakers, or into a wav/flac/ogg file"),
    "clone": ("mlx_speech.clone", "make a custom voice file from a short clip of your voice"),
    "server": ("mlx_speech.server", "an OpenAI-compatible speech server on this machine"),
    "convert": ("mlx_speech.convert", "convert the original release to an MLX folder, e.g. 4-bit"),
}


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: print the package version and exit (every command has it)."""
    parser.add_argument("--version", action="version", version=f"mlx-speech {__version__}")
