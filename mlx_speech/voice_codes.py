"""Voices as codes: a voice's rows are sums of audio-code embeddings (spec §4.1, §4.5).

A preset ``voice_embedding/<name>.pt`` is, per 80 ms reference frame, the sum of the 37
audio-embedding rows of that frame's codec codes, followed by one END row — exactly what the
official ``encode_waveforms``/``encode_tokens`` builds from reference audio. So a voice made from
codes (by enrollment, without the withheld codec encoder) is built the same way here
(``codes_to_voice``), and a preset's codes can be read back from its rows (``voice_to_codes``:
a least-squares search, exact at the release's width) to hear or re-enroll its reference clip.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .acoustic import CODE_OFFSET, EMPTY_AUDIO, END_AUDIO
from .voice_file import MAX_VOICE_ROWS

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


# A voice's last row counts as the END row when it is this close to it (relative L2 distance).
# A bf16 preset is the END row rounded: ~0.5 % away at most; any other frame differs by ≳ 50 %.
END_ROW_TOLERANCE = 0.05
MAX_SWEEPS = 32


def voice_to_codes(model, rows, *, return_residual: bool = False, max_sweeps: int = MAX_SWEEPS):
    """Codes (T, 37) with the +2 offset whose summed embeddings best match a voice's rows.

    The inverse of ``codes_to_voice``: ``rows`` is (T + 1, dim), a preset or a saved voice, whose
    last row must be the END row (it is checked, then dropped). Each frame is decoded by least
    squares over its codes, ``min ‖row − Σ_k table[offset_k + c_k]‖²`` (``decode_code_sums``). At
    the release's width (3072) a sum of 37 rows is decodable and this recovers the codes exactly,
    also from a bf16-rounded preset; at a tiny width it finds a local minimum only, so judge the
    result by its residual.

    Args:
        model: a loaded ``Model`` (its ``audio_embeddings`` table and ``config.codebook_sizes``).
        rows: (T + 1, dim) floats, NumPy or MLX, the last the END row.
        return_residual: also return, per frame, ‖row − Σ‖ / ‖row‖ for the codes found (float32
            (T,)): ~0 for an exact sum, ~0.01 for a bf16-rounded one; much larger means the row is
            not a sum of code embeddings (or the search stopped in a local minimum).
        max_sweeps: bound on the coordinate-descent sweeps.

    Returns:
        int32 codes (T, 37), or ``(codes, residual)`` with ``return_residual``.

    Raises:
        ValueError: rows of the wrong shape, non-finite rows, or a last row that is not the END row.
    """
    table = np.array(model.audio_embeddings.weight.astype(mx.float32))
    sizes = list(model.config.codebook_sizes)
    rows = _checked_rows(rows, table.shape[1])
    end_row = table[_offsets(sizes) + end_frame_codes(len(sizes))].sum(axis=0)
    distance = float(np.linalg.norm(rows[-1] - end_row) / max(float(np.linalg.norm(end_row)), 1e-30))
    if not distance <= END_ROW_TOLERANCE:
        raise ValueError(
            f"the last voice row is not the END row (relative distance {distance:.3g}, at most "
            f"{END_ROW_TOLERANCE} expected): a voice's rows are its frames followed by the END row"
        )
    codes, residual = decode_code_sums(table, sizes, rows[:-1], max_sweeps=max_sweeps)
    return (codes, residual) if return_residual else codes


def _offsets(sizes) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes[:-1])]).astype(np.int64)


def _checked_rows(rows, dim: int) -> np.ndarray:
    rows = np.array(rows.astype(mx.float32)) if isinstance(rows, mx.array) else np.asarray(rows, np.float32)
    if rows.ndim != 2 or rows.shape[1] != dim or not 1 <= rows.shape[0] <= MAX_VOICE_ROWS:
        raise ValueError(
            f"voice rows must have shape (rows, {dim}) with 1 to {MAX_VOICE_ROWS} rows, got {rows.shape}"
        )
    if not np.isfinite(rows).all():
        raise ValueError("voice rows hold NaN or infinite values")
    return rows


def decode_code_sums(table: np.ndarray, codebook_sizes, rows: np.ndarray, *, init=None,
                     max_sweeps: int = MAX_SWEEPS) -> tuple[np.ndarray, np.ndarray]:
    """Codes (T, K) with the +2 offset minimising ‖rows[t] − Σ_k table[offset_k + c_k]‖², per frame.

    ``table`` (≥ Σ sizes, dim) holds the codebooks one after another, ``codebook_sizes[k]`` rows
    each, of which the first ``CODE_OFFSET`` (the specials) are never chosen. The start is matching
    pursuit (codebook by codebook, the code nearest to what is left of the row), or ``init``
    (T, K) codes; then coordinate descent re-chooses each codebook's code given the others until a
    sweep changes nothing (or ``max_sweeps``). Every step is vectorised over the frames.

    NumPy float32 rather than MLX: this is a one-off search whose cost is a few matmuls per sweep
    ((T, dim) × (dim, 8192) for the semantic codebook), which BLAS does at full speed on every
    platform, while MLX's CPU backend (Linux, and the test suite) runs that matmul ~60× slower
    (4.6 s vs 0.07 s for 218 frames here). float32 because bf16 scores would be rounded as
    coarsely as a bf16 preset itself.

    Returns:
        int32 codes (T, K) with the +2 offset, and float32 ‖row − Σ‖ / ‖row‖ per frame.
    """
    table = np.asarray(table, np.float32)
    rows = np.asarray(rows, np.float32)
    n_codebooks, frames = len(codebook_sizes), np.arange(rows.shape[0])
    # Candidate rows per codebook (specials excluded) and their squared norms, built once.
    blocks = [table[o + CODE_OFFSET : o + s] for o, s in zip(_offsets(codebook_sizes), codebook_sizes)]
    # Every frame takes exactly one row per codebook, so each codebook's mean row is a known part
    # of every row: searching in centred coordinates changes no assignment's residual, but keeps
    # the other codebooks' shared parts from misleading the matching-pursuit start.
    means = [b.mean(axis=0) for b in blocks]
    blocks = [b - m for b, m in zip(blocks, means)]
    norms = [np.einsum("jd,jd->j", b, b) for b in blocks]
    centred = rows - sum(means)

    def scores(k, target):
        # ‖target − b_j‖² = ‖target‖² − (2⟨target, b_j⟩ − ‖b_j‖²): maximise the bracket.
        return 2 * (target @ blocks[k].T) - norms[k]

    if init is None:
        codes = np.zeros((rows.shape[0], n_codebooks), np.int64)
        residual = centred.copy()
        for k, block in enumerate(blocks):
            codes[:, k] = scores(k, residual).argmax(axis=1)
            residual -= block[codes[:, k]]
    else:
        codes = np.array(init, np.int64) - CODE_OFFSET
        if codes.shape != (rows.shape[0], n_codebooks) or not (
            (codes >= 0) & (codes < np.array([len(b) for b in blocks]))
        ).all():
            raise ValueError(f"init must be valid codes of shape ({rows.shape[0]}, {n_codebooks})")

    def residual_of(codes):
        # Recomputed per sweep rather than carried along, so rounding does not accumulate.
        return centred - sum(block[codes[:, k]] for k, block in enumerate(blocks))

    for _ in range(max_sweeps):
        residual, changed = residual_of(codes), False
        for k, block in enumerate(blocks):
            target = residual + block[codes[:, k]]
            s = scores(k, target)
            j = s.argmax(axis=1)
            move = s[frames, j] > s[frames, codes[:, k]]  # strict gain only: ties cannot cycle
            if move.any():
                codes[move, k] = j[move]
                changed = True
            residual = target - block[codes[:, k]]
        if not changed:
            break

    residual = residual_of(codes)
    row_norms = np.maximum(np.linalg.norm(rows, axis=1), 1e-30)
    relative = (np.linalg.norm(residual, axis=1) / row_norms).astype(np.float32)
    return (codes + CODE_OFFSET).astype(np.int32), relative
