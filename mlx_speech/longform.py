"""Long text: split it at sentence boundaries, speak the pieces in turn, join them with a crossfade.

``stream_generate`` speaks one prompt; ``stream_generate_long`` is the same generator for text of
any length (the CLI and the server use it for every request):

1. ``split_text`` cuts the text into pieces of at most ``chunk_chars`` characters (the first piece
   at most ``first_chunk_chars`` when a sentence ends by then, so the first prompt is short). A cut
   is made, in order of preference, at a paragraph break (always), a sentence end or line break,
   a clause mark (``, ; :`` or a dash), a space; never inside a word. Text with no space within the
   limit (CJK without punctuation, a URL, base64, emoji) is cut between two characters, keeping
   character clusters (combining marks, ZWJ emoji sequences, flags) whole, so no piece is ever
   longer than the limit: every prompt is bounded and work grows linearly with the text.
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
import re
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .batch_generation import stream_batch_generate
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
from .voice_file import Voice
from .voice_select import SelectedVoice, select_voice

DEFAULT_CHUNK_CHARS = 400  # about 25 s of speech per prompt
DEFAULT_FIRST_CHUNK_CHARS = 120
DEFAULT_CROSSFADE_MS = 40.0

_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")
# Cut levels, best first; each pattern matches the whitespace a cut may replace (or, for CJK
# full stops, the empty string right after them).
_SENTENCE = re.compile(
    # A sentence end, after an optional closing quote or bracket, not before a lower-case word
    # (so "e.g. this" is not one).
    r"(?:(?<=[.!?…])|(?<=[.!?…][\"'”’»)\]]))\s+(?=[^\sa-zß-öø-ÿ])"
    r"|(?<=[。！？])\s*"  # CJK full stops need no space after them
    r"|(?<=[।॥؟۔])\s+"  # Hindi danda, Arabic question mark and full stop
    r"|\s*\n\s*"  # a line break
)
_CLAUSE = re.compile(r"(?<=[,;:，、،—–])\s+|(?<=\s-)\s+|(?<=[.!?…])\s+")
_SPACE = re.compile(r"\s+")
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


def _cut(text: str, start: int, limit: int, patterns) -> tuple[int, int] | None:
    """The last match (start, end) of the first pattern that has one inside text[start:start+limit]."""
    window = text[start : start + limit + 1]  # +1: a cut right after `limit` characters is allowed
    for pattern in patterns:
        cuts = [m.span() for m in pattern.finditer(window) if 0 < m.start() <= limit]
        if cuts:
            return start + cuts[-1][0], start + cuts[-1][1]
    return None


_ZWJ = "\u200d"
_VIRAMA = 9  # canonical combining class of Indic viramas: the next consonant joins the cluster


def _joins_next(c: str) -> bool:
    """Whether ``c`` belongs to the character cluster after it (ZWJ, virama, a lone high surrogate)."""
    return c == _ZWJ or unicodedata.combining(c) == _VIRAMA or "\ud800" <= c <= "\udbff"


def _extends_previous(c: str) -> bool:
    """Whether ``c`` belongs to the character cluster before it: combining marks (accents,
    Indic vowel signs, enclosing keycaps), ZWJ, variation selectors, emoji skin-tone modifiers,
    emoji tag characters (subdivision flags) and low surrogates."""
    o = ord(c)
    return (
        unicodedata.category(c) in ("Mn", "Mc", "Me")
        or c == _ZWJ
        or 0xFE00 <= o <= 0xFE0F or 0xE0100 <= o <= 0xE01EF  # variation selectors
        or 0x1F3FB <= o <= 0x1F3FF  # skin tones
        or 0xE0020 <= o <= 0xE007F  # tags
        or 0xDC00 <= o <= 0xDFFF  # low surrogate
    )


def _is_regional_indicator(c: str) -> bool:
    return 0x1F1E6 <= ord(c) <= 0x1F1FF


def _cluster_boundary(text: str, i: int) -> bool:
    """Whether cutting between text[i-1] and text[i] keeps every character cluster whole (a
    cheap approximation of Unicode grapheme clusters: marks, ZWJ emoji sequences, skin tones,
    keycaps, flags, surrogate pairs)."""
    before, after = text[i - 1], text[i]
    if _joins_next(before) or _extends_previous(after):
        return False
    if _is_regional_indicator(before) and _is_regional_indicator(after):
        run = 0  # flags are pairs of regional indicators, counted from the start of the run
        while i - run - 1 >= 0 and _is_regional_indicator(text[i - run - 1]):
            run += 1
        return run % 2 == 0
    return True


def _hard_cut(text: str, start: int, limit: int) -> int:
    """Where to cut a run of ``limit`` or more characters with no space (CJK, a URL, base64, emoji).

    The last cluster boundary within the limit; if a single cluster is longer than the limit
    (e.g. hundreds of stacked marks), the limit itself, so no piece ever exceeds it.
    """
    for i in range(start + limit, start, -1):
        if _cluster_boundary(text, i):
            return i
    return start + limit


def _split_paragraph(text: str, chunk_chars: int, first_chars: int | None) -> list[str]:
    pieces, start = [], 0
    while start < len(text):
        if len(text) - start <= (first_chars or chunk_chars):
            pieces.append(text[start:])
            break
        cut = None
        if first_chars is not None:
            # The short first piece ends at a sentence; if none ends by first_chars, at the first one.
            cut = _cut(text, start, first_chars, [_SENTENCE])
            if cut is None:
                m = _SENTENCE.search(text, start + 1, start + chunk_chars + 1)
                cut = m.span() if m is not None and m.start() > start else None
            first_chars = None
        if cut is None:
            cut = _cut(text, start, chunk_chars, [_SENTENCE, _CLAUSE, _SPACE])
        if cut is None:  # no space within the limit: cut between two characters
            end = _hard_cut(text, start, chunk_chars)
            cut = (end, end)
        pieces.append(text[start : cut[0]])
        start = cut[1]
    return [p.strip() for p in pieces if p.strip()]


def split_text(
    text: str,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    first_chunk_chars: int | None = DEFAULT_FIRST_CHUNK_CHARS,
) -> list[str]:
    """Cut ``text`` into pieces to speak one at a time (see the module docstring for the rules).

    Args:
        text: the text; pieces are stripped slices of it (inner whitespace is kept).
        chunk_chars: the longest piece; a longer run without spaces is cut between characters.
        first_chunk_chars: the first piece ends at the last sentence end within this many
            characters (or at the first sentence end within ``chunk_chars``); None: no special
            first piece.

    Returns:
        The non-empty pieces, in order. Text that fits in one piece comes back whole.
    """
    if chunk_chars < 1 or (first_chunk_chars is not None and first_chunk_chars < 1):
        raise ValueError(f"chunk sizes must be at least 1 character, got {chunk_chars} and {first_chunk_chars}")
    if len(text.strip()) <= chunk_chars:
        return [text.strip()] if text.strip() else []
    pieces = []
    for paragraph in _PARAGRAPH.split(text):
        first = first_chunk_chars if not pieces and first_chunk_chars is not None else None
        pieces += _split_paragraph(paragraph.strip(), chunk_chars, first)
    return pieces


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
    if isinstance(crossfade_ms, bool) or not isinstance(crossfade_ms, (int, float)) or not crossfade_ms >= 0:
        raise ValueError(f"crossfade_ms must be >= 0, got {crossfade_ms!r}")
    check_options(seed=seed, max_frames=max_frames, **{k: kwargs[k] for k in _OPTIONS if k in kwargs})
    check_int(batch_size, "batch_size", 1)
    voice = select_voice(model, voice)  # once: a voice file is read once, not per piece
    planned = plan_pieces(model, text, voice, max_chars=max_chars, chunk_chars=chunk_chars,
                          first_chunk_chars=first_chunk_chars, max_frames=max_frames)
    start = time.perf_counter()
    sr = model.config.sample_rate
    overlap = int(round(crossfade_ms * sr / 1000))
    prompt_tokens = sum(n for _, n in planned)
    held = np.zeros(0, np.float32)  # the signal not yet yielded (the tail awaiting a crossfade)
    emitted = frames_before = 0
    capped: tuple[tuple[int, int], ...] = ()  # (piece, frame cap) of the pieces that stopped there
    piece = -1
    for i, r in _piece_responses(model, planned, voice, seed, max_frames, batch_size, cancel, kwargs):
        if i != piece:  # the first response of the next piece
            piece, last_piece = i, i == len(planned) - 1
            joining, head, codes = i > 0, [], []
        codes.append(r.codes)
        if joining:  # gather enough of this piece's start to cross the held tail
            head.append(r.audio)
            if sum(map(len, head)) < len(held) and r.finish_reason is None:
                continue
            joined = np.concatenate(head)
            held = crossfade(held, joined, min(len(held), len(joined)))
            joining, head = False, []
        else:
            held = np.concatenate([held, r.audio]) if len(held) else r.audio
        keep = 0 if last_piece else min(overlap, len(held))
        audio, held = held[: len(held) - keep], held[len(held) - keep :]
        emitted += len(audio)
        if r.finish_reason == "length":
            capped += ((i, r.frame_cap),)
        elapsed = time.perf_counter() - start
        finish = ("length" if capped else "stop") if last_piece and r.finish_reason else None
        yield LongGenerationResponse(
            audio=audio, sample_rate=sr, codes=np.concatenate(codes), frames=frames_before + r.frames,
            audio_seconds=emitted / sr, elapsed=elapsed,
            real_time_factor=emitted / sr / elapsed if elapsed > 0 else 0.0,
            peak_memory=r.peak_memory, finish_reason=finish, frame_cap=r.frame_cap,
            piece=i, pieces=len(planned), prompt_tokens=prompt_tokens, capped_pieces=capped,
        )
        codes = []
        if r.finish_reason is not None:
            frames_before += r.frames


def _piece_responses(model: Model, planned: list[tuple[str, int]], voice: SelectedVoice, seed: int | None,
                     max_frames: int | None, batch_size: int, cancel, kwargs: dict) -> Iterator[tuple[int, GenerationResponse]]:
    """``(piece index, response)`` of every piece, in piece order, each piece with ``chunk_seed``.

    ``batch_size`` 1: ``stream_generate`` piece after piece. More: ``stream_batch_generate``
    keeps that many pieces decoding at once (the next joins as one finishes); the chunks of the
    piece being played are passed on as they come, later pieces' are held until their turn.
    """
    if batch_size == 1:
        for i, (piece, _) in enumerate(planned):
            if cancelled(cancel):
                return
            for r in stream_generate(model, piece, voice, seed=chunk_seed(seed, i), max_frames=max_frames,
                                     cancel=cancel, **kwargs):
                yield i, r
        return
    later: dict[int, list[GenerationResponse]] = {}  # chunks of pieces whose turn has not come
    playing = 0
    for i, r in stream_batch_generate(model, [p for p, _ in planned], voice,
                                      seeds=[chunk_seed(seed, i) for i in range(len(planned))],
                                      max_frames=max_frames, batch_size=batch_size, cancel=cancel, **kwargs):
        if i != playing:
            later.setdefault(i, []).append(r)
            continue
        yield i, r
        while r.finish_reason is not None:  # this piece is done: pass on what the next one has
            playing += 1
            held = later.pop(playing, [])
            for r in held:
                yield playing, r
            if not held:
                break


def generate_long(model: Model, text: str, voice: str | os.PathLike | Voice | SelectedVoice = DEFAULT_VOICE,
                  **kwargs) -> GenerationResult:
    """Speak text of any length in one go. Takes the keyword arguments of ``stream_generate_long``."""
    return collect(stream_generate_long(model, text, voice, **kwargs))
