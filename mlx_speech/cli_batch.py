"""The command line's batch mode: many separate utterances, one output file each.

``python -m mlx_speech.generate --batch lines.jsonl --output-dir out/`` reads one utterance per
line — a JSON object (``{"text": "...", "voice": "fr_female", "seed": 3, "output": "a.wav"}``;
only ``text`` is required) or, in a file that is not JSON lines, the line's plain text — and
speaks them ``--batch-size`` pieces at a time through one batched decode loop
(``longform.stream_batch_generate_long``: a line of any length is split and crossfaded as
``--file`` text is), each into its own file as its chunks come: the
line's ``output`` (inside ``--output-dir`` when relative), else ``NNNN.<--format>`` numbered by
line. Every line is checked before the model loads (text, voice, seed, output path), errors
naming the line. Audiobook users of other ports had to write this themselves.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .cli_checks import CLIError, check_voice, local_model_folder, preset_names, read_input
from .options import check_options, check_text

BATCH_FORMATS = ("wav", "flac", "ogg")
MAX_BATCH_LINES = 100_000
_FIELDS = ("text", "voice", "seed", "output")


@dataclass
class BatchLine:
    """One utterance of a batch file: its 1-based line number, what to say, how and where."""

    number: int
    text: str
    voice: str
    seed: int | None
    output: Path


def _field(value, line: int, name: str, kind):
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
        raise CLIError(f"--batch line {line}: {name} must be a {kind.__name__}, got {json.dumps(value)[:60]}")
    return value


def _parse(line: str, number: int, jsonl: bool) -> dict:
    if not jsonl:
        return {"text": line}
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise CLIError(f"--batch line {number}: not a JSON object ({str(e)[:80]})") from None
    if not isinstance(entry, dict):
        raise CLIError(f"--batch line {number}: not a JSON object")
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise CLIError(f"--batch line {number}: unknown field {unknown[0][:40]!r}; a line may have {', '.join(_FIELDS)}")
    return entry


def read_batch(args, text: str) -> list[BatchLine]:
    """The checked lines of a batch file's ``text`` (``--batch``), with their output paths.

    A file whose first non-blank line starts with ``{`` is JSON lines; otherwise every non-blank
    line is a text to speak. Outputs are checked like ``--output`` and must all differ.
    """
    from .audio_io import check_output_path

    rows = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not rows:
        raise CLIError("--batch: the file holds no lines to speak")
    if len(rows) > MAX_BATCH_LINES:
        raise CLIError(f"--batch: {len(rows)} lines, over the limit of {MAX_BATCH_LINES}; split the file")
    jsonl = rows[0][1].startswith("{")
    folder = Path(args.output_dir).expanduser()
    if not folder.is_dir():
        raise CLIError(f"--output-dir {args.output_dir}: no such folder")
    model_folder = local_model_folder(args.model)
    presets = preset_names(model_folder) if model_folder is not None else None
    lines, seen = [], {}
    for number, raw in rows:
        entry = _parse(raw, number, jsonl)
        words = _field(entry.get("text"), number, "text", str)
        try:
            check_text(words, args.max_chars)
        except ValueError as e:
            raise CLIError(f"--batch line {number}: {e}") from None
        voice = _field(entry.get("voice"), number, "voice", str) or args.voice
        try:
            check_voice(voice, presets)
        except CLIError as e:
            raise CLIError(f"--batch line {number}: {e}") from None
        seed = _field(entry.get("seed"), number, "seed", int)
        seed = args.seed if seed is None else seed
        try:
            check_options(seed=seed)
        except ValueError as e:
            raise CLIError(f"--batch line {number}: {e}") from None
        name = _field(entry.get("output"), number, "output", str) or f"{number:04d}.{args.format}"
        output = folder / Path(name).expanduser()
        try:
            check_output_path(output)
        except (ValueError, OSError) as e:
            raise CLIError(f"--batch line {number}: output {name}: {e}") from None
        if output.resolve() in seen:
            raise CLIError(f"--batch line {number}: output {output} is also line {seen[output.resolve()]}'s")
        seen[output.resolve()] = number
        lines.append(BatchLine(number, words, voice, seed, output))
    return lines


def read_batch_source(args) -> list[BatchLine]:
    """``--batch FILE`` (``-``: standard input), read bounded and checked."""
    limit = 4 * args.max_chars * 16 + 1  # bounded like --file; a batch may hold many texts
    data = read_input(args.batch, limit, "--batch")
    if len(data) >= limit:
        raise CLIError(f"--batch: the file is over {limit - 1} bytes; split it")
    try:
        return read_batch(args, data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CLIError(f"--batch: the file is not valid UTF-8 (byte {e.start})") from None


def speak_batch(model, lines: list[BatchLine], args, progress) -> int:
    """Speak every line, ``args.batch_size`` at a time, each into its file; a line per file done.

    Ctrl-C (or SIGTERM/SIGHUP) keeps what was written: finished files whole, the lines being
    spoken as valid partial files; lines not started get no file.
    """
    from .audio_io import AudioFileWriter
    from .longform import stream_batch_generate_long
    from .signals import exit_status
    from .voice_select import select_voice

    voices: dict[str, object] = {}
    for line in lines:
        if line.voice not in voices:
            try:
                voices[line.voice] = select_voice(model, line.voice)
            except ValueError as e:
                raise CLIError(f"--batch line {line.number}: --voice: {e}") from None
    sr = model.config.sample_rate
    writers: dict[int, AudioFileWriter] = {}
    done = 0
    start = time.perf_counter()
    try:
        texts, line_voices = [line.text for line in lines], [voices[line.voice] for line in lines]
        for i, r in stream_batch_generate_long(model, texts, line_voices, seeds=[line.seed for line in lines],
                                               max_chars=args.max_chars, max_frames=args.max_frames,
                                               batch_size=args.batch_size, cfg_alpha=args.cfg_alpha,
                                               flow_steps=args.flow_steps):
            writer = writers.get(i)
            if writer is None:
                writer = writers[i] = AudioFileWriter(lines[i].output, sr)
            writer.write(r.audio)
            if r.finish_reason is not None:
                writer.close()
                done += 1
                cut = " (stopped at a frame cap)" if r.finish_reason == "length" else ""
                progress.line(f"line {lines[i].number}: {r.audio_seconds:.2f} s -> {lines[i].output}{cut} "
                              f"[{done}/{len(lines)}]")
    except KeyboardInterrupt as e:
        partial = [w.path for w in writers.values() if not w.closed]
        for w in writers.values():
            w.close()
        progress.line(f"interrupted: {done} of {len(lines)} files written"
                      + (f", {len(partial)} partial ({', '.join(map(str, partial))})" if partial else ""))
        return exit_status(e)
    except BaseException:
        for w in writers.values():
            w.abort()  # a no-op for the files already finished
        raise
    wall = time.perf_counter() - start
    progress.info(f"{len(lines)} files in {wall:.1f} s ({args.batch_size} at a time)")
    return 0
