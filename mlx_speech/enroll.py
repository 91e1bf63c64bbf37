"""Enrollment: a voice from a short clip, without the withheld codec encoder (issue 10).

A voice is, per 80 ms frame, the sum of the audio-code embeddings of that frame's codec codes
(``voice_codes.codes_to_voice``). Without the encoder, enrollment finds such codes by gradient
descent through the frozen, released codec *decoder*:

1. a continuous latent per frame in the quantizer's input space — a semantic vector (nearest
   codebook row = the semantic code) and 36 acoustic values (FSQ level = the rounded value) —
   decoded and compared with the clip (``spectral_loss.SpectralLoss``);
2. a straight-through phase: the forward pass decodes the *quantized* latent (nearest codebook
   row, rounded FSQ level) while the gradient flows to the continuous one, keeping the best
   quantized point seen;
3. snap to valid codes (+2 offset) and sum their embeddings into the voice rows.

Each phase runs one compiled loss-gradient-Adam step of fixed shapes.

Measured on the golden tiny codec (tests/test_enroll.py: 6 frames of random-walk codes, their
decoded audio enrolled without preprocessing, seeds 0-2; SNR of the snapped codes' audio,
semantic codes recovered, acoustic codes within one level, snapped loss / starting loss):

    steps (70 % continuous)   300          400          600 (default)  1000
    SNR dB                    23.2-25.3    23.9-26.7    25.0-26.7      25.6-31.7
    semantic                  5-6 / 6      6 / 6        6 / 6          6 / 6
    acoustic within ±1        48-62 %      51-75 %      65-83 %        71-91 %
    loss ratio                ≤ 0.072      ≤ 0.069      ≤ 0.061        ≤ 0.056

Straight-through alone (600 steps, no continuous phase) reaches only 18.3-20.7 dB, 32-45 % and a
ratio of 0.10-0.13: the continuous phase is what finds the basin. Time grows linearly with steps.
Quality on the real weights is not measured here: ``python -m mlx_speech.clone --evaluate PRESET``
is the check for a user who has them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from .acoustic import CODE_OFFSET
from .spectral_loss import SpectralLoss, SpectralLossConfig
from .voice_codes import codes_to_voice
from .voice_file import Voice

DEFAULT_STEPS = 600
MAX_STEPS = 100_000
DEFAULT_MAX_SECONDS = 16.0  # the Swift port measured 16 s of reference as good as 24 s

# Continuous acoustic values may pass the extreme FSQ levels (±1) by half a level: a value near
# an extreme then rounds to it without the bound pinning the gradient.
_HALF_LEVEL = 0.5

Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class EnrollConfig:
    """How enrollment optimizes.

    Attributes:
        steps: total optimization steps (continuous + straight-through).
        continuous_fraction: share of ``steps`` spent on the continuous latent before the
            straight-through phase.
        learning_rate: Adam step size of the continuous phase (semantic vectors in units of a
            power of two near the codebook's RMS, acoustic values in FSQ units), cosine-decayed
            to a tenth.
        ste_learning_rate: the same for the straight-through phase.
        init_noise: standard deviation of the seeded random start around the codebook mean
            (semantic) and the middle FSQ level (acoustic).
        checkpoint: recompute each decoder block's activations in the backward pass (less
            memory, one more forward pass per step). Not needed: a 16 s clip at the real codec
            size peaks far below 16 GB without it (benchmarks/bench_clone.py).
        loss: the spectral loss's settings.
    """

    steps: int = DEFAULT_STEPS
    continuous_fraction: float = 0.7
    learning_rate: float = 0.1
    ste_learning_rate: float = 0.03
    init_noise: float = 0.1
    checkpoint: bool = False
    loss: SpectralLossConfig = field(default_factory=SpectralLossConfig)

    @property
    def continuous_steps(self) -> int:
        return int(round(self.steps * self.continuous_fraction))

    @property
    def ste_steps(self) -> int:
        return self.steps - self.continuous_steps


@dataclass
class OptimizeResult:
    """What ``optimize_codes`` found.

    Attributes:
        codes: int32 (T, 37) codes with the +2 offset.
        start_loss: the loss at the starting latent (before any step).
        final_loss: the loss of ``codes`` decoded by the codec.
        losses: the loss at every step (continuous steps first, then straight-through).
        seconds: wall time of the optimization.
    """

    codes: np.ndarray
    start_loss: float
    final_loss: float
    losses: list[float]
    seconds: float


# ---- the codec decoder on latents -----------------------------------------------------------------
def decode_latent(codec, latent: mx.array, checkpoint: bool = False) -> mx.array:
    """Decode a (B, T, latent_dim) latent to (B, T · samples_per_frame) float32 audio.

    The chain of ``Codec._step`` — decoder_blocks, then output_proj, then unpatchify — on a whole
    utterance at once (no streaming state), so ``decode_latent(quantizer(codes − 2))`` equals
    ``Codec.decode(codes)``. With ``checkpoint`` each block's activations are recomputed in the
    backward pass instead of being kept.
    """
    x = latent.astype(codec.decoder_blocks[0].conv.weight.dtype)
    for block in codec.decoder_blocks:
        x = mx.checkpoint(block)(x) if checkpoint else block(x)
    patches = codec.output_proj(x)  # (B, 8T, patch_size)
    return patches.reshape(patches.shape[0], -1).astype(mx.float32)


class LatentSpace:
    """The quantizer's input space of one codec: continuous latents, their quantization, codes.

    Parameters are a dict ``{"semantic": (1, T, semantic_dim), "acoustic": (1, T, acoustic_dim)}``:
    the semantic vector divided by ``scale`` (a power of two near the codebook's RMS, so one
    learning rate suits any codebook and the division is exact) and the acoustic values
    themselves, kept by ``project`` within half a level of the FSQ range [−1, 1].

    Every code's latent is exactly representable: ``from_codes`` gives the very floats the codec's
    ``Quantizer`` builds, so at the true codes the decoded audio matches bit for bit, every
    residual is 0 and so is every gradient — the optimizer stays put (the fixed point).
    """

    def __init__(self, codec):
        self.codec = codec
        c = codec.config
        self.levels = c.acoustic_codebook_size
        self.codebook = codec.quantizer.semantic_codebook.embedding.astype(mx.float32)
        rms = math.sqrt(mx.mean(self.codebook * self.codebook).item())
        self.scale = 2.0 ** round(math.log2(rms)) if rms > 0 else 1.0
        self.bound = 1.0 + _HALF_LEVEL * 2.0 / (self.levels - 1)
        self._norms = mx.sum(self.codebook * self.codebook, axis=-1)
        self._mean = mx.mean(self.codebook, axis=0) / self.scale

    # -- from and to codes
    def random(self, frames: int, seed: int, noise: float) -> dict:
        """A seeded start: the codebook mean and the middle FSQ level, plus Gaussian noise."""
        rng = np.random.default_rng(seed)
        c = self.codec.config
        semantic = np.array(self._mean)[None, None] + noise * rng.standard_normal((1, frames, c.semantic_dim))
        acoustic = noise * rng.standard_normal((1, frames, c.acoustic_dim))
        return self.project({"semantic": mx.array(semantic.astype(np.float32)),
                             "acoustic": mx.array(acoustic.astype(np.float32))})

    def from_codes(self, codes) -> dict:
        """The latent whose quantization and continuous decoding are exactly ``codes`` (T, 37) +2."""
        codes = mx.array(np.asarray(codes, np.int32) - CODE_OFFSET)
        semantic = self.codebook[codes[:, 0]] / self.scale
        acoustic = (codes[:, 1:] * 2).astype(mx.float32) / (self.levels - 1) - 1  # the Quantizer's floats
        return {"semantic": semantic[None], "acoustic": acoustic[None]}

    def snap(self, params: dict) -> np.ndarray:
        """Codes (T, 37) int32 with the +2 offset: the nearest semantic row, the rounded FSQ level."""
        index, level = self._quantize(params)
        codes = mx.concatenate([index[..., None], level.astype(mx.int32)], axis=-1)[0] + CODE_OFFSET
        return np.array(codes).astype(np.int32)

    def project(self, params: dict) -> dict:
        """``params`` with the acoustic values clipped to ±``bound`` (after every update)."""
        return {"semantic": params["semantic"], "acoustic": mx.clip(params["acoustic"], -self.bound, self.bound)}

    # -- latents
    def continuous(self, params: dict) -> mx.array:
        return mx.concatenate([params["semantic"] * self.scale, params["acoustic"]], axis=-1)

    def quantized(self, params: dict) -> mx.array:
        """The quantized latent in the forward pass, the continuous one's gradient backward.

        Written q + (x − stop(x)) rather than x + stop(q − x): the forward value is then q
        exactly, the same floats ``Codec.decode`` builds from the snapped codes.
        """
        index, level = self._quantize(params)
        semantic = self.codebook[index] + self._pass_through(params["semantic"] * self.scale)
        value = (level * 2) / (self.levels - 1) - 1  # the Quantizer's formula, so the floats match
        acoustic = value + self._pass_through(params["acoustic"])
        return mx.concatenate([semantic, acoustic], axis=-1)

    @staticmethod
    def _pass_through(x: mx.array) -> mx.array:
        return x - mx.stop_gradient(x)  # 0 forward, identity backward

    def _quantize(self, params: dict) -> tuple[mx.array, mx.array]:
        z = mx.stop_gradient(params["semantic"]) * self.scale
        # argmin ‖z − e‖² = argmax 2⟨z, e⟩ − ‖e‖²
        index = mx.argmax(2 * (z @ self.codebook.T) - self._norms, axis=-1).astype(mx.int32)
        value = mx.stop_gradient(params["acoustic"])
        level = mx.clip(mx.round((value + 1) / 2 * (self.levels - 1)), 0, self.levels - 1)
        return index, level


# ---- the optimizer ------------------------------------------------------------------------------
def _adam(learning_rate: float, steps: int) -> optim.Adam:
    schedule = optim.cosine_decay(learning_rate, max(steps, 1), learning_rate * 0.1)
    return optim.Adam(learning_rate=schedule, bias_correction=True)


def compiled_step(space: LatentSpace, loss_fn: SpectralLoss, target: dict, params: dict, steps: int,
                  learning_rate: float, quantized: bool, checkpoint: bool = False):
    """The compiled step of one phase and its ``best`` record: ``step()`` returns the loss at the
    current latent and updates ``params`` in place (gradient, then Adam with a cosine decay over
    ``steps``).

    The straight-through phase (``quantized``) also keeps, in ``best``, the lowest loss seen and
    its latent — in the graph, so the loop never waits on a comparison.
    """
    optimizer = _adam(learning_rate, steps)
    optimizer.init(params)
    best = {"loss": mx.array(math.inf), **params}
    latent_of = space.quantized if quantized else space.continuous

    def loss_of(p):
        audio = decode_latent(space.codec, latent_of(p), checkpoint=checkpoint)
        return loss_fn.loss(audio, target)

    loss_and_grad = mx.value_and_grad(loss_of)
    state = [params, optimizer.state, best]

    def step():
        loss, grads = loss_and_grad(params)
        if quantized:
            better = loss < best["loss"]
            for k in params:
                best[k] = mx.where(better, params[k], best[k])
            best["loss"] = mx.minimum(loss, best["loss"])
        params.update(space.project(optimizer.apply_gradients(grads, params)))
        return loss

    return mx.compile(step, inputs=state, outputs=state), best


def optimize_codes(
    model,
    audio,
    *,
    config: EnrollConfig = EnrollConfig(),
    seed: int = 0,
    init_codes=None,
    progress: Progress | None = None,
) -> OptimizeResult:
    """Codes whose decoded audio matches ``audio``: the continuous phase, then straight-through.

    Args:
        model: a loaded ``Model`` (its ``audio_tokenizer`` is the codec used, frozen).
        audio: 24 kHz mono samples (n,), n a positive multiple of ``samples_per_frame``.
        config: steps, learning rates, loss settings.
        seed: seeds the random start; the same seed gives the same codes.
        init_codes: start from these (T, 37) +2 codes instead of a random latent.
        progress: called as ``progress(step, total, loss)`` after every step (1-based).

    Returns:
        An ``OptimizeResult``.
    """
    codec = model.audio_tokenizer
    hop = codec.config.samples_per_frame
    audio = np.asarray(audio, np.float32).reshape(-1)
    if audio.size == 0 or audio.size % hop:
        raise ValueError(f"audio must be a positive whole number of {hop}-sample frames, got {audio.size} samples")
    frames = audio.size // hop
    space = LatentSpace(codec)
    loss_fn = SpectralLoss(replace(config.loss, sample_rate=codec.config.sampling_rate))
    target = loss_fn.target(mx.array(audio)[None])
    if init_codes is None:
        params = space.random(frames, seed, config.init_noise)
    else:
        init_codes = np.asarray(init_codes)
        if init_codes.shape != (frames, 1 + codec.config.acoustic_dim):
            raise ValueError(f"init_codes must have shape ({frames}, {1 + codec.config.acoustic_dim}), "
                             f"got {init_codes.shape}")
        params = space.from_codes(init_codes)

    t0 = time.perf_counter()
    losses: list[float] = []
    phases = [(config.continuous_steps, config.learning_rate, False),
              (config.ste_steps, config.ste_learning_rate, True)]
    best = None
    for steps, lr, quantized in phases:
        if steps == 0:
            continue
        step, phase_best = compiled_step(space, loss_fn, target, params, steps, lr, quantized, config.checkpoint)
        best = phase_best if quantized else best
        _run(step, steps, params, phase_best, losses, config.steps, progress)
    if best is not None and math.isfinite(best["loss"].item()):
        params = {k: best[k] for k in params}  # the best quantized point seen
    codes = space.snap(params)
    decoded = codec.decode(mx.array(codes)[None])
    final = loss_fn.loss(decoded, target).item()
    start = losses[0] if losses else final
    return OptimizeResult(codes, start, final, losses, time.perf_counter() - t0)


def _run(step, steps: int, params: dict, best: dict, losses: list, total: int, progress) -> None:
    """Run ``steps`` of a compiled step, one step queued ahead of the one being reported."""
    pending = step()
    mx.async_eval(pending, params, best)
    for i in range(steps):
        current = pending
        if i + 1 < steps:
            pending = step()
            mx.async_eval(pending, params, best)
        loss = current.item()
        if not math.isfinite(loss):
            raise FloatingPointError(f"enrollment loss became {loss} at step {len(losses) + 1}")
        losses.append(loss)
        if progress is not None:
            progress(len(losses), total, loss)


# ---- the public entry point ---------------------------------------------------------------------
def enroll(
    model,
    audio,
    sample_rate: int,
    *,
    steps: int | None = None,
    seed: int = 0,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    preprocess: bool = True,
    progress: Progress | None = None,
    init_codes=None,
    config: EnrollConfig | None = None,
) -> Voice:
    """A voice from a reference clip: codes fitted through the frozen codec decoder.

    Args:
        model: a loaded ``Model``.
        audio: samples, (n,) mono or (n, channels), any float or integer dtype.
        sample_rate: of ``audio``, in Hz.
        steps: optimization steps (default ``DEFAULT_STEPS``); more fit the clip more closely.
        seed: seeds the random start; the same seed and clip give the same voice.
        max_seconds: use at most this much of the clip (after trimming silence).
        preprocess: mono, resample to 24 kHz, high-pass, trim, end on a pause, whole frames
            (``clip_prep.prepare_clip``). False takes 24 kHz mono audio of whole frames as is.
        progress: ``progress(step, total, loss)`` after every optimization step.
        init_codes: start from these (T, 37) +2 codes instead of a random latent (tests).
        config: full optimizer settings (``steps`` overrides its step count).

    Returns:
        A ``Voice``: ``embedding`` float32 (T + 1, dim), ``codes`` (T, 37) +2, and metadata.

    Raises:
        ValueError (``clip_prep.ClipError``): a clip that is too short, silent, or not what
            ``preprocess=False`` needs; bad arguments.
    """
    from .clip_prep import prepare_clip, take_as_is

    c = model.audio_tokenizer.config
    prepare = prepare_clip if preprocess else take_as_is
    clip = prepare(audio, sample_rate, max_seconds=max_seconds, target_rate=c.sampling_rate,
                   frame_samples=c.samples_per_frame)
    return enroll_clip(model, clip, steps=steps, seed=seed, progress=progress, init_codes=init_codes,
                       config=config, metadata={"preprocess": str(bool(preprocess)).lower()})


def enroll_clip(model, clip, *, steps: int | None = None, seed: int = 0, progress: Progress | None = None,
                init_codes=None, config: EnrollConfig | None = None, metadata: dict | None = None) -> Voice:
    """``enroll`` on a clip already prepared (``clip_prep.Clip`` at the codec's rate, whole frames).

    ``metadata`` entries are added to the voice's (e.g. the model id the command line knows).
    """
    from . import __version__
    from .options import SEED_RANGE, check_int

    config = config or EnrollConfig()
    if steps is not None:
        config = replace(config, steps=check_int(steps, "steps", 1, MAX_STEPS))
    check_int(seed, "seed", *SEED_RANGE)
    rate = model.audio_tokenizer.config.sampling_rate
    if clip.sample_rate != rate:
        raise ValueError(f"the clip is {clip.sample_rate} Hz but the codec decodes {rate} Hz")
    result = optimize_codes(model, clip.samples, config=config, seed=seed, init_codes=init_codes,
                            progress=progress)
    info = {
        "created_by": "mlx_speech.enroll",
        "mlx_speech_version": __version__,
        "source_seconds": f"{clip.source_seconds:.3f}",
        "seconds_used": f"{clip.seconds:.3f}",
        "frames": str(len(result.codes)),
        "steps": str(config.steps),
        "continuous_steps": str(config.continuous_steps),
        "seed": str(seed),
        "start_loss": f"{result.start_loss:.6g}",
        "final_loss": f"{result.final_loss:.6g}",
        "optimize_seconds": f"{result.seconds:.1f}",
        "license": "derived from Voxtral-4B-TTS weights (CC BY-NC 4.0)",
    }
    model_id = getattr(model, "source", None) or getattr(model, "path", None)
    if model_id is not None:
        info["model"] = str(model_id)
    info.update(metadata or {})
    return Voice(codes_to_voice(model, result.codes), result.codes, info)
