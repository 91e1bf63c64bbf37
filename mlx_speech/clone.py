"""``python -m mlx_speech.clone``: your own voice from a short recording, as a small voice file.

    python -m mlx_speech.clone me.wav --output me.safetensors
    python -m mlx_speech.generate --voice me.safetensors --text "Hello in my own voice."
    python -m mlx_speech.clone --evaluate neutral_female      # self-check on the real weights

Every argument and the recording itself are checked before the model is loaded, so a typo or a
silent clip costs a second, not a model load. The voice file appears only once complete:
Ctrl-C or a SIGTERM leaves nothing behind. See ``enroll.py`` for the method.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from .clip_prep import MAX_SECONDS_LIMIT, MIN_SECONDS, PAUSE_SECONDS, check_max_seconds
from .commands import add_version
from .options import DEFAULT_VOICE, SEED_RANGE, check_int

DEFAULT_MODEL = "mistralai/Voxtral-4B-TTS-2603"
DEFAULT_STEPS = 600  # enroll.DEFAULT_STEPS (not imported: that module loads MLX)
MAX_STEPS = 100_000
DEFAULT_MAX_SECONDS = 16.0
VOICE_SUFFIX = ".safetensors"
SAMPLE_TEXT = "Hello! This is my own voice, speaking from my Mac."


class CLIError(Exception):
    """A bad argument or input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m mlx_speech.clone",
        description="Make a voice file from a 5-16 s recording of one speaker (encoder-free enrollment "
                    "through the Voxtral codec decoder), or self-check enrollment on a preset (--evaluate).",
    )
    add_version(p)
    p.add_argument("reference", nargs="?", help="the recording: wav, flac, ogg (mp3 where libsndfile reads it)")
    p.add_argument("--output", "-o", help=f"voice file to write (ends in {VOICE_SUFFIX})")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"MLX model folder, original release folder, or Hub repo id (default: {DEFAULT_MODEL})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"optimization steps; more fit the clip more closely (default: {DEFAULT_STEPS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random start (default: 0)")
    p.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                   help=f"use at most this much of the recording, {MIN_SECONDS:g} to {MAX_SECONDS_LIMIT:g} "
                        f"(default: {DEFAULT_MAX_SECONDS:g})")
    p.add_argument("--no-preprocess", action="store_true",
                   help="take the recording as it is: 24 kHz mono, whole 80 ms frames (no resampling, "
                        "filtering or trimming)")
    p.add_argument("--force", action="store_true", help="replace --output if it exists")
    p.add_argument("--evaluate", metavar="PRESET",
                   help=f"self-check: decode a preset voice's codes, enroll that audio and compare with the "
                        f"preset (e.g. {DEFAULT_VOICE}); --output then saves the enrolled voice")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    return p


# ---- checks before the model loads -----------------------------------------------------------------
def check_args(args) -> None:
    """Raise CLIError for any argument that cannot work, before anything slow happens."""
    if args.evaluate is None and args.reference is None:
        raise CLIError("give a recording to clone (python -m mlx_speech.clone me.wav --output me.safetensors) "
                       "or --evaluate PRESET")
    if args.evaluate is not None and args.reference is not None:
        raise CLIError("--evaluate uses a preset's own audio; give either a recording or --evaluate, not both")
    if args.reference is not None and args.output is None:
        raise CLIError(f"--output is required: the voice file to write, e.g. --output me{VOICE_SUFFIX}")
    try:
        check_int(args.steps, "--steps", 1, MAX_STEPS)
        check_int(args.seed, "--seed", *SEED_RANGE)
        check_max_seconds(args.max_seconds, "--max-seconds")
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.output is not None:
        check_output(args.output, args.force)


def check_output(path: str, force: bool) -> None:
    """Raise CLIError unless a voice file can be written at ``path``."""
    out = Path(path)
    if out.suffix != VOICE_SUFFIX:
        raise CLIError(f"--output {path!r} must end in {VOICE_SUFFIX} (a voice file)")
    if out.is_dir():
        raise CLIError(f"--output {path!r} is a folder; give a file name ending in {VOICE_SUFFIX}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"--output {path!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"--output {path!r}: folder {str(parent)!r} is not writable")
    if out.exists() and not force:
        raise CLIError(f"--output {path!r} exists; pass --force to replace it")


def read_reference(args, sample_rate: int = 24000, frame_samples: int = 1920):
    """The prepared clip (``clip_prep.Clip``) of ``args.reference``; CLIError naming the file."""
    from .clip_prep import ClipError, prepare_clip, read_clip, take_as_is

    source = read_clip(args.reference)  # CheckpointError "<file>: <problem>" for unreadable files
    try:
        if args.no_preprocess:
            if source.channels != 1:
                raise ClipError(f"--no-preprocess needs a mono recording, this one has {source.channels} channels")
            return take_as_is(source.samples, source.sample_rate, max_seconds=args.max_seconds,
                              target_rate=sample_rate, frame_samples=frame_samples)
        clip = prepare_clip(source.samples, source.sample_rate, max_seconds=args.max_seconds,
                            target_rate=sample_rate, frame_samples=frame_samples)
        clip.source_seconds = source.seconds
        return clip
    except ClipError as e:
        raise CLIError(f"{args.reference}: {e}") from None


# ---- progress --------------------------------------------------------------------------------------
class ProgressBar:
    """Step, loss and ETA on stderr: one redrawn line on a terminal, plain lines every 10 % otherwise."""

    WIDTH = 24

    def __init__(self, stream=None, label: str = "enrolling"):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label = label
        self.start = time.perf_counter()
        self._first = None  # time of step 1: compilation makes it slower than the rest
        self._last_draw = -math.inf
        self._last_tenth = 0

    def __call__(self, step: int, total: int, loss: float) -> None:
        now = time.perf_counter()
        if step == 1:
            self._first = now
        if self.tty:
            if step < total and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            filled = int(self.WIDTH * step / total)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            end = "\n" if step == total else ""
            self.stream.write(f"\r{self.label} [{bar}] {step}/{total}  loss {loss:.4f}  {self._eta(step, total, now)}{end}")
        else:
            tenth = 10 * step // total
            if tenth == self._last_tenth and step != 1:
                return
            self._last_tenth = tenth
            self.stream.write(f"{self.label}: step {step}/{total}  loss {loss:.4f}  {self._eta(step, total, now)}\n")
        self.stream.flush()

    def _eta(self, step: int, total: int, now: float) -> str:
        if step >= total:
            return f"done in {_duration(now - self.start)}"
        if step < 2 or self._first is None:
            return "ETA …"
        per_step = (now - self._first) / (step - 1)
        return f"ETA {_duration(per_step * (total - step))}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


# ---- the two jobs ------------------------------------------------------------------------------
def _load(args, log):
    from . import load

    t0 = time.perf_counter()
    model = load(args.model, verbose=not args.quiet)
    log(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
    return model


def clone(args, log) -> int:
    clip = read_reference(args)
    how = "as it is" if args.no_preprocess else \
        f"silence trimmed, ending on a {PAUSE_SECONDS:g} s pause"
    log(f"{args.reference}: {clip.source_seconds:.2f} s recording → {clip.seconds:.2f} s to enroll ({how}): "
        f"{clip.frames} frames, a voice of {clip.frames + 1} rows")
    model = _load(args, log)
    codec = model.audio_tokenizer.config
    if (codec.sampling_rate, codec.samples_per_frame) != (clip.sample_rate, clip.frame_samples):
        clip = read_reference(args, codec.sampling_rate, codec.samples_per_frame)
    from .enroll import enroll_clip

    progress = None if args.quiet else ProgressBar()
    t0 = time.perf_counter()
    voice = enroll_clip(model, clip, steps=args.steps, seed=args.seed, progress=progress,
                        metadata={"model": str(args.model), "preprocess": str(not args.no_preprocess).lower(),
                                  "source_file": Path(args.reference).name})
    wall = time.perf_counter() - t0
    voice.save(args.output)
    start, final = float(voice.metadata["start_loss"]), float(voice.metadata["final_loss"])
    log(f"used {clip.seconds:.2f} s of audio: {clip.frames} frames, a voice of {voice.rows} rows")
    log(f"loss {start:.4f} → {final:.4f} ({100 * final / start:.1f} % of the starting point) "
        f"after {args.steps} steps in {wall:.1f} s")
    log(f"wrote {args.output}")
    model_flag = "" if args.model == DEFAULT_MODEL else f" --model {_quote(args.model)}"
    print("speak with it:\n"
          f"  python -m mlx_speech.generate{model_flag} --voice {_quote(args.output)} --text \"{SAMPLE_TEXT}\"")
    return 0


def evaluate_preset(model, name: str, *, steps: int, seed: int, max_seconds: float, progress=None) -> dict:
    """Enrollment's in-distribution self-check on a preset voice.

    The preset's rows → its codes (``voice_to_codes``) → their audio (the codec) → enroll that
    audio (no preprocessing: it is already codec output) → compare with the preset.

    Returns:
        A dict: ``frames``, ``semantic_agreement`` (share of frames with the same semantic code),
        ``acoustic_exact`` and ``acoustic_within_1`` (shares of acoustic codes equal / within one
        level), ``row_cosine`` (mean cosine between the enrolled rows and the preset's),
        ``snr_db`` (the enrolled codes' audio against the preset's), ``start_loss``, ``final_loss``,
        and the enrolled ``voice``.
    """
    import mlx.core as mx
    import numpy as np

    from .clip_prep import take_as_is
    from .enroll import enroll_clip
    from .spectral_loss import snr_db
    from .voice_codes import voice_to_codes

    rows = np.array(model.voice(name).astype(mx.float32))
    codes = voice_to_codes(model, rows)
    c = model.audio_tokenizer.config
    frames = min(len(codes), int(max_seconds * c.sampling_rate) // c.samples_per_frame)
    codes, rows = codes[:frames], np.concatenate([rows[:frames], rows[-1:]])
    audio = np.array(model.audio_tokenizer.decode(mx.array(codes)[None]))[0]
    clip = take_as_is(audio, c.sampling_rate, max_seconds=max_seconds, target_rate=c.sampling_rate,
                      frame_samples=c.samples_per_frame)
    voice = enroll_clip(model, clip, steps=steps, seed=seed, progress=progress,
                        metadata={"evaluated_preset": name})
    resynth = np.array(model.audio_tokenizer.decode(mx.array(voice.codes)[None]))[0]
    a, b = voice.embedding.astype(np.float64), rows.astype(np.float64)
    cosine = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    diff = np.abs(voice.codes[:, 1:].astype(int) - codes[:, 1:])
    return {
        "frames": frames,
        "semantic_agreement": float(np.mean(voice.codes[:, 0] == codes[:, 0])),
        "acoustic_exact": float(np.mean(diff == 0)),
        "acoustic_within_1": float(np.mean(diff <= 1)),
        "row_cosine": float(np.mean(cosine[:-1])),  # the END rows are identical by construction
        "snr_db": snr_db(audio, resynth),
        "start_loss": float(voice.metadata["start_loss"]),
        "final_loss": float(voice.metadata["final_loss"]),
        "voice": voice,
    }


def evaluate(args, log) -> int:
    model = _load(args, log)
    if args.evaluate not in model.voices:
        raise CLIError(f"unknown preset {args.evaluate!r}; choose one of: {', '.join(model.voices)}")
    progress = None if args.quiet else ProgressBar(label=f"enrolling {args.evaluate}")
    t0 = time.perf_counter()
    r = evaluate_preset(model, args.evaluate, steps=args.steps, seed=args.seed, max_seconds=args.max_seconds,
                        progress=progress)
    wall = time.perf_counter() - t0
    print(f"preset {args.evaluate}: {r['frames']} frames, {args.steps} steps, {wall:.1f} s")
    print(f"  semantic codes agreeing   {100 * r['semantic_agreement']:5.1f} %")
    print(f"  acoustic codes exact      {100 * r['acoustic_exact']:5.1f} %   within ±1 {100 * r['acoustic_within_1']:5.1f} %")
    print(f"  row cosine (mean)         {r['row_cosine']:.4f}")
    print(f"  resynthesis SNR           {r['snr_db']:5.1f} dB")
    print(f"  loss                      {r['start_loss']:.4f} → {r['final_loss']:.4f}")
    if args.output is not None:
        r["voice"].save(args.output)
        print(f"wrote {args.output}")
    return 0


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(str(text))


def run(args) -> int:
    check_args(args)
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, file=sys.stderr, **k))
    return evaluate(args, log) if args.evaluate is not None else clone(args, log)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m mlx_speech.clone`` and ``mlx-speech-clone``."""
    from .signals import exit_status, graceful_signals

    args = setup_arg_parser().parse_args(argv)
    try:
        with graceful_signals():
            code = run(args)
    except KeyboardInterrupt as e:
        print("\ninterrupted; nothing written", file=sys.stderr)
        code = exit_status(e)
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except (OSError, FloatingPointError) as e:  # e.g. a full disk while saving; nothing was written
        print(f"error: {e}", file=sys.stderr)
        code = 1
    raise SystemExit(code)


if __name__ == "__main__":
    main()
