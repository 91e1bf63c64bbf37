"""Prompt → backbone KV cache: chunked prefill, and the voice-prefix cache built on it.

``prefill`` runs a prompt through the backbone a bounded number of positions per call (mlx-lm's
``prefill_step_size`` pattern), so a long prompt costs time and memory in proportion to its
length, and a cancel flag is honoured between calls. ``generate_step``, the batched generation
and the voice-prefix cache all prefill with it; ``ChunkedPrefill`` is the same work one chunk per
call, for a scheduler that interleaves a new request's prefill with the running rows' frames.

Every prompt begins ``[BOS] [BEGIN_AUDIO] [AUDIO]×N`` with the N voice rows in the [AUDIO]
slots (spec §4.1), identical for every request with the same voice. That prefix is 67–218
positions of the ~250 a short request prefills, so its backbone KV state is computed once per
voice, kept (at most ``max_voices``, least recently used dropped first), and each request
prefills only its text on top of a copy.
"""

from __future__ import annotations

from collections import OrderedDict

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from .options import DEFAULT_PREFILL_STEP

DEFAULT_MAX_VOICES = 8  # about 23 MB each at the real size in bfloat16


def cancelled(cancel) -> bool:
    """Whether a cancel flag (anything with ``is_set()``, e.g. ``threading.Event``; None: never) is set."""
    return cancel is not None and cancel.is_set()


class ChunkedPrefill:
    """A prefill run one chunk at a time: ``advance()`` runs the next ``step_size`` positions.

    ``prefill`` drains it at once; a scheduler (the server's continuous batching) calls
    ``advance`` between decode steps of running rows, so a long new prompt stalls them for one
    chunk at a time, not for its whole length. Between chunks the cache is evaluated and MLX's
    buffer cache cleared (as mlx-lm's ``generate_step`` does), so each chunk's graph and
    temporaries are freed before the next.

    Attributes:
        cache: the backbone KV cache being filled (per-layer ``KVCache``).
        hidden: once ``done``, the last position's final-normed hidden state (B, dim), not yet
            evaluated; None before.
    """

    def __init__(self, model, embeddings: mx.array, cache: list, step_size: int = DEFAULT_PREFILL_STEP):
        if step_size < 1:
            raise ValueError(f"prefill_step_size must be at least 1, got {step_size}")
        self._model = model
        self._batch = embeddings if embeddings.ndim == 3 else embeddings[None]
        if self._batch.shape[1] < 1:
            raise ValueError("nothing to prefill: the prompt embeddings are empty")
        self._step = step_size
        self._start = 0
        self.cache = cache
        self.hidden: mx.array | None = None

    @property
    def done(self) -> bool:
        return self.hidden is not None

    @property
    def remaining(self) -> int:
        """Prompt positions not yet in the cache."""
        return self._batch.shape[1] - self._start

    def advance(self) -> bool:
        """Run the next chunk; True once the whole prompt is in the cache (``hidden`` is set)."""
        if self.done:
            return True
        end = min(self._batch.shape[1], self._start + self._step)
        hidden = self._model(self._batch[:, self._start : end], self.cache)
        self._start = end
        if self.remaining == 0:
            self.hidden = hidden[:, -1]
            return True
        mx.eval([c.state for c in self.cache])
        mx.clear_cache()
        return False


def prefill(model, embeddings: mx.array, cache: list, step_size: int = DEFAULT_PREFILL_STEP,
            cancel=None) -> mx.array | None:
    """Run prompt embeddings (L, dim), or a batch (B, L, dim), through the backbone into ``cache``,
    ``step_size`` positions at a time (``ChunkedPrefill`` drained).

    Each call attends from at most ``step_size`` new positions to the cache, so attention scores
    are step × positions-so-far rather than L × L. ``cancel`` is checked before every call.

    Returns:
        The last position's final-normed hidden state (B, dim) (B = 1 for unbatched input), not
        yet evaluated; None if ``cancel`` was set (the cache then holds the chunks done so far).
    """
    run = ChunkedPrefill(model, embeddings, cache, step_size)
    while True:
        if cancelled(cancel):
            return None
        if run.advance():
            return run.hidden


def voice_prefix_length(ids: list[int], audio_id: int) -> int:
    """Positions up to and including the last [AUDIO] slot (0 when there is none)."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == audio_id:
            return i + 1
    return 0


class VoicePrefixCache:
    """Backbone KV state of each voice's prompt prefix, bounded to ``max_voices`` entries."""

    def __init__(self, max_voices: int = DEFAULT_MAX_VOICES):
        if max_voices < 0:
            raise ValueError(f"max_voices must be 0 or more, got {max_voices}")
        self.max_voices = max_voices
        self._entries: OrderedDict[tuple, list[tuple[mx.array, mx.array]]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def forget(self, voice: str) -> None:
        """Drop the entries of ``voice`` (its rows changed, e.g. ``Model.add_voice``)."""
        for key in [k for k in self._entries if k[0] == voice]:
            del self._entries[key]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for entry in self._entries.values() for k, v in entry)

    def prefill(self, model, voice: str, ids: list[int], embeddings: mx.array, *,
                step_size: int = DEFAULT_PREFILL_STEP, cancel=None) -> tuple[list[KVCache], int]:
        """A fresh KV cache holding the voice prefix of ``ids``, and that prefix's length.

        ``embeddings`` are the prompt's (L, dim) input embeddings with ``voice``'s rows in
        place; the caller prefills ``embeddings[length:]`` on top of the returned cache.
        ``voice`` is the voice's cache key (``SelectedVoice.key``: the name of a model voice, a
        digest of the rows of a custom one); entries are keyed by it and the prefix ids, and
        ``Model.set_voices`` / ``add_voice`` drop them.
        A new prefix is prefilled in chunks of ``step_size`` (see ``prefill``); if ``cancel``
        is set meanwhile nothing is stored and an empty cache (length 0) is returned.
        """
        n = voice_prefix_length(ids, model.config.audio_token_id)
        if n == 0 or self.max_voices == 0:
            return model.make_cache(), 0
        key = (voice, tuple(ids[:n]))
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            cache = model.make_cache()
            if prefill(model, embeddings[:n], cache, step_size, cancel) is None:
                return model.make_cache(), 0
            entry = [(c.keys[..., :n, :], c.values[..., :n, :]) for c in cache]
            mx.eval(entry)
            self._entries[key] = entry
            while len(self._entries) > self.max_voices:
                self._entries.popitem(last=False)
        else:
            self.hits += 1
            self._entries.move_to_end(key)
        fresh = []
        for k, v in entry:
            c = KVCache()
            # KVCache grows by concatenation past its current length, so the shared arrays
            # are never written to.
            c.state = (k, v, n)
            fresh.append(c)
        return fresh, n
