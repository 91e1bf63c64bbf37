"""Generation options: their defaults, their valid ranges, and the one check of each.

The library (``stream_generate``), the command line and the server all validate a request with
these functions, so a value refused in one place is refused everywhere, with the same bounds.
The module imports no MLX: the command line checks its arguments before the (slow) import of
MLX and mlx-lm, so a typo costs well under a second, not a model load.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral, Real

from .errors import quoted

DEFAULT_VOICE = "neutral_female"
DEFAULT_MAX_FRAMES = 2048  # 163.8 s of audio, the reference server's limit
DEFAULT_CFG_ALPHA = 1.2
DEFAULT_FLOW_STEPS = 7
DEFAULT_FIRST_CHUNK_FRAMES = 1  # audio starts after the first frame (time to first audio)
DEFAULT_CHUNK_FRAMES = 10
DEFAULT_MAX_CHARS = 100_000  # about two hours of speech
# Requests the server speaks at once (continuous batching). On a Mac's GPU a decode step is bound
# by reading the weights until 10-15 rows (benchmarks/README.md, "bench_batch.py"), so 4 rows cost
# about one row's time and the fourth client does not wait; on MLX's CPU backend a row costs its
# FLOPs (4 rows: 1.21x the audio per second of 1, 8 rows: 1.32x, measured), so there batching
# only shares the waiting.
DEFAULT_MAX_BATCH = 4
# Prompt positions per backbone call while prefilling (mlx-lm's prefill_step_size): attention
# scores are at most this × the positions so far, not prompt × prompt, and the KV cache is
# evaluated between calls, so a long prompt costs time and memory in proportion to its length.
DEFAULT_PREFILL_STEP = 512

# Valid ranges (inclusive). Guidance outside 0–10 only produces noise; each flow step is a full
# transformer pass per frame, so the step count is bounded to keep one frame's work bounded.
CFG_ALPHA_RANGE = (0.0, 10.0)
FLOW_STEPS_RANGE = (1, 64)
SEED_RANGE = (0, 2**64 - 1)  # what mx.random.key accepts


# The runaway cap (``frame_cap``): frames = a + ceil(b x text tokens) when max_frames is not given.
FRAME_CAP_BASE = 25  # a: twice one second of lead-in and trailing silence, at 12.5 frames/s
FRAME_CAP_PER_TOKEN = 20.0  # b: twice the frames per token of the slowest plausible reading


def frame_cap(text_tokens: int) -> int:
    """The most frames a text of ``text_tokens`` tokens may take when ``max_frames`` is not given.

    ``min(DEFAULT_MAX_FRAMES, 25 + ceil(20 x text_tokens))``, counting the text's own tokens only
    (not the voice rows or special tokens). It stops a model that misses its END frame (minutes
    of babble for a sentence) without cutting real speech short: the cap is at least twice the
    frames of the slowest plausible reading of every sample measured by
    ``benchmarks/measure_frame_cap.py``: 34 sentences in the nine supported languages (en fr
    de es pt it nl ar hi; short and long, numbers, dates, abbreviations, acronyms) tokenized
    with the full Tekken vocabulary, their syllables counted in the spoken form. Normal read
    speech runs at 5–7.8 syllables per second (Pellegrino et al. 2011; Verhoeven et al. 2004;
    Meireles & Gambarini 2012; Wilson & Netsell 2009); the slowest plausible reading is taken as
    3 syllables per second with pauses, plus 1 s of silence. Tekken packs 0.8–2.2 syllables into
    a token (Arabic is the densest, then long Spanish and Italian sentences and acronyms), so the
    slowest reading needs up to 9.1 frames per token: b = 20 keeps the 2x margin even there (it
    needs b >= 18.2; the median sample needs 9.9). Other ports' ``70 + ceil(10.4 x tokens)``
    leaves only 1.5x for dense Arabic and 1.9x for long Spanish sentences.
    """
    return min(DEFAULT_MAX_FRAMES, FRAME_CAP_BASE + math.ceil(FRAME_CAP_PER_TOKEN * text_tokens))


def _plain(name: str) -> str:
    return name


def check_int(value, name: str, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in [lo, hi]; a bool, float or string is refused naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < lo or (hi is not None and value > hi):
        span = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"
        raise ValueError(f"{name} must be an integer {span}, got {quoted(value)}")
    return int(value)


def check_number(value, name: str, lo: float, hi: float) -> float:
    """``value`` as a finite float in [lo, hi]; NaN, infinities and non-numbers are refused."""
    # Compare before math.isfinite: an int like 10**400 is a Real that no float can hold
    # (isfinite would raise OverflowError); lo <= value <= hi refuses it exactly.
    if isinstance(value, bool) or not isinstance(value, Real) or not lo <= value <= hi or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number from {lo} to {hi}, got {quoted(value)}")
    return float(value)


def check_options(
    *,
    cfg_alpha: float | None = None,
    flow_steps: int | None = None,
    max_frames: int | None = None,
    seed: int | None = None,
    prefill_step_size: int | None = None,
    name: Callable[[str], str] = _plain,
) -> None:
    """Raise ValueError for an option outside its range; None means "not given", always valid.

    ``name`` turns the option's Python name into the one the user typed (the command line passes
    ``lambda n: "--" + n.replace("_", "-")``), so messages name what the user can change.
    """
    if cfg_alpha is not None:
        check_number(cfg_alpha, name("cfg_alpha"), *CFG_ALPHA_RANGE)
    if flow_steps is not None:
        check_int(flow_steps, name("flow_steps"), *FLOW_STEPS_RANGE)
    if max_frames is not None:
        check_int(max_frames, name("max_frames"), 1)
    if seed is not None:
        check_int(seed, name("seed"), *SEED_RANGE)
    if prefill_step_size is not None:
        check_int(prefill_step_size, name("prefill_step_size"), 1)


def check_text(text: str, max_chars: int | None = DEFAULT_MAX_CHARS) -> None:
    """Raise ValueError for empty text, control characters (other than tab and line breaks), or
    text over ``max_chars`` (naming its length and the limit)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text is empty; give some text to speak")
    bad = next((i for i, c in enumerate(text) if (ord(c) < 32 and c not in "\t\n\r") or ord(c) == 127), None)
    if bad is not None:
        raise ValueError(f"text holds the control character U+{ord(text[bad]):04X} at position {bad}; remove it")
    if max_chars is not None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be at least 1, got {max_chars}")
        if len(text) > max_chars:
            raise ValueError(
                f"text is {len(text)} characters, over the limit of {max_chars} (max_chars); "
                "shorten it or raise the limit"
            )
