"""Cutting text into pieces to speak one at a time (no MLX: plain string work).

``split_text`` cuts a text into pieces of at most ``chunk_chars`` characters (the first piece at
most ``first_chunk_chars`` when a sentence ends by then, so the first prompt is short). A cut is
made, in order of preference, at a paragraph break (always), a sentence end or line break, a clause
mark (``, ; :`` or a dash), a space; never inside a word. Text with no space within the limit (CJK
without punctuation, a URL, base64, emoji) is cut between two characters, keeping character
clusters (combining marks, ZWJ emoji sequences, flags) whole, so no piece is ever longer than the
limit: every prompt is bounded and work grows linearly with the text.
"""

from __future__ import annotations

import re
import unicodedata

DEFAULT_CHUNK_CHARS = 400  # about 25 s of speech per prompt
DEFAULT_FIRST_CHUNK_CHARS = 120

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
