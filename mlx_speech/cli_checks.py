"""The command line's checks before the model loads: every argument, the text, the output path,
the audio device, the model folder and voice where they can be known without MLX.

Each refusal is a ``CLIError`` or ``ValueError`` of one line naming the flag the user typed
(``--max-frames``, not ``max_frames``); ``generate`` prints it and exits with status 2. Imports
no MLX (nor NumPy, unless ``--output`` or ``--play`` needs it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from .model_layout import detect_layout, preset_voice_files
from .model_source import looks_like_hub_id
from .options import check_int, check_options, check_text
from .voices import looks_like_voice_file, unknown_voice_message, user_voice_files


class CLIError(Exception):
    """A bad argument: printed as one line, exit status 2."""


def flag(name: str) -> str:
    """The flag a user types for an option's Python name: ``max_frames`` → ``--max-frames``."""
    return "--" + name.replace("_", "-")


@dataclass
class Job:
    """A checked request: what to say, where the audio goes."""

    text: str
    output: str | None
    play: bool
    device: int | str | None
    warnings: list[str] = field(default_factory=list)


def _decode(data: bytes, source: str, max_chars: int) -> str:
    if len(data) > 4 * max_chars:  # UTF-8 takes at most 4 bytes a character
        raise CLIError(f"{source} holds more than {max_chars} characters, the limit (--max-chars); "
                       "shorten it or raise --max-chars")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"{source} is not valid UTF-8 (byte {e.start})") from None


def _read_bounded(f, limit: int, block: int = 1 << 20) -> bytes:
    """At most ``limit`` bytes of binary stream ``f``, read in blocks: a huge file or /dev/zero is
    refused, not slurped, and a huge ``--max-chars`` allocates nothing up front (``read(n)``
    would)."""
    parts, size = [], 0
    while size < limit:
        data = f.read(min(block, limit - size))
        if not data:
            break
        parts.append(data)
        size += len(data)
    return b"".join(parts)


def read_input(name: str, limit: int, option: str = "--file") -> bytes:
    """At most ``limit`` bytes of the file ``option`` names (``-``: standard input), read in blocks;
    a missing, unreadable or folder path is one CLIError naming the option."""
    if name == "-":
        return _read_bounded(sys.stdin.buffer, limit)
    what = f"{option}: text file {name!r}"
    try:
        with open(name, "rb") as f:
            return _read_bounded(f, limit)
    except FileNotFoundError:
        raise CLIError(f"{what} does not exist") from None
    except IsADirectoryError:
        raise CLIError(f"{option}: {name!r} is a folder, not a text file") from None
    except OSError as e:
        raise CLIError(f"{what} cannot be read: {e.strerror or e}") from None


def read_text(args) -> str:
    """The text to speak, from --text, --file or standard input, checked (length, characters)."""
    limit = 4 * args.max_chars + 1
    if args.text is not None:
        text = args.text
    elif args.file is not None:
        text = _decode(read_input(args.file, limit), f"--file: text file {args.file!r}", args.max_chars)
    elif sys.stdin is not None and not sys.stdin.isatty():
        text = _decode(_read_bounded(sys.stdin.buffer, limit), "standard input", args.max_chars)
    else:
        raise CLIError("no text: pass --text \"...\", --file FILE, or pipe text on standard input")
    if not text.strip():
        raise CLIError("the text is empty; give some text to speak")
    if len(text) > args.max_chars:
        raise CLIError(f"the text is {len(text)} characters, over the limit of {args.max_chars} "
                       "(--max-chars); shorten it or raise --max-chars")
    check_text(text, None)  # control characters
    return text


def local_model_folder(model: str) -> Path | None:
    """The folder ``--model`` names, or None for a Hub repo id; refuses a missing path (the
    rule is the loader's: ``model_source.looks_like_hub_id``)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"--model {model}: this is a file; give the model folder")
        return path
    if not looks_like_hub_id(model):
        raise CLIError(f"--model {model}: no such folder (nor a Hub repo id like 'owner/name')")
    return None


def preset_names(folder: Path) -> list[str] | None:
    """The preset voices of a local model folder in any layout (from file names, no MLX), or
    None when the folder holds no model the loader would read (it reports that)."""
    layout = detect_layout(folder)
    return None if layout is None else list(preset_voice_files(folder, layout))


def check_voice(voice: str, presets: list[str] | None) -> None:
    """Refuse a ``--voice`` that names no preset (when ``presets`` is known), no custom voice in
    the user's folder and no existing voice file."""
    if looks_like_voice_file(voice):
        path = Path(voice).expanduser()
        if not path.is_file():
            raise CLIError(f"--voice {voice}: no such voice file")
        return
    if presets is None or voice in presets:
        return
    custom = user_voice_files()
    if voice in custom:
        return
    raise CLIError(f"--voice: {unknown_voice_message(voice, presets, custom)}")


def _device(arg: str | None):
    return int(arg) if arg is not None and arg.isdigit() else arg


def check_args(args) -> Job:
    """Every check that needs no model: the arguments, in the order a user reads them, then the
    sound system."""
    check_options(cfg_alpha=args.cfg_alpha, flow_steps=args.flow_steps, max_frames=args.max_frames,
                  seed=args.seed, name=flag)
    check_int(args.max_chars, "--max-chars", 1)
    if args.batch_size is not None:
        check_int(args.batch_size, "--batch-size", 1)
    job = Job(text=read_text(args), output=args.output, play=args.play or args.output is None,
              device=_device(args.device))
    if args.output is not None:
        from .audio_io import check_output_path

        try:
            check_output_path(args.output)
        except (ValueError, OSError) as e:
            raise CLIError(f"--output: {e}") from None
    folder = local_model_folder(args.model)
    check_voice(args.voice, preset_names(folder) if folder is not None else None)
    # Last: the sound system is the machine's state, not a typo on the command line.
    if job.play:
        from .player import PlayerError, check_output_device

        try:
            check_output_device(job.device)
        except PlayerError as e:
            if args.output is None or args.device is not None:
                raise CLIError(f"--device: {e}" if args.device is not None else str(e)) from None
            job.warnings.append(f"warning: {e}; writing {args.output} only")
            job.play = False
    elif args.device is not None:
        job.warnings.append("warning: --device is ignored without --play")
    return job
