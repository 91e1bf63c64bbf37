"""Many utterances through one decode loop: ``batch_generate`` and ``stream_batch_generate``.

On Apple Silicon a decode step is bound by reading the weights, so B rows through one step cost
little more than one. The pieces, each usable on its own by a scheduler (the server's continuous
batching builds on them):

- ``prepare_row``: one utterance checked and planned (voice, prompt ids, frame cap, seed or
  noise), no MLX work; every row of a batch is checked before any is generated.
- ``start_prefill``: its backbone KV state, from the voice-prefix cache plus a ``ChunkedPrefill``
  of the rest, which a scheduler can advance one chunk between two decode steps.
- ``frame_decoder.FrameDecoder``: the decode loop (rows in, one frame per row per step, rows out).
- ``RowStream``: a row's frames → audio chunks (``GenerationResponse``), with its own codec
  streaming state; ``respond_all`` decodes the due chunks of several rows in one codec call
  when their streaming states line up (same chunk length and history), else one by one.
- ``stream_rows``: the driver joining them; rows join when a slot frees (``batch_size``).

A continuous-batching scheduler (requests join and leave while others speak) is a loop over
the same pieces::

    decoder = FrameDecoder(model)
    # a request arrives: row = prepare_row(...); run = start_prefill(model, row, cancel=...)
    # each iteration: run.advance() one chunk of the oldest pending prefill; once it returns
    #   True and len(decoder) < max_batch: decoder.add(key, run.cache, run.hidden,
    #   frame_cap=row.frame_cap, seed=row.seed, noise=row.noise, cfg_alpha=row.cfg_alpha,
    #   flow_steps=row.flow_steps); streams[key] = RowStream(model, row, request_start)
    # a client leaves: decoder.remove(key)
    # frames = decoder.step(): push each frame's codes to its stream; the due ones (a full
    #   chunk, or finish_reason set) go through respond_all(...) to their clients

(for long text, one row per piece and ``longform.PieceJoiner`` per request for the crossfades).

``stream_generate`` is ``stream_rows`` with one row, so a single utterance and a batch take the
same path, and batching never changes what a row says: per row the noise is its own seed's key
splits, and the merged KV cache, the batched flow solve and the batched codec give every row the
same codes and samples as its solo run (bit for bit on MLX's CPU backend; tests/test_batch.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .codec import CodecCache
from .codec_layers import ConvState, KVWindow
from .generation import (
    DEFAULT_CFG_ALPHA,
    DEFAULT_CHUNK_FRAMES,
    DEFAULT_FIRST_CHUNK_FRAMES,
    DEFAULT_FLOW_STEPS,
    DEFAULT_PREFILL_STEP,
    DEFAULT_VOICE,
    GenerationResponse,
    GenerationResult,
    _check_request,
    collect,
)
from .frame_decoder import FrameDecoder, check_noise
from .model import Model
from .options import check_int
from .prompt_cache import ChunkedPrefill, cancelled
from .voice_file import Voice
from .voice_select import SelectedVoice, select_voice

VoiceLike = str | os.PathLike | Voice | SelectedVoice


@dataclass
class PreparedRow:
    """One utterance, checked: what ``start_prefill`` and ``FrameDecoder.add`` need.

    Attributes:
        text: what to say.
        voice: the resolved voice.
        ids: the prompt token ids (voice slots included).
        frame_cap: the most frames it may take (``max_frames`` or the runaway cap; with explicit
            noise and no ``max_frames``, at most the noise rows).
        seed, noise: its noise source (see ``generate_step``).
        cfg_alpha, flow_steps: its solver settings.
        first_chunk_frames, chunk_frames: its chunking (see ``stream_generate``).
    """

    text: str
    voice: SelectedVoice
    ids: list[int]
    frame_cap: int
    seed: int | None = None
    noise: mx.array | None = None
    cfg_alpha: float = DEFAULT_CFG_ALPHA
    flow_steps: int = DEFAULT_FLOW_STEPS
    first_chunk_frames: int = DEFAULT_FIRST_CHUNK_FRAMES
    chunk_frames: int = DEFAULT_CHUNK_FRAMES


def prepare_row(model: Model, text: str, voice: VoiceLike = DEFAULT_VOICE, *, seed: int | None = None,
                noise: mx.array | None = None, max_frames: int | None = None,
                cfg_alpha: float = DEFAULT_CFG_ALPHA, flow_steps: int = DEFAULT_FLOW_STEPS,
                first_chunk_frames: int = DEFAULT_FIRST_CHUNK_FRAMES, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
                prefill_step_size: int = DEFAULT_PREFILL_STEP) -> PreparedRow:
    """Check one utterance and plan it (``stream_generate``'s arguments); no backbone work.

    Raises:
        ValueError: naming the option, text or voice that is refused (as ``stream_generate``).
    """
    voice = select_voice(model, voice)  # unknown voice → ValueError listing the valid ones
    ids, limit = _check_request(model, text, voice, max_frames=max_frames, cfg_alpha=cfg_alpha,
                                flow_steps=flow_steps, seed=seed, first_chunk_frames=first_chunk_frames,
                                chunk_frames=chunk_frames, prefill_step_size=prefill_step_size)
    if noise is not None and max_frames is None and noise.ndim == 2:
        limit = min(limit, noise.shape[0])  # no frame can be made past the given noise
    check_noise(noise, limit, model.config.acoustic.n_acoustic_codebook)
    return PreparedRow(text, voice, ids, limit, seed, noise, cfg_alpha, flow_steps, first_chunk_frames, chunk_frames)


def start_prefill(model: Model, row: PreparedRow, *, use_voice_cache: bool = True,
                  prefill_step_size: int = DEFAULT_PREFILL_STEP, cancel=None) -> ChunkedPrefill:
    """The row's prefill, ready to ``advance``: its voice prefix from ``model.voice_cache``
    (computed on the voice's first use; ``cancel`` is honoured there), the rest chunked."""
    embeddings = model.prompt_embeddings(mx.array(row.ids), row.voice.rows)
    if use_voice_cache:
        cache, done = model.voice_cache.prefill(model, row.voice.key, row.ids, embeddings,
                                                step_size=prefill_step_size, cancel=cancel)
    else:
        cache, done = model.make_cache(), 0
    return ChunkedPrefill(model, embeddings[done:], cache, prefill_step_size)


def _codec_arrays(cache: CodecCache) -> list[mx.array | None]:
    """Every streaming-state array of a codec cache in a fixed order (None where still empty)."""
    out = []
    for state in [*cache.blocks, cache.output]:
        for item in state if isinstance(state, list) else [state]:
            if isinstance(item, KVWindow):
                out += [item.keys, item.values]
            elif isinstance(item, ConvState):
                out.append(item.tail)
    return out


def _set_codec_arrays(cache: CodecCache, arrays: list[mx.array | None]) -> None:
    it = iter(arrays)
    for state in [*cache.blocks, cache.output]:
        for item in state if isinstance(state, list) else [state]:
            if isinstance(item, KVWindow):
                item.keys, item.values = next(it), next(it)
            elif isinstance(item, ConvState):
                item.tail = next(it)


class RowStream:
    """One row's output: frames in (``push``), audio chunks out (``respond``), its own codec state.

    The first chunk has ``first_chunk_frames`` frames, later ones ``chunk_frames``; the last one
    (``finish_reason`` set) whatever is left, possibly none. The codec keeps its streaming state
    between chunks, so the chunks concatenate to the one-shot decode of all frames.
    """

    def __init__(self, model: Model, row: PreparedRow, start: float):
        self.model = model
        self.frame_cap = row.frame_cap
        self.first_chunk_frames, self.chunk_frames = row.first_chunk_frames, row.chunk_frames
        self.start = start
        self.codec_cache = model.audio_tokenizer.make_cache()
        self.frames = 0
        self.pending: list[mx.array] = []

    def push(self, codes: mx.array) -> None:
        self.pending.append(codes)
        self.frames += 1

    @property
    def due(self) -> bool:
        """Whether the pending frames make a full chunk."""
        first = self.frames == len(self.pending)  # nothing sent yet
        return len(self.pending) >= (self.first_chunk_frames if first else self.chunk_frames)

    def _signature(self) -> tuple:
        """What must match for rows to share one codec call: chunk length and state shapes."""
        return (len(self.pending), *(None if a is None else a.shape for a in _codec_arrays(self.codec_cache)))

    def respond(self, finish_reason: str | None, audio: np.ndarray | None = None) -> GenerationResponse:
        """The response for the pending frames (decoded here unless ``audio`` is given)."""
        config = self.model.config
        if self.pending:
            codes = mx.stack(self.pending)
            if audio is None:
                wave = self.model.audio_tokenizer.decode(codes[None], cache=self.codec_cache)[0]
                mx.eval(wave, self.codec_cache.state)  # keep the streaming state from growing a graph
                audio = np.array(wave)
            codes = np.array(codes)
        else:
            codes = np.zeros((0, config.n_codebooks), np.int32)
            audio = np.zeros((0,), np.float32)
        self.pending = []
        elapsed = time.perf_counter() - self.start
        seconds = self.frames * config.samples_per_frame / config.sample_rate
        return GenerationResponse(
            audio=audio, sample_rate=config.sample_rate, codes=codes, frames=self.frames,
            audio_seconds=seconds, elapsed=elapsed, real_time_factor=seconds / elapsed if elapsed > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish_reason, frame_cap=self.frame_cap,
        )


def respond_all(streams: Sequence[RowStream], finish_reasons: Sequence[str | None]) -> list[GenerationResponse]:
    """``respond`` for several rows, decoding rows whose chunks line up in one batched codec call.

    Rows with the same number of pending frames and the same streaming-state shapes (after its
    first two frames every row's conv tails and attention windows are full) are stacked along
    the batch axis: the codec is causal per row, so each row gets the samples it would alone.
    """
    audio: list[np.ndarray | None] = [None] * len(streams)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(streams):
        if len(s.pending):
            groups.setdefault(s._signature(), []).append(i)
    codec = streams[0].model.audio_tokenizer if streams else None
    for members in groups.values():
        if len(members) < 2:
            continue
        rows = [streams[i] for i in members]
        shared = codec.make_cache()
        states = [_codec_arrays(s.codec_cache) for s in rows]
        _set_codec_arrays(shared, [None if a[0] is None else mx.concatenate(a) for a in zip(*states)])
        codes = mx.stack([mx.stack(s.pending) for s in rows])  # (B, n, 37)
        wave = codec.decode(codes, cache=shared)
        mx.eval(wave, shared.state)
        after = _codec_arrays(shared)
        for j, (i, s) in enumerate(zip(members, rows)):
            _set_codec_arrays(s.codec_cache, [None if a is None else a[j : j + 1] for a in after])
            s.codec_cache.frames += codes.shape[1]
            audio[i] = np.array(wave[j])
    return [s.respond(f, a) for s, f, a in zip(streams, finish_reasons, audio)]


def stream_rows(model: Model, rows: Sequence[PreparedRow], *, batch_size: int | None = None,
                use_voice_cache: bool = True, prefill_step_size: int = DEFAULT_PREFILL_STEP,
                cancel=None, start: float | None = None) -> Iterator[tuple[int, GenerationResponse]]:
    """Generate prepared rows together; yields ``(row index, response)`` as chunks are ready.

    At most ``batch_size`` rows (None: all) decode at once; when one finishes, the next row in
    order is prefilled (on its own, through the voice-prefix cache) and joins at the next frame.
    Within a frame, responses come in batch order. ``cancel`` (anything with ``is_set()``) is
    checked before every prefill chunk and every frame; once set the generator returns with no
    further responses.
    """
    start = time.perf_counter() if start is None else start
    if batch_size is not None:
        check_int(batch_size, "batch_size", 1)
    limit = len(rows) if batch_size is None else batch_size
    decoder = FrameDecoder(model)
    streams: dict[int, RowStream] = {}
    waiting = iter(range(len(rows)))
    exhausted = False
    while True:
        while not exhausted and len(decoder) < limit:
            index = next(waiting, None)
            if index is None:
                exhausted = True
                break
            row = rows[index]
            run = start_prefill(model, row, use_voice_cache=use_voice_cache,
                                prefill_step_size=prefill_step_size, cancel=cancel)
            while not cancelled(cancel) and not run.advance():
                pass
            if cancelled(cancel):
                return
            decoder.add(index, run.cache, run.hidden, frame_cap=row.frame_cap, seed=row.seed, noise=row.noise,
                        cfg_alpha=row.cfg_alpha, flow_steps=row.flow_steps)
            streams[index] = RowStream(model, row, start)
        if not len(decoder) or cancelled(cancel):
            return
        due, reasons = [], []
        for frame in decoder.step():
            stream = streams[frame.key]
            if frame.codes is not None:
                stream.push(frame.codes)
            if frame.finish_reason is not None or stream.due:
                due.append(frame.key)
                reasons.append(frame.finish_reason)
        if cancelled(cancel):
            return
        if not due:
            continue
        for index, response in zip(due, respond_all([streams[i] for i in due], reasons)):
            if cancelled(cancel):
                return
            if response.finish_reason is not None:
                del streams[index]
            yield index, response


def per_row(value, n: int, name: str) -> list:
    """``value`` for each of n rows: a list or tuple of n values, else the one value repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} texts; give one value or one per text")
        return list(value)
    return [value] * n


def prepare_rows(model: Model, texts: Sequence[str], voices=DEFAULT_VOICE, *, seeds=None, noise=None,
                 max_frames=None, cfg_alpha=DEFAULT_CFG_ALPHA, flow_steps=DEFAULT_FLOW_STEPS,
                 **kwargs) -> list[PreparedRow]:
    """``prepare_row`` for every text; ``voices``, ``seeds``, ``noise``, ``max_frames``,
    ``cfg_alpha`` and ``flow_steps`` are each one value for all rows or a list with one per row.
    Errors name the row: "texts[2]: …"."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    n = len(texts)
    values = zip(texts, per_row(voices, n, "voices"), per_row(seeds, n, "seeds"),
                  per_row(noise, n, "noise"), per_row(max_frames, n, "max_frames"),
                  per_row(cfg_alpha, n, "cfg_alpha"), per_row(flow_steps, n, "flow_steps"))
    rows = []
    for i, (text, voice, seed, row_noise, frames, alpha, steps) in enumerate(values):
        try:
            rows.append(prepare_row(model, text, voice, seed=seed, noise=row_noise, max_frames=frames,
                                    cfg_alpha=alpha, flow_steps=steps, **kwargs))
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise type(e)(f"texts[{i}]: {e}") from None
    return rows


def stream_batch_generate(
    model: Model,
    texts: Sequence[str],
    voices: VoiceLike | Sequence[VoiceLike] = DEFAULT_VOICE,
    *,
    seeds: int | None | Sequence[int | None] = None,
    noise: mx.array | None | Sequence[mx.array | None] = None,
    max_frames: int | None | Sequence[int | None] = None,
    batch_size: int | None = None,
    cfg_alpha: float | Sequence[float] = DEFAULT_CFG_ALPHA,
    flow_steps: int | Sequence[int] = DEFAULT_FLOW_STEPS,
    first_chunk_frames: int = DEFAULT_FIRST_CHUNK_FRAMES,
    chunk_frames: int = DEFAULT_CHUNK_FRAMES,
    use_voice_cache: bool = True,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    cancel=None,
) -> Iterator[tuple[int, GenerationResponse]]:
    """Speak several texts at once, streamed: yields ``(index, GenerationResponse)`` per chunk.

    Each text is an utterance of its own, exactly as ``stream_generate`` would speak it alone
    with the same voice, seed (or noise) and max_frames; its chunks come in order and its last
    one has ``finish_reason`` set ("stop" at its END frame, "length" at its frame cap). Chunks
    of different texts interleave frame by frame.

    Args:
        model: a model from ``mlx_speech.load``.
        texts: what to say, one utterance per text.
        voices, seeds, noise, max_frames, cfg_alpha, flow_steps: each one value for every text or
            a list with one per text (see ``stream_generate``; ``noise`` entries are
            (≥ frames, 36) arrays or None). Rows with different ``flow_steps`` still share the
            backbone step, with one flow solve per step count.
        batch_size: the most texts decoded at once (None: all); when one finishes, the next
            joins at the next frame.
        first_chunk_frames, chunk_frames, use_voice_cache, prefill_step_size: as
            ``stream_generate``, for every text.
        cancel: an object with ``is_set()``, checked between prefill chunks and frames; once set
            the generator returns with no further responses.

    Every text and option is checked before any work, errors naming the text ("texts[2]: …").
    """
    start = time.perf_counter()
    if batch_size is not None:
        check_int(batch_size, "batch_size", 1)
    rows = prepare_rows(model, texts, voices, seeds=seeds, noise=noise, max_frames=max_frames,
                        cfg_alpha=cfg_alpha, flow_steps=flow_steps, first_chunk_frames=first_chunk_frames,
                        chunk_frames=chunk_frames, prefill_step_size=prefill_step_size)
    yield from stream_rows(model, rows, batch_size=batch_size, use_voice_cache=use_voice_cache,
                           prefill_step_size=prefill_step_size, cancel=cancel, start=start)


def batch_generate(model: Model, texts: Sequence[str], voices: VoiceLike | Sequence[VoiceLike] = DEFAULT_VOICE,
                   **kwargs) -> list[GenerationResult]:
    """Speak several texts at once; one ``GenerationResult`` per text, in order.

    Takes the keyword arguments of ``stream_batch_generate``; each result equals ``generate``
    of that text alone with the same voice, seed (or noise) and max_frames. If ``cancel`` is
    set before every text is finished, a RuntimeError says which were not.
    """
    chunks: dict[int, list[GenerationResponse]] = {i: [] for i in range(len(texts))}
    for index, response in stream_batch_generate(model, texts, voices, **kwargs):
        chunks[index].append(response)
    unfinished = [i for i, c in chunks.items() if not c or c[-1].finish_reason is None]
    if unfinished:
        raise RuntimeError(f"cancelled before texts {unfinished} were finished")
    return [collect(iter(chunks[i])) for i in range(len(texts))]


__all__ = [
    "PreparedRow", "RowStream", "batch_generate", "per_row", "prepare_row", "prepare_rows", "respond_all",
    "start_prefill", "stream_batch_generate", "stream_rows",
]
