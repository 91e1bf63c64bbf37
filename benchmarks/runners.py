"""The stages of one request, for each implementation, behind one interface.

A runner exposes the per-frame work of a TTS request as separate calls that return lazy arrays,
so the benchmark can evaluate and time each one on its own:

    prefill(ids) → h (1, dim)          prompt embeddings + backbone over the prompt (KV cache kept)
    prefill_voice_miss(ids), prefill_cached(ids) → h
                                       optional, where there is a voice-prefix cache: a voice's
                                       first request (fills it) and a later one (hits it)
    flow(h, steps) → codes (1, 37)     semantic head + flow-matching solve + FSQ, for one frame
    step(codes) → h (1, dim)           code embeddings + one backbone decode step
    codec(codes (k, 37), state) → audio for k more frames, continuing ``state``
    mid_utterance(state, codes)        make ``state`` look like the middle of an utterance (untimed)
    e2e(ids, frames, first, chunk)     the implementation's own streaming API; yields frames done

``OursRunner`` drives mlx_speech; ``MlxAudioRunner`` (mlx_audio_runner.py) drives mlx-audio.
"""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx

from mlx_speech.generation import stream_generate
from mlx_speech.model import Model

VOICE = "bench"


class _FixedPrompt:
    """Stands in for the tekken tokenizer: every request gets the benchmark's prompt ids."""

    def __init__(self, ids: list[int]):
        self.ids = list(ids)

    def encode_speech(self, text: str, voice: str) -> list[int]:
        return list(self.ids)


class OursRunner:
    name = "mlx_speech"

    def __init__(self, model: Model, voice: mx.array, cfg_alpha: float):
        self.model = model
        self.voice = voice
        self.cfg_alpha = cfg_alpha
        self.cache = None
        model.set_voices({VOICE: voice})

    def _embeddings(self, ids: list[int]) -> mx.array:
        rows = sum(i == self.model.config.audio_token_id for i in ids)
        return self.model.prompt_embeddings(mx.array(ids), self.voice[:rows])

    def prefill(self, ids: list[int]) -> mx.array:
        """The whole prompt in one backbone call, no voice cache (``use_voice_cache=False``)."""
        self.cache = self.model.make_cache()
        return self.model(self._embeddings(ids)[None], self.cache)[:, -1]

    def prefill_voice_miss(self, ids: list[int]) -> mx.array:
        """A voice's first request: stream_generate's path when the voice-prefix cache misses."""
        self.model.voice_cache.clear()
        return self.prefill_cached(ids)

    def prefill_cached(self, ids: list[int]) -> mx.array:
        """A voice's later requests: the voice prefix comes from the cache, the text is prefilled."""
        embeddings = self._embeddings(ids)
        self.cache, done = self.model.voice_cache.prefill(self.model, VOICE, ids, embeddings)
        return self.model(embeddings[None, done:], self.cache)[:, -1]

    def flow(self, h: mx.array, steps: int) -> mx.array:
        # generate_step draws x0 per frame too; the draw is part of the frame's cost
        x0 = mx.random.normal((h.shape[0], self.model.config.acoustic.n_acoustic_codebook))
        return self.model.acoustic_transformer(h, x0, steps, self.cfg_alpha)

    def step(self, codes: mx.array) -> mx.array:
        return self.model(self.model.audio_code_embeddings(codes)[:, None], self.cache)[:, -1]

    def new_codec_state(self):
        return self.model.audio_tokenizer.make_cache()

    def codec(self, codes: mx.array, state) -> list[mx.array]:
        audio = self.model.audio_tokenizer.decode(codes[None], cache=state)[0]
        return [audio, *state.state]  # evaluate the streaming state too, as stream_generate does

    def mid_utterance(self, state, codes: mx.array) -> None:
        """Decode (untimed) until the state holds 2 frames: from then on every conv tail and
        attention window is full (the widest window, 16 positions, is 2 frames at 8×)."""
        if state.frames < 2:
            mx.eval(self.codec(codes[: 2 - state.frames], state))

    def e2e(self, ids: list[int], frames: int, first_chunk: int, chunk: int, steps: int) -> Iterator[int]:
        self.model.tokenizer = _FixedPrompt(ids)
        for response in stream_generate(
            self.model, "benchmark", VOICE, seed=0, max_frames=frames, cfg_alpha=self.cfg_alpha,
            flow_steps=steps, first_chunk_frames=first_chunk, chunk_frames=chunk,
        ):
            yield response.frames
