"""mlx-audio's Voxtral TTS (``mlx_audio.tts.models.voxtral_tts``) behind the runner interface.

Optional: ``pip install mlx-audio``. The model is built from the same params.json and loaded
through its own ``Model.sanitize`` from the same random release-named weights as ours. Each
stage calls the code its ``generate`` runs for that stage:

- prefill: ``_build_input_embeddings`` + the mlx-lm Llama backbone over the prompt;
- flow: ``acoustic_transformer.decode_one_frame`` (semantic head, noise, 7-step CFG Euler, FSQ);
- step: ``_codes_to_global_indices`` + ``audio_codebook_embeddings`` sum + one backbone step;
- codec: its streaming decode, which has no state: it re-decodes up to 16 earlier frames of
  context with each chunk and drops their samples (``generate(stream=True)``).
"""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx
import mlx.nn as nn

from mlx_speech.model import in_quant_recipe
from random_weights import random_release_weights
from runners import VOICE

CONTEXT_FRAMES = 16  # mlx-audio's streaming context, hard-coded in its generate()
SAMPLES_PER_FRAME = 1920


def mlx_audio_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlx-audio")
    except PackageNotFoundError:
        return None


def build_theirs(params: dict, our_config, dtype: mx.Dtype, quantization: dict | None, seed: int = 0):
    """mlx-audio's Model on the same random weights as ``build_ours`` (same config, seed, dtype)."""
    from mlx_audio.tts.models.voxtral_tts import Model, ModelConfig

    model = Model(ModelConfig.from_dict(params))
    raw = random_release_weights(our_config, dtype, seed)
    model.load_weights(list(model.sanitize(raw).items()), strict=True)
    del raw
    if quantization:
        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                    # our recipe on their names (their own model_quant_predicate would also
                    # quantize the text embedding table and the semantic head): like for like
                    class_predicate=lambda path, module: in_quant_recipe(
                        quantization, path, module, backbone_prefix="language_model."))
    mx.eval(model.parameters())
    model.eval()
    return model


class _History:
    """mlx-audio's streaming 'state': the frames decoded so far (it re-decodes the last 16)."""

    def __init__(self):
        self.frames: list[mx.array] = []


class MlxAudioRunner:
    name = "mlx_audio"

    def __init__(self, model, voice: mx.array, cfg_alpha: float):
        self.model = model
        self.voice = voice
        self.cfg_alpha = cfg_alpha
        self.cache = None
        model._voice_embeddings[VOICE] = voice

    @property
    def _backbone(self):
        return self.model.language_model.model.model  # what its generate() calls

    def prefill(self, ids: list[int]) -> mx.array:
        from mlx_audio.lm.models.cache import make_prompt_cache

        rows = sum(i == self.model.config.audio_token_id for i in ids)
        self.model._voice_embeddings[VOICE] = self.voice[:rows]
        ids = mx.array(ids)[None]
        embeddings = self.model._build_input_embeddings(ids, VOICE)
        self.cache = make_prompt_cache(self.model.language_model.model)
        return self._backbone(ids, cache=self.cache, input_embeddings=embeddings)[:, -1, :]

    def flow(self, h: mx.array, steps: int) -> mx.array:
        self.flow_args(steps)
        return self.model.acoustic_transformer.decode_one_frame(h)

    def step(self, codes: mx.array) -> mx.array:
        embeddings = self.model.audio_codebook_embeddings["embeddings"](
            self.model._codes_to_global_indices(codes)
        ).sum(axis=1, keepdims=True)
        dummy = mx.array([[self.model.config.audio_token_id]])
        return self._backbone(dummy, cache=self.cache, input_embeddings=embeddings)[:, -1, :]

    def new_codec_state(self) -> _History:
        return _History()

    def codec(self, codes: mx.array, state: _History) -> mx.array:
        context = state.frames[-CONTEXT_FRAMES:]
        window = mx.concatenate([*context, codes], axis=0)
        audio = self.model.audio_tokenizer.decode(window[None])[0]
        state.frames.extend(codes[i : i + 1] for i in range(codes.shape[0]))
        return audio[len(context) * SAMPLES_PER_FRAME :]

    def mid_utterance(self, state: _History, codes: mx.array) -> None:
        """A full 16-frame history, so every timed chunk pays for the context it re-decodes."""
        state.frames.extend(codes[i : i + 1] for i in range(codes.shape[0]))

    def e2e(self, ids: list[int], frames: int, first_chunk: int, chunk: int, steps: int) -> Iterator[int]:
        """Its ``generate(stream=True)``; it has one chunk size, so ``first_chunk`` is unused."""
        self.model._encode_text = lambda text, voice: list(ids)  # bypass its tekken tokenizer
        self.model.tokenizer = object()  # generate() only checks that one is set
        self.model._voice_embeddings[VOICE] = self.voice
        self.flow_args(steps)
        done = 0
        # streaming_interval is in seconds; it rounds down to whole 80 ms frames
        for result in self.model.generate("benchmark", voice=VOICE, max_tokens=frames, stream=True,
                                          streaming_interval=(chunk + 0.5) * 0.08):
            done += result.token_count
            yield done

    def flow_args(self, steps: int) -> None:
        args = self.model.acoustic_transformer.args
        args.n_denoising_steps = steps + 1  # it counts time points, not Euler steps
        args.cfg_alpha = self.cfg_alpha
