"""Long text: split it at sentence boundaries, speak the pieces in turn, join them with a crossfade.

``stream_generate`` speaks one prompt; ``stream_generate_long`` is the same generator for text of
any length (the CLI and the server use it for every request):

1. ``text_split.split_text`` cuts the text into pieces of at most ``chunk_chars`` characters
   (a short first piece; cuts at paragraphs, sentences, clauses, spaces, else between character
   clusters: every prompt is bounded and work grows linearly with the text).
2. Every piece is checked before any audio is made: its prompt plus ``max_frames`` must fit the
   model's context (a piece that does not is cut again, down to single words).
3. Piece ``i`` is spoken by ``stream_generate`` with the same voice and ``chunk_seed(seed, i)``:
   piece 0 uses ``seed`` itself, so one-piece text gives exactly ``stream_generate``'s output.
   With ``batch_size=N`` N pieces are decoded at once (``stream_batch_generate``), each with the
   same seed, so the samples are those of ``batch_size=1``; chunks still come out in order.
4. Consecutive pieces overlap by ``crossfade_ms`` (default 40 ms) with an equal-power crossfade
   (cos/sin gains, whose squares sum to 1: the right shape for two unrelated signals). To do this
   the last ``crossfade_ms`` of every piece but the last is held back until the next piece's first
   audio exists; the yielded chunks are final, so their concatenation is the whole signal, of
   ``sum(piece lengths) - sum(overlaps)`` samples.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .batch_generation import per_row, stream_batch_generate
from .generation import (
    DEFAULT_MAX_CHARS,
    DEFAULT_VOICE,
    GenerationResponse,
    GenerationResult,
    check_fits,
    check_text,
    collect,
    frame_limit,
    stream_generate,
)
from .model import Model
from .options import check_int, check_options
from .prompt_cache import cancelled
from .text_split import DEFAULT_CHUNK_CHARS, DEFAULT_FIRST_CHUNK_CHARS, split_text
from .voice_file import Voice
from .voice_select import SelectedVoice, select_voice

DEFAULT_CROSSFADE_MS = 40.0

# The options of ``stream_generate`` that ``check_options`` knows, checked before any piece.
_OPTIONS = ("cfg_alpha", "flow_steps", "prefill_step_size")


@dataclass
class LongGenerationResponse(GenerationResponse):
    """A ``GenerationResponse`` from ``stream_generate_long``.

    ``audio`` is final (crossfades applied); ``codes``, ``frames`` and ``audio_seconds`` count
    every piece so far; ``finish_reason`` is set on the last response only: "length" if any
    piece stopped at its frame cap, else "stop"; ``frame_cap`` is the current piece's.

    Extra attributes:
        piece: index of the text piece being spoken.
        pieces: number of pieces.
        prompt_tokens: prompt tokens of all pieces together (known before generation starts).
        capped_pieces: (piece index, frame cap) of every piece so far that stopped at its cap.
    """

    piece: int = 0
    pieces: int = 1
    prompt_tokens: int = 0
    capped_pieces: tuple[tuple[int, int], ...] = ()


def chunk_seed(seed: int | None, index: int) -> int | None:
    """The seed of piece ``index``: ``seed`` itself for piece 0, then one derived from (seed, index)."""
    if seed is None or index == 0:
        return seed
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def plan_pieces(
    model: Model,
    text: str,
    voice: str | os.PathLike | Voice | SelectedVoice = DEFAULT_VOICE,
    *,
    max_chars: int | None = DEFAULT_MAX_CHARS,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    first_chunk_chars: int | None = DEFAULT_FIRST_CHUNK_CHARS,
    max_frames: int | None = None,
) -> list[tuple[str, int]]:
    """Validate a request and split it: the pieces with their prompt lengths, ``[(text, tokens)]``.

    Uses only the tokenizer (no MLX work), so a server can check a request before accepting it.
    One-piece text is returned unchanged (not stripped), exactly as ``stream_generate`` gets it.

    Raises:
        ValueError: empty text, text over ``max_chars`` (naming both), unknown voice, or a piece
            whose prompt plus ``max_frames`` (None: its runaway cap, ``options.frame_cap``)
            exceeds the model's context even when cut to single characters.
    """
    check_text(text, max_chars)
    voice = select_voice(model, voice)  # unknown voice → ValueError listing the valid ones
    context = model.config.max_seq_len
    if max_frames is not None and max_frames >= context:
        raise ValueError(
            f"text too long: max_frames is {max_frames} and the model's context is {context} "
            "positions, which leaves no room for the prompt; lower max_frames"
        )
    pieces = split_text(text, chunk_chars, first_chunk_chars)
    if len(pieces) == 1:
        pieces = [text]
    planned, todo = [], [(p, chunk_chars) for p in pieces]
    while todo:
        piece, limit = todo.pop(0)
        ids = model.tokenizer.encode_speech_prompt(piece, voice.n_rows)
        frames = frame_limit(model, ids, max_frames)
        if len(ids) + frames <= context:
            planned.append((piece, len(ids)))
            continue
        smaller = split_text(piece, max(1, min(limit, len(piece)) // 2), None)
        if len(smaller) < 2:
            check_fits(model, len(ids), frames, explicit=max_frames is not None,
                       what=f"the prompt of the piece {piece[:40]!r}")
        todo[:0] = [(p, max(1, min(limit, len(piece)) // 2)) for p in smaller]
    return planned


def _fade(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal-power gains over n samples: (fade_out, fade_in), with fade_out² + fade_in² = 1."""
    phase = (np.arange(n, dtype=np.float64) + 0.5) / n * (np.pi / 2)
    return np.cos(phase).astype(np.float32), np.sin(phase).astype(np.float32)


def crossfade(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """``a`` then ``b``, the last ``n`` samples of ``a`` mixed with the first ``n`` of ``b``."""
    if n == 0:
        return np.concatenate([a, b])
    out, fade_in = _fade(n)
    mixed = a[len(a) - n :] * out + b[:n] * fade_in
    return np.concatenate([a[: len(a) - n], mixed, b[n:]])


class PieceJoiner:
    """One text's piece responses (fed in piece order) → final chunks with the crossfades applied.

    The last ``overlap`` samples of every piece but the last are held back until the next
    piece's first audio exists (enough of it to cross them, or the whole piece if shorter).
    ``stream_generate_long`` feeds it piece after piece; a scheduler that batches the pieces of
    many requests keeps one per request and feeds it each piece's responses in piece order.

    Args:
        planned: the text's pieces, ``plan_pieces``'s result.
        sample_rate: samples per second.
        overlap: crossfade length in samples (``round(crossfade_ms · sample_rate / 1000)``).
        start: ``time.perf_counter()`` at the request's start (for ``elapsed``).
    """

    def __init__(self, planned: list[tuple[str, int]], sample_rate: int, overlap: int, start: float):
        self.pieces, self.sr, self.overlap, self.start = len(planned), sample_rate, overlap, start
        self.prompt_tokens = sum(n for _, n in planned)
        self.held = np.zeros(0, np.float32)  # the signal not yet yielded (the tail awaiting a crossfade)
        self.emitted = self.frames_before = 0
        self.capped: tuple[tuple[int, int], ...] = ()  # (piece, frame cap) of the pieces that stopped there
        self.piece, self.joining, self.head, self.codes = -1, False, [], []

    def feed(self, i: int, r: GenerationResponse) -> LongGenerationResponse | None:
        """Take piece ``i``'s next response; the final chunk it completes, if any."""
        if i != self.piece:  # the first response of the next piece
            self.piece, self.joining, self.head, self.codes = i, i > 0, [], []
        last_piece = i == self.pieces - 1
        self.codes.append(r.codes)
        if self.joining:  # gather enough of this piece's start to cross the held tail
            self.head.append(r.audio)
            if sum(map(len, self.head)) < len(self.held) and r.finish_reason is None:
                return None
            joined = np.concatenate(self.head)
            self.held = crossfade(self.held, joined, min(len(self.held), len(joined)))
            self.joining, self.head = False, []
        else:
            self.held = np.concatenate([self.held, r.audio]) if len(self.held) else r.audio
        keep = 0 if last_piece else min(self.overlap, len(self.held))
        audio, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        self.emitted += len(audio)
        if r.finish_reason == "length":
            self.capped += ((i, r.frame_cap),)
        elapsed = time.perf_counter() - self.start
        finish = ("length" if self.capped else "stop") if last_piece and r.finish_reason else None
        out = LongGenerationResponse(
            audio=audio, sample_rate=self.sr, codes=np.concatenate(self.codes), frames=self.frames_before + r.frames,
            audio_seconds=self.emitted / self.sr, elapsed=elapsed,
            real_time_factor=self.emitted / self.sr / elapsed if elapsed > 0 else 0.0,
            peak_memory=r.peak_memory, finish_reason=finish, frame_cap=r.frame_cap,
            piece=i, pieces=self.pieces, prompt_tokens=self.prompt_tokens, capped_pieces=self.capped,
        )
        self.codes = []
        if r.finish_reason is not None:
            self.frames_before += r.frames
        return out


def _check_crossfade(crossfade_ms) -> None:
    if isinstance(crossfade_ms, bool) or not isinstance(crossfade_ms, (int, float)) or not crossfade_ms >= 0:
        raise ValueError(f"crossfade_ms must be >= 0, got {crossfade_ms!r}")


def stream_generate_long(
    model: Model,
    text: str,
    voice: str | os.PathLike | Voice | SelectedVoice = DEFAULT_VOICE,
    *,
    seed: int | None = None,
    max_chars: int | None = DEFAULT_MAX_CHARS,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    first_chunk_chars: int | None = DEFAULT_FIRST_CHUNK_CHARS,
    crossfade_ms: float = DEFAULT_CROSSFADE_MS,
    max_frames: int | None = None,
    batch_size: int = 1,
    cancel=None,
    **kwargs,
) -> Iterator[LongGenerationResponse]:
    """Speak text of any length, streamed: ``stream_generate`` piece by piece, crossfaded.

    Args:
        model: a model from ``mlx_speech.load``.
        text: what to say.
        voice: a voice (name, file, ``Voice``: see ``voice_select``), used for every piece.
        seed: piece ``i`` uses ``chunk_seed(seed, i)``; None: random.
        max_chars: refuse longer text with a ValueError naming both numbers (None: no limit).
        chunk_chars, first_chunk_chars: piece sizes (see ``split_text``).
        crossfade_ms: overlap between consecutive pieces (equal-power), 0 to butt-join.
        max_frames: the most frames of each piece; None (the default): each piece's runaway cap
            (``options.frame_cap`` of its token count). A piece that stops there makes the
            final ``finish_reason`` "length" and is listed in ``capped_pieces``.
        batch_size: pieces generated at once (``stream_batch_generate``); the output is the same
            samples as with 1 (each piece keeps its seed), only sooner on hardware where a
            batched step costs less than that many single ones. The first piece's chunks
            still come first and as soon as they exist; a later piece's are held until every
            piece before it is out, so with N > 1 up to the audio of the pieces generated ahead
            is held in memory.
        cancel: an object with ``is_set()`` (e.g. ``threading.Event``), checked between prefill
            chunks and frames of every piece; once set the generator returns without further
            responses.
        **kwargs: passed to ``stream_generate`` for every piece.

    Yields:
        ``LongGenerationResponse`` chunks whose audio concatenates to the final signal. Every
        piece and every option is checked before the first chunk (see ``plan_pieces``).
    """
    _check_crossfade(crossfade_ms)
    check_options(seed=seed, max_frames=max_frames, **{k: kwargs[k] for k in _OPTIONS if k in kwargs})
    check_int(batch_size, "batch_size", 1)
    if batch_size > 1:
        for _, r in stream_batch_generate_long(model, [text], voice, seeds=seed, max_chars=max_chars,
                                               chunk_chars=chunk_chars, first_chunk_chars=first_chunk_chars,
                                               crossfade_ms=crossfade_ms, max_frames=max_frames,
                                               batch_size=batch_size, cancel=cancel, _name_rows=False, **kwargs):
            yield r
        return
    voice = select_voice(model, voice)  # once: a voice file is read once, not per piece
    planned = plan_pieces(model, text, voice, max_chars=max_chars, chunk_chars=chunk_chars,
                          first_chunk_chars=first_chunk_chars, max_frames=max_frames)
    sr = model.config.sample_rate
    joiner = PieceJoiner(planned, sr, int(round(crossfade_ms * sr / 1000)), time.perf_counter())
    for i, (piece, _) in enumerate(planned):
        if cancelled(cancel):
            return
        for r in stream_generate(model, piece, voice, seed=chunk_seed(seed, i), max_frames=max_frames,
                                 cancel=cancel, **kwargs):
            if (out := joiner.feed(i, r)) is not None:
                yield out


def stream_batch_generate_long(
    model: Model,
    texts: Sequence[str],
    voices=DEFAULT_VOICE,
    *,
    seeds=None,
    max_chars: int | None = DEFAULT_MAX_CHARS,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    first_chunk_chars: int | None = DEFAULT_FIRST_CHUNK_CHARS,
    crossfade_ms: float = DEFAULT_CROSSFADE_MS,
    max_frames: int | None = None,
    batch_size: int = 4,
    cancel=None,
    _name_rows: bool = True,
    **kwargs,
) -> Iterator[tuple[int, LongGenerationResponse]]:
    """Several texts of any length at once: yields ``(text index, LongGenerationResponse)``.

    Every piece of every text goes through one ``stream_batch_generate`` (``batch_size`` pieces
    decoding at a time, in text order, the next joining as one finishes); each text's chunks
    come in its own order and are exactly those of ``stream_generate_long`` for that text alone
    with the same voice and seed (a batch file of many utterances, one output per text).
    ``voices`` and ``seeds`` are one value or one per text; the other options are as
    ``stream_generate_long``'s, for every text. Every text is planned and checked before any
    audio is made, errors naming the text ("texts[2]: …").
    """
    _check_crossfade(crossfade_ms)
    check_int(batch_size, "batch_size", 1)
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    voices, seeds = per_row(voices, len(texts), "voices"), per_row(seeds, len(texts), "seeds")
    check_options(max_frames=max_frames, **{k: kwargs[k] for k in _OPTIONS if k in kwargs})
    plans = []
    for t, (text, voice, seed) in enumerate(zip(texts, voices, seeds)):
        try:
            check_options(seed=seed)
            voice = select_voice(model, voice)
            plans.append((voice, seed, plan_pieces(model, text, voice, max_chars=max_chars, chunk_chars=chunk_chars,
                                                   first_chunk_chars=first_chunk_chars, max_frames=max_frames)))
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise (type(e)(f"texts[{t}]: {e}") if _name_rows else e) from None
    owner = [(t, i) for t, (_, _, planned) in enumerate(plans) for i in range(len(planned))]
    sr = model.config.sample_rate
    start = time.perf_counter()
    joiners = [PieceJoiner(planned, sr, int(round(crossfade_ms * sr / 1000)), start) for _, _, planned in plans]
    playing = [0] * len(plans)  # each text's piece whose chunks are passed on as they come
    later: dict[tuple[int, int], list[GenerationResponse]] = {}  # chunks of pieces whose turn has not come
    pieces = stream_batch_generate(
        model, [p for _, _, planned in plans for p, _ in planned],
        [voice for voice, _, planned in plans for _ in planned],
        seeds=[chunk_seed(seed, i) for _, seed, planned in plans for i in range(len(planned))],
        max_frames=max_frames, batch_size=batch_size, cancel=cancel, **kwargs)
    for k, r in pieces:
        t, i = owner[k]
        if i != playing[t]:
            later.setdefault((t, i), []).append(r)
            continue
        ready = [(i, r)]
        while r.finish_reason is not None and playing[t] + 1 < len(plans[t][2]):
            playing[t] += 1  # this piece is done: pass on what the next one has so far
            held = later.pop((t, playing[t]), [])
            ready += [(playing[t], h) for h in held]
            if not held:
                break
            r = held[-1]
        for piece, response in ready:
            if (out := joiners[t].feed(piece, response)) is not None:
                yield t, out


def generate_long(model: Model, text: str, voice: str | os.PathLike | Voice | SelectedVoice = DEFAULT_VOICE,
                  **kwargs) -> GenerationResult:
    """Speak text of any length in one go. Takes the keyword arguments of ``stream_generate_long``."""
    return collect(stream_generate_long(model, text, voice, **kwargs))


def batch_generate_long(model: Model, texts: Sequence[str], voices=DEFAULT_VOICE, **kwargs) -> list[GenerationResult]:
    """Several texts of any length at once, one ``GenerationResult`` per text in order (each equal
    to ``generate_long`` of that text alone); takes ``stream_batch_generate_long``'s arguments.
    To write each output as soon as its text is done, iterate ``stream_batch_generate_long`` and
    ``collect`` each text's responses when one has ``finish_reason`` set."""
    parts: dict[int, list[LongGenerationResponse]] = {i: [] for i in range(len(texts))}
    for t, r in stream_batch_generate_long(model, texts, voices, **kwargs):
        parts[t].append(r)
    unfinished = [t for t, c in parts.items() if not c or c[-1].finish_reason is None]
    if unfinished:
        raise RuntimeError(f"cancelled before texts {unfinished} were finished")
    return [collect(iter(parts[t])) for t in range(len(texts))]
