"""``python -m mlx_speech``: the commands, and ``python -m mlx_speech COMMAND ...`` to run one."""

from __future__ import annotations

import importlib
import sys

from . import __version__
from .commands import COMMANDS


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"mlx-speech {__version__}: Voxtral-4B-TTS text-to-speech in MLX", "",
             "usage: python -m mlx_speech COMMAND [options]   (or python -m mlx_speech.COMMAND)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    lines += ["", "Each command's options: python -m mlx_speech COMMAND --help"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0)
    if argv[0] == "--version":
        print(f"mlx-speech {__version__}")
        raise SystemExit(0)
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[argv[0]][0])
    sys.argv = [f"python -m mlx_speech {argv[0]}", *argv[1:]]
    module.main(argv[1:])


if __name__ == "__main__":
    main()
