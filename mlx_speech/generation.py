"""Text → speech: one utterance, streamed or in one go.

``frame_decoder.FrameDecoder`` is the decode loop, for one utterance or many at once
(``batch_generation`` drives it for several texts). Generators all the way up: ``generate_step`` yields one frame of codes at a time, ``stream_generate`` turns frames
into audio chunks (``GenerationResponse``), ``generate`` drains it into one
``GenerationResult``. The command line (``python -m mlx_speech.generate``,
in generate.py) is a thin layer over these; the two modules have different names so that the
package attribute ``mlx_speech.generate`` is always this module's function.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .model import Model
from .voice_file import Voice
from .voice_select import SelectedVoice
from .options import (  # noqa: F401  (re-exported: the defaults' historical home)
    DEFAULT_CFG_ALPHA,
    DEFAULT_CHUNK_FRAMES,
    DEFAULT_FIRST_CHUNK_FRAMES,
    DEFAULT_FLOW_STEPS,
    DEFAULT_MAX_CHARS,
    DEFAULT_MAX_FRAMES,
    DEFAULT_PREFILL_STEP,
    DEFAULT_VOICE,
    check_int,
    check_options,
    check_text,
    frame_cap,
)
from .frame_decoder import FrameDecoder, check_noise
from .prompt_cache import cancelled, prefill


@dataclass
class GenerationResponse:
    """One chunk of streamed speech.

    Attributes:
        audio: float32 mono samples of this chunk (may be empty on the final response).
        sample_rate: samples per second (24000).
        codes: (n, 37) int codes of this chunk's frames, with the +2 offset.
        frames: frames generated so far (80 ms each).
        audio_seconds: seconds of audio generated so far.
        elapsed: wall seconds since the request started.
        real_time_factor: audio seconds per wall second so far (> 1 is faster than real time).
        peak_memory: peak memory so far, in GB.
        finish_reason: None while generating; on the last response "stop" (the model ended
            the utterance) or "length" (stopped at ``frame_cap`` frames).
        frame_cap: the most frames this request may take: ``max_frames`` when given, else
            ``options.frame_cap`` of the text's token count (the runaway cap).
    """

    audio: np.ndarray
    sample_rate: int
    codes: np.ndarray
    frames: int
    audio_seconds: float
    elapsed: float
    real_time_factor: float
    peak_memory: float
    finish_reason: str | None = None
    frame_cap: int | None = None


@dataclass
class GenerationResult:
    """A whole utterance: ``codes`` (frames, 37) with the +2 offset (END frame excluded),
    ``audio`` float32 with 1920 samples per frame, and the run's figures; ``finish_reason`` is
    "length" when it stopped at ``frame_cap`` frames (see ``GenerationResponse``)."""

    codes: np.ndarray
    audio: np.ndarray
    sample_rate: int
    finish_reason: str
    frames: int
    audio_seconds: float
    elapsed: float
    real_time_factor: float
    peak_memory: float
    frame_cap: int | None = None


def generate_step(
    model: Model,
    prompt_embeddings: mx.array,
    *,
    cache: list | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    seed: int | None = None,
    noise: mx.array | None = None,
    cfg_alpha: float = DEFAULT_CFG_ALPHA,
    flow_steps: int = DEFAULT_FLOW_STEPS,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    cancel=None,
) -> Iterator[mx.array]:
    """Yield the codes (37,) of each frame until [END_AUDIO], ``max_frames`` or ``cancel``.

    A ``FrameDecoder`` with one row.

    Args:
        model: the loaded model.
        prompt_embeddings: (L, dim) prompt embeddings with the voice rows in place.
        cache: a backbone KV cache already holding the first ``cache[0].offset`` prompt
            positions (a voice prefix); only the rest is prefilled. None starts empty.
        max_frames: upper bound on frames (80 ms each).
        seed: seeds the flow-matching noise; each frame draws from its own split of the key.
        noise: optional (≥ max_frames, 36) array used as x₀ for each frame in order
            (replaces the seeded noise; for tests against reference outputs).
        cfg_alpha: classifier-free guidance strength (1.0 = conditional only).
        flow_steps: Euler steps of the flow-matching solve.
        prefill_step_size: prompt positions per backbone call while prefilling (``prefill``).
        cancel: an object with ``is_set()`` (e.g. ``threading.Event``), checked before every
            prefill chunk and every frame; once set the generator returns.

    Yields:
        mx.array (37,) int32 codes with the +2 offset. The [END_AUDIO] frame is not yielded.
    """
    check_options(cfg_alpha=cfg_alpha, flow_steps=flow_steps, max_frames=max_frames, seed=seed,
                  prefill_step_size=prefill_step_size)
    check_noise(noise, max_frames, model.config.acoustic.n_acoustic_codebook)
    if cache is None:
        cache = model.make_cache()
    done = cache[0].offset
    if done >= prompt_embeddings.shape[0]:
        raise ValueError(f"the cache already holds {done} positions; the prompt has {prompt_embeddings.shape[0]}")
    # Frame 0 comes straight from the prefill's last hidden state (no extra [AUDIO] step, T1).
    h = prefill(model, prompt_embeddings[done:], cache, prefill_step_size, cancel)
    if h is None:
        return
    decoder = FrameDecoder(model, cfg_alpha=cfg_alpha, flow_steps=flow_steps)
    decoder.add(0, cache, h, frame_cap=max_frames, seed=seed, noise=noise)
    while len(decoder) and not cancelled(cancel):
        (frame,) = decoder.step()
        if frame.codes is None:
            return
        yield frame.codes


def text_tokens(model: Model, ids: list[int]) -> int:
    """Tokens of the text itself in a speech prompt: those between [NEXT_AUDIO_TEXT] and
    [REPEAT_AUDIO_TEXT] (text never encodes to special ids), not the voice rows or specials."""
    tok = model.tokenizer
    start = ids.index(tok.next_audio_text_id) + 1
    end = len(ids) - 1 - ids[::-1].index(tok.repeat_audio_text_id)
    return end - start


def frame_limit(model: Model, ids: list[int], max_frames: int | None) -> int:
    """The frames a prompt may generate: ``max_frames`` if given, else the runaway cap
    ``options.frame_cap`` of its text's token count."""
    return max_frames if max_frames is not None else frame_cap(text_tokens(model, ids))


def check_fits(model: Model, prompt: int, limit: int, *, explicit: bool, what: str = "its prompt") -> None:
    """Refuse a prompt of ``prompt`` positions that, with ``limit`` frames, overflows the context
    (``explicit``: the limit is the caller's ``max_frames``, not the runaway cap)."""
    context = model.config.max_seq_len
    if prompt + limit > context:
        frames = f"max_frames is {limit}" if explicit else f"its frame cap is {limit}"
        raise ValueError(
            f"text too long: {what} is {prompt} tokens and {frames}, over the model's context of "
            f"{context} positions; shorten the text or lower max_frames"
        )


def _check_request(model: Model, text: str, voice: SelectedVoice, *, max_frames, cfg_alpha, flow_steps,
                   seed, first_chunk_frames, chunk_frames, prefill_step_size) -> tuple[list[int], int]:
    """Every option of a ``stream_generate`` request checked (ValueError naming it); the prompt
    ids and the frame limit."""
    check_text(text, None)
    check_options(cfg_alpha=cfg_alpha, flow_steps=flow_steps, max_frames=max_frames, seed=seed,
                  prefill_step_size=prefill_step_size)
    check_int(first_chunk_frames, "first_chunk_frames", 1)
    check_int(chunk_frames, "chunk_frames", 1)
    ids = model.tokenizer.encode_speech_prompt(text, voice.n_rows)  # the row count is the voice's own
    limit = frame_limit(model, ids, max_frames)
    check_fits(model, len(ids), limit, explicit=max_frames is not None)
    return ids, limit


def stream_generate(
    model: Model,
    text: str,
    voice: str | os.PathLike | Voice | SelectedVoice = DEFAULT_VOICE,
    *,
    seed: int | None = None,
    noise: mx.array | None = None,
    max_frames: int | None = None,
    cfg_alpha: float = DEFAULT_CFG_ALPHA,
    flow_steps: int = DEFAULT_FLOW_STEPS,
    first_chunk_frames: int = DEFAULT_FIRST_CHUNK_FRAMES,
    chunk_frames: int = DEFAULT_CHUNK_FRAMES,
    use_voice_cache: bool = True,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    cancel=None,
) -> Iterator[GenerationResponse]:
    """Speak ``text`` and yield audio chunks as soon as frames exist.

    Args:
        model: a model from ``mlx_speech.load``.
        text: what to say (no normalization is applied).
        voice: a voice name the model knows (``model.voices``), a voice file, a name in the user's
            voice folder, or a ``Voice`` (see ``voice_select``).
        seed, noise, cfg_alpha, flow_steps, prefill_step_size: see ``generate_step``; every
            option is checked (``options.check_options``) before any work, with a ValueError
            naming it.
        max_frames: the most frames (80 ms each) to generate; None (the default): the runaway
            cap ``options.frame_cap`` of the text's token count, which a normal reading never
            reaches (with ``noise``, at most its rows). Either way the limit is reported as
            ``frame_cap`` on every response, and stopping there as ``finish_reason="length"``.
        first_chunk_frames: frames in the first chunk (small, for a fast first sound).
        chunk_frames: frames in each later chunk.
        use_voice_cache: start from the voice's cached prompt-prefix KV state
            (``model.voice_cache``), computing it on the voice's first use.
        cancel: an object with ``is_set()`` (e.g. ``threading.Event``), checked between prefill
            chunks and between frames; once it is set the generator returns without further
            responses (no final one either).

    Yields:
        ``GenerationResponse`` per chunk; the last one has ``finish_reason`` set. The codec
        keeps its streaming state between chunks, so the concatenated chunks equal the
        one-shot decode of all frames.
    """
    # The batch module builds on this one's types and decoder: imported here, not at the top.
    from .batch_generation import prepare_row, stream_rows

    start = time.perf_counter()
    row = prepare_row(model, text, voice, seed=seed, noise=noise, max_frames=max_frames, cfg_alpha=cfg_alpha,
                      flow_steps=flow_steps, first_chunk_frames=first_chunk_frames, chunk_frames=chunk_frames,
                      prefill_step_size=prefill_step_size)
    for _, response in stream_rows(model, [row], use_voice_cache=use_voice_cache,
                                   prefill_step_size=prefill_step_size, cancel=cancel, start=start):
        yield response


def collect(responses: Iterator[GenerationResponse]) -> GenerationResult:
    """Drain streamed responses into one ``GenerationResult``."""
    codes, audio, last = [], [], None
    for last in responses:
        codes.append(last.codes)
        audio.append(last.audio)
    return GenerationResult(
        codes=np.concatenate(codes), audio=np.concatenate(audio), sample_rate=last.sample_rate,
        finish_reason=last.finish_reason, frames=last.frames, audio_seconds=last.audio_seconds,
        elapsed=last.elapsed, real_time_factor=last.real_time_factor, peak_memory=last.peak_memory,
        frame_cap=last.frame_cap,
    )


def generate(model: Model, text: str, voice: str | os.PathLike | Voice | SelectedVoice = DEFAULT_VOICE,
             **kwargs) -> GenerationResult:
    """Speak ``text`` in one go. Takes the keyword arguments of ``stream_generate``."""
    return collect(stream_generate(model, text, voice, **kwargs))
