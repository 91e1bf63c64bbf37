"""Voices as codes: a voice's rows are sums of audio-code embeddings (spec §4.1, §4.5).

A preset ``voice_embedding/<name>.pt`` is, per 80 ms reference frame, the sum of the 37
audio-embedding rows of that frame's codec codes, followed by one END row — exactly what the
official ``encode_waveforms``/``encode_tokens`` builds from reference audio. So a voice made from
codes (by enrollment, without the withheld codec encoder) is built the same way here.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .acoustic import CODE_OFFSET, EMPTY_AUDIO, END_AUDIO

FRAMES_PER_SECOND = 12.5


def voice_rows_for_seconds(seconds: float, frame_rate: float = FRAMES_PER_SECOND) -> int:
    """Rows of the voice made from a clip of ``seconds``: ceil(seconds × 12.5) frames + the END row."""
    return math.ceil(seconds * frame_rate) + 1


def end_frame_codes(n_codebooks: int) -> np.ndarray:
    """The END frame of a *voice* as the official encode path builds it: semantic END (1), every
    acoustic code EMPTY (0). Not the ``[1, 2, 2, …]`` frame the model emits when it stops."""
    codes = np.full((n_codebooks,), EMPTY_AUDIO, np.int32)
    codes[0] = END_AUDIO
    return codes


def codes_to_voice(model, codes) -> np.ndarray:
    """Voice rows (T + 1, dim) float32 from codes (T, 37) carrying the +2 offset.

    Row t is Σ_k table[offset_k + codes[t, k]], exactly the backbone's audio-code embedding
    (``Model.audio_code_embeddings``); the last row is the END frame's (``end_frame_codes``).

    Raises:
        ValueError: codes of the wrong shape, or a code outside its codebook (specials excluded).
    """
    codes = np.asarray(codes)
    n = model.config.n_codebooks
    if codes.ndim != 2 or codes.shape[1] != n or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers of shape (frames, {n}), got {codes.dtype} {codes.shape}")
    sizes = np.array(model.config.codebook_sizes)
    bad = np.argwhere((codes < CODE_OFFSET) | (codes >= sizes))
    if len(bad):
        t, k = bad[0]
        raise ValueError(
            f"code {codes[t, k]} at frame {t}, codebook {k} is outside {CODE_OFFSET}..{sizes[k] - 1} "
            "(codes carry the +2 offset; specials are not frames)"
        )
    frames = np.concatenate([codes.astype(np.int32), end_frame_codes(n)[None]], axis=0)
    rows = model.audio_code_embeddings(mx.array(frames))
    return np.array(rows.astype(mx.float32))
