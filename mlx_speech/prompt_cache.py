"""Voice-prefix KV cache: prefill the voice once, start every request from a copy.

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

DEFAULT_MAX_VOICES = 8  # about 23 MB each at the real size in bfloat16


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

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for entry in self._entries.values() for k, v in entry)

    def prefill(self, model, voice: str, ids: list[int], embeddings: mx.array) -> tuple[list[KVCache], int]:
        """A fresh KV cache holding the voice prefix of ``ids``, and that prefix's length.

        ``embeddings`` are the prompt's (L, dim) input embeddings with ``voice``'s rows in
        place; the caller prefills ``embeddings[length:]`` on top of the returned cache.
        Entries are keyed by voice name and prefix ids; ``Model.set_voices`` clears them.
        """
        n = voice_prefix_length(ids, model.config.audio_token_id)
        if n == 0 or self.max_voices == 0:
            return model.make_cache(), 0
        key = (voice, tuple(ids[:n]))
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            cache = model.make_cache()
            model(embeddings[None, :n], cache)
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
