"""``python -m mlx_speech.generate``: text in, speech out of the speakers or into a file.

    python -m mlx_speech.generate --text "Hello from my Mac." --play
    python -m mlx_speech.generate --file story.txt --voice fr_female --output story.wav
    echo "Piped text works too." | python -m mlx_speech.generate --output out.flac

A thin layer over ``load`` and ``longform.stream_generate_long`` (``stream_generate`` for text of
any length: long text is spoken in sentence-bounded pieces joined by a short crossfade):
argument checks, progress, summary.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .generation import (
    DEFAULT_CFG_ALPHA,
    DEFAULT_CHUNK_FRAMES,
    DEFAULT_FLOW_STEPS,
    DEFAULT_MAX_FRAMES,
    DEFAULT_VOICE,
)
from .longform import DEFAULT_MAX_CHARS, check_text

DEFAULT_MODEL = "mistralai/Voxtral-4B-TTS-2603"


class CLIError(Exception):
    """A bad argument: printed as one line, exit status 2."""


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_speech.generate",
        description="Speak text with Voxtral-4B-TTS in MLX. With neither --output nor --play, plays.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="text to speak (default: read --file, else standard input)")
    src.add_argument("--file", help="UTF-8 text file to speak")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"MLX model folder, original release folder, or Hub repo id (default: {DEFAULT_MODEL})")
    p.add_argument("--voice", default=DEFAULT_VOICE, help=f"preset voice (default: {DEFAULT_VOICE})")
    p.add_argument("--list-voices", action="store_true", help="list the model's voices and exit")
    p.add_argument("--output", "-o", help="write audio to this file; the extension picks the format (.wav, .flac, .ogg)")
    p.add_argument("--play", action="store_true", help="play through the speakers while generating")
    p.add_argument("--device", help="output device for --play (index or name; see --list-devices)")
    p.add_argument("--list-devices", action="store_true", help="list audio output devices and exit")
    p.add_argument("--seed", type=int, default=None, help="seed for the flow-matching noise (reproducible output)")
    p.add_argument("--max-frames", type=int, default=DEFAULT_MAX_FRAMES,
                   help=f"stop after this many 80 ms frames (default: {DEFAULT_MAX_FRAMES})")
    p.add_argument("--cfg-alpha", type=float, default=DEFAULT_CFG_ALPHA,
                   help=f"classifier-free guidance strength (default: {DEFAULT_CFG_ALPHA})")
    p.add_argument("--flow-steps", type=int, default=DEFAULT_FLOW_STEPS,
                   help=f"Euler steps per frame; fewer is faster, rougher (default: {DEFAULT_FLOW_STEPS})")
    p.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS,
                   help=f"refuse text longer than this many characters (default: {DEFAULT_MAX_CHARS})")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress line or summary")
    return p


def read_text(args) -> str:
    if args.text is not None:
        text = args.text
    elif args.file is not None:
        try:
            text = Path(args.file).read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise CLIError(f"text file {args.file!r} does not exist") from None
        except UnicodeDecodeError as e:
            raise CLIError(f"text file {args.file!r} is not valid UTF-8 (byte {e.start})") from None
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise CLIError("no text: pass --text \"...\", --file FILE, or pipe text on standard input")
    if not text.strip():
        raise CLIError("the text is empty; give some text to speak")
    return text


def _list_devices() -> None:
    from .player import list_output_devices

    devices = list_output_devices()
    for index, name, rate in devices:
        print(f"{index:3d}  {name}  ({rate:.0f} Hz)")
    if not devices:
        print("no audio output devices found", file=sys.stderr)


def _list_voices(model_path) -> None:
    from .utils import VOICES_DIR, resolve_model
    from .voices import voice_info

    path = resolve_model(model_path, verbose=True)
    print(f"{'voice':<16} {'language':<20} gender")
    for f in sorted((path / VOICES_DIR).glob("*.safetensors")):
        language, gender = voice_info(f.stem)
        print(f"{f.stem:<16} {language:<20} {gender}")


def _device(arg):
    return int(arg) if arg is not None and arg.isdigit() else arg


def run(args) -> int:
    if args.list_devices:
        _list_devices()
        return 0
    if args.list_voices:
        _list_voices(args.model)
        return 0
    text = read_text(args)
    check_text(text, args.max_chars)  # before loading the model
    play = args.play or args.output is None
    from .audio_io import AudioFileWriter, check_output_path

    if args.output is not None:
        check_output_path(args.output)

    from . import load
    from .longform import stream_generate_long

    t0 = time.perf_counter()
    model = load(args.model, verbose=not args.quiet)
    if args.voice not in model.voices:
        raise CLIError(f"unknown voice {args.voice!r}; choose one of: {', '.join(model.voices)}")
    load_s = time.perf_counter() - t0
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, file=sys.stderr, **k))
    log(f"loaded {args.model} in {load_s:.1f} s; speaking with voice {args.voice}")

    player = writer = None
    if play:
        from .player import AudioPlayer, PlayerError

        try:
            player = AudioPlayer(model.config.sample_rate, device=_device(args.device))
        except PlayerError as e:
            if args.output is None:
                raise
            log(f"warning: {e}; writing {args.output} only")
    if args.output is not None:
        writer = AudioFileWriter(args.output, model.config.sample_rate)
    last = None
    request_start = time.perf_counter()
    try:
        for last in stream_generate_long(model, text, args.voice, seed=args.seed, max_chars=args.max_chars,
                                         max_frames=args.max_frames, cfg_alpha=args.cfg_alpha,
                                         flow_steps=args.flow_steps):
            if writer is not None:
                writer.write(last.audio)
            if player is not None:
                if last.frames == len(last.codes):  # first chunk: plan the start buffer
                    # The lead must cover producing a regular (later, larger) chunk.
                    chunk_s = DEFAULT_CHUNK_FRAMES * model.config.samples_per_frame / model.config.sample_rate
                    player.plan(expected_seconds=_expected_seconds(text), chunk_seconds=chunk_s,
                                real_time_factor=last.real_time_factor)
                player.queue(last.audio)
            log(f"\r{last.audio_seconds:7.2f} s of audio  {last.real_time_factor:5.2f}x real time  "
                f"{last.frames} frames", end="")
        log("")
    except KeyboardInterrupt:
        log("\ninterrupted")
        if player is not None:
            player.abort()
        if writer is not None:
            writer.close()  # keep what was generated
            log(f"partial audio written to {args.output}")
        return 130
    except BaseException:
        if player is not None:
            player.abort()
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    if player is not None:
        player.close()
    if last is not None:
        log(f"frames: {last.frames} | audio: {last.audio_seconds:.2f} s | wall: {last.elapsed:.2f} s | "
            f"{last.real_time_factor:.2f}x real time | peak memory: {_memory(last.peak_memory)} | "
            f"finish: {last.finish_reason}"
            + (f" | underruns: {player.underruns}" if player is not None else "")
            + (f" | first audio after {player.first_output_time - request_start:.2f} s"
               if player is not None and player.first_output_time is not None else "")
            + (f" | wrote {args.output}" if writer is not None else ""))
    return 0


def _memory(gb: float) -> str:
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1000:.0f} MB"


def _expected_seconds(text: str) -> float:
    """Rough speech length for planning playback: about 15 characters per second."""
    return max(1.0, len(text) / 15.0)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m mlx_speech.generate`` and ``mlx-speech-generate``."""
    args = setup_arg_parser().parse_args(argv)
    from .player import PlayerError

    try:
        code = run(args)
    except (CLIError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            PermissionError, PlayerError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    raise SystemExit(code)


if __name__ == "__main__":
    main()
