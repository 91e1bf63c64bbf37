"""``python -m mlx_speech.generate``: text in, speech out of the speakers or into a file.

    python -m mlx_speech.generate --text "Hello from my Mac." --play
    python -m mlx_speech.generate --file story.txt --voice fr_female --output story.wav
    echo "Piped text works too." | python -m mlx_speech.generate --output out.flac

A thin layer over ``load`` and ``longform.stream_generate_long`` (``stream_generate`` for text of
any length: long text is spoken in sentence-bounded pieces joined by a short crossfade).

Every argument is checked before the model loads, and this module imports no MLX at the top
(MLX and mlx-lm take about a second to import): ``--help``, ``--list-voices`` of an MLX folder
and any mistake answer at once, with one line naming the flag and exit status 2. SIGTERM and
SIGHUP stop like Ctrl-C: the audio made so far is kept in ``--output``, exit 128 + the signal.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time
import types
from contextlib import contextmanager

from .cli_batch import BATCH_FORMATS
from .cli_checks import CLIError, Job, check_args, flag, local_model_folder, preset_names
from .cli_progress import BestEffortStream, Progress
from .options import (
    DEFAULT_CFG_ALPHA,
    DEFAULT_CHUNK_FRAMES,
    DEFAULT_FLOW_STEPS,
    DEFAULT_MAX_CHARS,
    DEFAULT_MAX_FRAMES,
    DEFAULT_VOICE,
)
from .commands import add_version
from .signals import STOP_SIGNALS, exit_status, graceful_signals

DEFAULT_MODEL = "mistralai/Voxtral-4B-TTS-2603"
BROKEN_PIPE_STATUS = 128 + 13  # a listing cut short by its reader, as if killed by SIGPIPE


# Library messages name options as Python does; the user typed flags. Only whole words that are
# not part of a path are replaced.
_OPTION_NAMES = re.compile(r"(?<![\w./-])(max_frames|max_chars|cfg_alpha|flow_steps)(?![\w.-])")


def flag_names(message: str) -> str:
    """``message`` with the generation options' Python names replaced by their flags."""
    return _OPTION_NAMES.sub(lambda m: flag(m.group(1)), message)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_speech.generate",
        description="Speak text with Voxtral-4B-TTS in MLX. With neither --output nor --play, plays.",
    )
    add_version(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="text to speak (default: read --file, else standard input)")
    src.add_argument("--file", help="UTF-8 text file to speak")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"MLX model folder, original release folder, or Hub repo id (default: {DEFAULT_MODEL})")
    src.add_argument("--batch", metavar="FILE",
                     help="speak many separate utterances, one output file each: JSON lines ({\"text\": ..., "
                          "\"voice\": ..., \"seed\": ..., \"output\": ...}; only text is required) or plain "
                          "text lines; - reads standard input. Files go to --output-dir")
    p.add_argument("--voice", default=DEFAULT_VOICE,
                   help=f"preset voice, a custom voice in the voice folder, or a voice file (.safetensors, made "
                        f"by python -m mlx_speech.clone) (default: {DEFAULT_VOICE})")
    p.add_argument("--list-voices", action="store_true", help="list the model's voices and exit")
    p.add_argument("--output", "-o", help="write audio to this file; the extension picks the format (.wav, .flac, .ogg)")
    p.add_argument("--play", action="store_true", help="play through the speakers while generating")
    p.add_argument("--device", help="output device for --play (index or name; see --list-devices)")
    p.add_argument("--list-devices", action="store_true", help="list audio output devices and exit")
    p.add_argument("--seed", type=int, default=None, help="seed for the flow-matching noise (reproducible output)")
    p.add_argument("--max-frames", type=int, default=None,
                   help="stop each piece of text after this many 80 ms frames "
                        f"(default: proportional to the text, at most {DEFAULT_MAX_FRAMES})")
    p.add_argument("--cfg-alpha", type=float, default=DEFAULT_CFG_ALPHA,
                   help=f"classifier-free guidance strength, 0 to 10 (default: {DEFAULT_CFG_ALPHA})")
    p.add_argument("--flow-steps", type=int, default=DEFAULT_FLOW_STEPS,
                   help=f"Euler steps per frame, 1 to 64; fewer is faster, rougher (default: {DEFAULT_FLOW_STEPS})")
    p.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS,
                   help=f"refuse text longer than this many characters (default: {DEFAULT_MAX_CHARS})")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="utterances (with --batch, default 4) or pieces of long text (default 1) generated N at a "
                        "time through one batched step: the same audio, sooner where a batched step costs "
                        "less than N single ones (a Mac's GPU)")
    p.add_argument("--output-dir", default=".", metavar="DIR", help="with --batch: where the files go (default: .)")
    p.add_argument("--format", choices=BATCH_FORMATS, default="wav",
                   help="with --batch: the format of numbered files (default: wav)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress line or summary")
    return p


# ---- listings ------------------------------------------------------------------------------


class _ListingCut(Exception):
    """Standard output was closed by its reader (``--list-voices | head -1``)."""


def _print_lines(lines: list[str]) -> None:
    try:
        for line in lines:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        BestEffortStream(sys.stdout)._silence()  # the interpreter's last flush must not fail
        raise _ListingCut from None


def _list_devices() -> int:
    from .player import PlayerError, list_output_devices

    try:
        devices = list_output_devices()
    except PlayerError as e:
        raise CLIError(str(e)) from None
    _print_lines([f"{index:3d}  {name}  ({rate:.0f} Hz)" for index, name, rate in devices])
    if not devices:
        print("no audio output devices found", file=sys.stderr)
    return 0


def _list_voices(model: str) -> int:
    """The model's presets, then the user's custom voices (marked), from file names alone."""
    from .voices import user_voice_dir, user_voice_files, voice_info

    folder = local_model_folder(model)
    if folder is None:  # a Hub id: fetch what the model needs (as loading it would)
        from .model_source import get_model_path

        folder = get_model_path(model)
    presets = preset_names(folder)
    if presets is None:
        raise CLIError(f"--model {model}: {folder} holds no model (no config.json, nor the original release)")
    lines = [f"{'voice':<16} {'language':<20} gender"]
    for name in presets:
        language, gender = voice_info(name)
        lines.append(f"{name:<16} {language:<20} {gender}")
    for name in user_voice_files():
        if name not in presets:
            lines.append(f"{name:<16} {'custom':<20} (in {user_voice_dir()})")
    _print_lines(lines)
    return 0


# ---- speaking ------------------------------------------------------------------------------


@contextmanager
def _ignoring_stop_signals():
    """A second Ctrl-C while the partial file is finalized must not lose it (milliseconds)."""
    signals = (signal.SIGINT, *STOP_SIGNALS)
    try:
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in signals}
    except ValueError:  # not the main thread: nothing to ignore
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _expected_seconds(text: str) -> float:
    """Rough speech length for planning playback: about 15 characters per second."""
    return max(1.0, len(text) / 15.0)


def _open_player(model, job: Job, progress: Progress):
    from .player import AudioPlayer, PlayerError

    try:
        return AudioPlayer(model.config.sample_rate, device=job.device)
    except PlayerError as e:
        if job.output is None:
            raise CLIError(str(e)) from None
        progress.line(f"warning: {e}; writing {job.output} only")
        return None


class _PlaybackFailed(OSError):
    """The sound device failed mid-run and there is no file to write instead (exit status 1)."""


def _without_player(player, error, job: Job, progress: Progress) -> None:
    """A device that fails mid-run costs the sound, never the file: stop playing, keep writing."""
    player.abort()
    if job.output is None:
        raise _PlaybackFailed(str(error)) from None
    progress.line(f"warning: {error}; writing {job.output} only")


def _interrupted(e: KeyboardInterrupt) -> str:
    signum = getattr(e, "signum", None)  # signals.Terminated: SIGTERM or SIGHUP
    return "interrupted" + (f" ({signal.Signals(signum).name})" if signum else "")


def speak(model, job: Job, args, progress: Progress, voice) -> int:
    """Generate, writing and/or playing as the chunks come; the summary at the end."""
    from .audio_io import AudioFileWriter
    from .longform import stream_generate_long
    from .player import PlayerError

    player = _open_player(model, job, progress) if job.play else None
    writer = last = None
    request_start = time.perf_counter()
    try:
        if job.output is not None:
            writer = AudioFileWriter(job.output, model.config.sample_rate)
        for last in stream_generate_long(model, job.text, voice, seed=args.seed, max_chars=args.max_chars,
                                         max_frames=args.max_frames, cfg_alpha=args.cfg_alpha,
                                         flow_steps=args.flow_steps, batch_size=args.batch_size or 1):
            if writer is not None:
                writer.write(last.audio)
            if player is not None:
                if last.frames == len(last.codes):  # first chunk: plan the start buffer
                    # The lead must cover producing a regular (later, larger) chunk.
                    chunk_s = DEFAULT_CHUNK_FRAMES * model.config.samples_per_frame / model.config.sample_rate
                    player.plan(expected_seconds=_expected_seconds(job.text), chunk_seconds=chunk_s,
                                real_time_factor=last.real_time_factor)
                try:
                    player.queue(last.audio)  # may start the device
                except PlayerError as e:
                    player = _without_player(player, e, job, progress)
            progress.chunk(last)
        progress.end_status()
        if writer is not None:
            writer.close()  # complete now: a Ctrl-C while the rest plays keeps all of it
        if player is not None:
            try:
                player.close(report=progress.playing)
            except PlayerError as e:
                player = _without_player(player, e, job, progress)
            progress.end_status()
    except KeyboardInterrupt as e:
        with _ignoring_stop_signals():
            if player is not None:
                player.abort()  # silence at once
            if writer is not None:
                writer.close()  # keep what was generated
        complete = last is not None and last.finish_reason is not None
        progress.line(_interrupted(e))
        if writer is not None:
            progress.line(f"{'audio' if complete else 'partial audio'} written to {job.output}")
        return exit_status(e)
    except BaseException:
        if player is not None:
            player.abort()
        if writer is not None:
            writer.abort()
        raise
    if last is not None:
        progress.summary(last, explicit_cap=args.max_frames is not None, player=player,
                         request_start=request_start, output=job.output)
    return 0


def run(args, progress: Progress) -> int:
    if args.list_devices:
        return _list_devices()
    if args.list_voices:
        return _list_voices(args.model)
    if args.batch is not None:
        return run_batch(args, progress)
    job = check_args(args)  # before the (slow) MLX import and model load
    for warning in job.warnings:
        progress.line(warning)

    from . import load

    t0 = time.perf_counter()
    model = load(args.model)
    from .voice_select import select_voice

    try:  # once: a voice file is read and checked before any audio is made
        voice = select_voice(model, args.voice)
    except ValueError as e:  # an unknown name, or a voice file the checks refuse
        raise CLIError(f"--voice: {e}") from None
    progress.info(f"loaded {model.source} in {time.perf_counter() - t0:.1f} s; speaking with voice {voice.name}")
    return speak(model, job, args, progress, voice)


def run_batch(args, progress: Progress) -> int:
    """``--batch``: every line checked, then the model loaded once and the lines spoken."""
    from .cli_batch import read_batch_source, speak_batch
    from .options import check_int, check_options

    for name in ("output", "play", "device"):
        if getattr(args, name):
            raise CLIError(f"--{name} does not apply with --batch: each line has its own file (--output-dir)")
    check_options(cfg_alpha=args.cfg_alpha, flow_steps=args.flow_steps, max_frames=args.max_frames, name=flag)
    args.batch_size = check_int(4 if args.batch_size is None else args.batch_size, "--batch-size", 1)
    lines = read_batch_source(args)  # before the (slow) MLX import and model load
    from . import load

    t0 = time.perf_counter()
    model = load(args.model)
    progress.info(f"loaded {model.source} in {time.perf_counter() - t0:.1f} s; {len(lines)} lines to speak")
    return speak_batch(model, lines, args, progress)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m mlx_speech.generate`` and ``mlx-speech-generate``."""
    args = setup_arg_parser().parse_args(argv)
    # Progress must never cost the audio: stderr (and stdout, unless it carries a listing)
    # turn silent instead of raising when their reader goes away or the device is full.
    streams = sys.stdout, sys.stderr
    sys.stderr = BestEffortStream(sys.stderr)
    if not (args.list_voices or args.list_devices):
        sys.stdout = BestEffortStream(sys.stdout)
    progress = Progress(sys.stderr, quiet=args.quiet)
    try:
        with graceful_signals():
            code = run(args, progress)
    except KeyboardInterrupt as e:  # during the MLX import or the model load
        progress.line(_interrupted(e))
        code = exit_status(e)
    except _ListingCut:
        code = BROKEN_PIPE_STATUS
    except (CLIError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError) as e:
        progress.line(f"error: {flag_names(str(e))}")
        code = 2
    except OSError as e:  # the output could not be written (full disk, I/O error)
        progress.line(f"error: {e}")
        code = 1
    finally:  # for callers in the same process; a broken stream stays silenced
        for name, original in zip(("stdout", "stderr"), streams):
            current = getattr(sys, name)
            if isinstance(current, BestEffortStream) and not current.broken:
                setattr(sys, name, original)
    raise SystemExit(code)


class _CallableModule(types.ModuleType):
    """This module, callable as the library's ``generate``.

    Importing ``mlx_speech.generate`` (this command) sets the package attribute of that name to
    the module, hiding the function ``mlx_speech.generate`` (from ``generation``) for the rest
    of the process. Calling the module forwards to the function, so ``mlx_speech.generate(model,
    text)`` works whichever the attribute holds, and MLX is still only imported on that call.
    """

    def __call__(self, *args, **kwargs):
        from .generation import generate

        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()
