"""What ``python -m mlx_speech.generate`` shows on stderr: progress, the tail's countdown, the summary.

All of it is best effort: the audio file matters more than a progress line, so a broken pipe
(``2>&1 | head -c 20``), a full device (``2>/dev/full``) or a closed terminal silences the
display instead of aborting the run (``BestEffortStream``).

On a terminal, progress is one line updated in place (``\\r``), and after generation a countdown
while the rest of the audio plays. Anywhere else (a log file, a pipe) there are no ``\\r``
updates: one line when the first audio exists, one per finished piece of long text, one when
only playback remains, then the summary. The summary is wrapped to 80 columns.

Imports nothing from MLX: the command line shows its errors before MLX is loaded.
"""

from __future__ import annotations

import io
import os

WIDTH = 80  # columns the summary fits in


class BestEffortStream:
    """A text stream whose ``write`` and ``flush`` never raise.

    The first OSError (EPIPE from a closed pipe, ENOSPC from /dev/full, EIO from a closed
    terminal) makes it silent for good, and points its file descriptor at /dev/null, so later
    writes by other code and the interpreter's final flush succeed too (a failing flush at exit
    would otherwise turn the exit status into 120).
    """

    def __init__(self, stream):
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except OSError:
                self._silence()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except OSError:
                self._silence()

    def isatty(self) -> bool:
        try:
            return not self.broken and self._stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name):  # encoding, fileno, buffer…: those of the wrapped stream
        return getattr(self._stream, name)

    def _silence(self) -> None:
        self.broken = True
        try:
            fd = self._stream.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
            self._stream.flush()  # what the failed write left in the buffer goes to /dev/null
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass


def plural(n: int, word: str) -> str:
    """``1 frame``, ``2 frames``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def memory(gb: float) -> str:
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1000:.0f} MB"


def wrap(parts: list[str], width: int = WIDTH, sep: str = " | ") -> list[str]:
    """Join ``parts`` with ``sep`` into lines of at most ``width`` columns (a part longer than
    ``width`` gets a line of its own)."""
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + len(sep) + len(part) <= width:
            lines[-1] += sep + part
        else:
            lines.append(part)
    return lines


def finish_words(r, explicit_cap: bool) -> list[str]:
    """The finish reason of the last response ``r``, and for "length" what it means for the user:
    which cap stopped it (``--max-frames`` or the cap proportional to the text) and that the text
    may be cut (summary parts, each under 80 columns)."""
    if r.finish_reason != "length":
        return [f"finish: {r.finish_reason}"]
    pieces = getattr(r, "pieces", 1)
    capped = getattr(r, "capped_pieces", ()) or ((0, r.frame_cap),)
    if explicit_cap:
        cap = f"(--max-frames {capped[0][1]})"
        which = "stopped at" if pieces == 1 else f"{len(capped)} of {pieces} pieces hit"
        return [f"finish: length, {which} the frame cap {cap}: text may be cut"]
    if pieces == 1:
        words = f"stopped at the cap for this text ({plural(capped[0][1], 'frame')})"
    else:
        words = f"{len(capped)} of {pieces} pieces hit the cap for their text"
    return [f"finish: length, {words}: text may be cut", "raise the cap with --max-frames"]


class Progress:
    """Progress lines on ``stream`` (stderr), as the module docstring describes."""

    def __init__(self, stream, quiet: bool = False, tty: bool | None = None):
        self._out = stream
        self.quiet = quiet
        self.tty = stream.isatty() if tty is None else tty
        self._status_len = 0  # length of the in-place line now shown (0: none)
        self._first_seen = False
        self._piece = 0
        self._said_playing = False

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()

    def line(self, text: str) -> None:
        """A line of its own, also with ``--quiet`` (warnings, errors)."""
        self.end_status()
        self._write(text + "\n")

    def info(self, text: str) -> None:
        """A line of progress (not with ``--quiet``)."""
        if not self.quiet:
            self.line(text)

    def status(self, text: str) -> None:
        """Replace the in-place line (terminal only)."""
        if self.quiet or not self.tty:
            return
        self._write("\r" + text + " " * max(self._status_len - len(text), 0))
        self._status_len = len(text)

    def end_status(self) -> None:
        if self._status_len:
            self._status_len = 0
            self._write("\n")

    def chunk(self, r) -> None:
        """After each generated chunk (a ``LongGenerationResponse``)."""
        if not self._first_seen:
            self._first_seen = True
            if not self.tty:
                self.info(f"first audio ready after {r.elapsed:.2f} s")
        if r.piece != self._piece and not self.tty:
            self.info(f"piece {self._piece + 1}/{r.pieces} done, {r.audio_seconds:.2f} s of audio so far")
        self._piece = r.piece
        piece = f"  piece {r.piece + 1}/{r.pieces}" if r.pieces > 1 else ""
        self.status(f"{r.audio_seconds:7.2f} s of audio  {r.real_time_factor:5.2f}x real time  "
                    f"{plural(r.frames, 'frame')}{piece}")

    def playing(self, seconds_left: float) -> None:
        """While the rest of the audio plays after generation (``AudioPlayer.close``'s report)."""
        if self.tty:
            self.status(f"playing: {seconds_left:5.1f} s left")
        elif not self._said_playing:
            self._said_playing = True
            self.info(f"generation done; playing the last {seconds_left:.1f} s")

    def summary(self, r, *, explicit_cap: bool, player=None, request_start: float = 0.0,
                output: str | None = None) -> None:
        """The closing lines: figures, finish reason, playback, the file written.

        ``explicit_cap``: the frame cap was the user's ``--max-frames``, not the text's own."""
        parts = [
            f"{plural(r.frames, 'frame')}, {r.audio_seconds:.2f} s of audio in {r.elapsed:.2f} s "
            f"({r.real_time_factor:.2f}x real time)",
            f"peak memory: {memory(r.peak_memory)}",
            *finish_words(r, explicit_cap),
        ]
        if player is not None:
            parts.append(f"underruns: {player.underruns}")
            if player.first_output_time is not None:
                parts.append(f"first audio heard after {player.first_output_time - request_start:.2f} s")
        if output is not None:
            parts.append(f"wrote {output}")
        for text in wrap(parts):
            self.info(text)
