"""Differentiable audio losses in MLX: multi-resolution STFT, log-mel and waveform L1.

Enrollment (``enroll.py``) fits codec latents so that the decoded audio matches a reference
clip; these are the distances it descends. Every square root has an ε inside: the magnitude
sqrt(re² + im²) and the spectral-convergence norm ‖S_t − S_p‖ both have an infinite derivative
at zero, and an exact match (the fixed-point case, or any silent bin) would otherwise turn every
gradient into NaN. The target's features are computed once (``SpectralLoss.target``) and passed
to every step, so a compiled step sees fixed shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

# (n_fft, hop): 4 resolutions from 10.7 ms to 85 ms windows at 24 kHz, hop = n_fft / 4.
DEFAULT_RESOLUTIONS = ((2048, 512), (1024, 256), (512, 128), (256, 64))


@dataclass(frozen=True)
class SpectralLossConfig:
    """Weights and settings of ``SpectralLoss``.

    Attributes:
        resolutions: (n_fft, hop) pairs of the multi-resolution STFT; n_fft a multiple of hop.
        sample_rate: of the audio, for the mel scale.
        n_mels, mel_n_fft, mel_hop: the log-mel term's filterbank and its STFT.
        stft_weight, mel_weight, l1_weight: weights of the three terms.
        eps: added inside every square root (magnitudes and norms).
        log_eps: added before every log (magnitudes, mel energies).
    """

    resolutions: tuple[tuple[int, int], ...] = DEFAULT_RESOLUTIONS
    sample_rate: int = 24000
    n_mels: int = 80
    mel_n_fft: int = 1024
    mel_hop: int = 256
    stft_weight: float = 1.0
    mel_weight: float = 1.0
    l1_weight: float = 1.0
    eps: float = 1e-8
    log_eps: float = 1e-5


def frame_signal(x: mx.array, n_fft: int, hop: int) -> mx.array:
    """Overlapping frames (..., n_frames, n_fft) of ``x`` (..., samples), zero-padded by n_fft/2
    at both ends (centred frames) and at the end to whole hops.

    Built from slices of a (blocks, hop) reshape rather than a gather, so the backward pass is
    plain slicing and addition.
    """
    if n_fft % hop:
        raise ValueError(f"n_fft {n_fft} must be a multiple of hop {hop}")
    n = x.shape[-1]
    half = n_fft // 2
    total = half + n + half
    total += (-total) % hop
    pad = [(0, 0)] * (x.ndim - 1) + [(half, total - n - half)]
    blocks = mx.pad(x, pad).reshape(*x.shape[:-1], total // hop, hop)
    per_frame = n_fft // hop
    n_frames = blocks.shape[-2] - per_frame + 1
    parts = [blocks[..., i : i + n_frames, :] for i in range(per_frame)]
    return mx.concatenate(parts, axis=-1)


def hann_window(n: int) -> np.ndarray:
    """Periodic Hann window (what STFT losses use), float32."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


def stft_magnitude(x: mx.array, n_fft: int, hop: int, eps: float, window: mx.array | None = None) -> mx.array:
    """|STFT| (..., n_frames, n_fft/2 + 1) as sqrt(re² + im² + eps)."""
    window = mx.array(hann_window(n_fft)) if window is None else window
    spec = mx.fft.rfft(frame_signal(x, n_fft, hop) * window, axis=-1)
    re, im = mx.real(spec), mx.imag(spec)
    return mx.sqrt(re * re + im * im + eps)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """Triangular HTK-mel filters (n_fft/2 + 1, n_mels), float32, each normalized to unit area
    (Slaney-style), so low and high bands weigh alike."""
    fmax = sample_rate / 2 if fmax is None else fmax

    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs[:, None] - lower) / (centre - lower)
    falling = (upper - freqs[:, None]) / (upper - centre)
    bank = np.maximum(0.0, np.minimum(rising, falling))
    bank *= 2.0 / (upper - lower)
    return bank.astype(np.float32)


class SpectralLoss:
    """loss(pred, target features) = stft_weight · mean over resolutions of (spectral convergence
    + mean |log S_t − log S_p|) + mel_weight · mean |log mel_t − log mel_p| + l1_weight · mean |x_t − x_p|.

    Spectral convergence is sqrt(Σ (S_t − S_p)² + eps) / sqrt(Σ S_t² + eps), per batch item.
    Call ``target(audio)`` once, then ``loss(pred, features)`` per step.
    """

    def __init__(self, config: SpectralLossConfig = SpectralLossConfig()):
        self.config = config
        self._windows = {n: mx.array(hann_window(n)) for n in {r[0] for r in config.resolutions} | {config.mel_n_fft}}
        self._mel = mx.array(mel_filterbank(config.sample_rate, config.mel_n_fft, config.n_mels))

    def _magnitudes(self, x: mx.array) -> list[mx.array]:
        eps = self.config.eps
        return [stft_magnitude(x, n, h, eps, self._windows[n]) for n, h in self.config.resolutions]

    def _log_mel(self, x: mx.array) -> mx.array:
        c = self.config
        mag = stft_magnitude(x, c.mel_n_fft, c.mel_hop, c.eps, self._windows[c.mel_n_fft])
        return mx.log(mag @ self._mel + c.log_eps)

    def target(self, audio: mx.array) -> dict:
        """The features of the target ``audio`` (B, samples) that ``loss`` compares against."""
        audio = audio.astype(mx.float32)
        mags = self._magnitudes(audio)
        log_eps = self.config.log_eps
        features = {
            "audio": audio,
            "mags": mags,
            "log_mags": [mx.log(m + log_eps) for m in mags],
            "norms": [mx.sqrt(mx.sum(m * m, axis=(-2, -1)) + self.config.eps) for m in mags],
            "log_mel": self._log_mel(audio),
        }
        mx.eval(features)
        return features

    def loss(self, pred: mx.array, target: dict) -> mx.array:
        """Scalar loss of ``pred`` (B, samples) against ``target`` features (mean over the batch)."""
        c = self.config
        pred = pred.astype(mx.float32)
        stft = mx.array(0.0)
        for mag, t_mag, t_log, t_norm in zip(self._magnitudes(pred), target["mags"], target["log_mags"],
                                             target["norms"]):
            diff = t_mag - mag
            convergence = mx.sqrt(mx.sum(diff * diff, axis=(-2, -1)) + c.eps) / t_norm
            log_mag = mx.mean(mx.abs(t_log - mx.log(mag + c.log_eps)), axis=(-2, -1))
            stft = stft + convergence + log_mag
        stft = stft / len(c.resolutions)
        mel = mx.mean(mx.abs(target["log_mel"] - self._log_mel(pred)), axis=(-2, -1))
        l1 = mx.mean(mx.abs(target["audio"] - pred), axis=-1)
        return mx.mean(c.stft_weight * stft + c.mel_weight * mel + c.l1_weight * l1)

    def __call__(self, pred: mx.array, target: mx.array) -> mx.array:
        """Loss of ``pred`` against raw ``target`` audio (features recomputed: for tests, not loops)."""
        return self.loss(pred, self.target(target))


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Signal-to-noise ratio of ``estimate`` against ``reference`` in dB (inf for an exact match)."""
    reference = np.asarray(reference, np.float64).ravel()
    noise = reference - np.asarray(estimate, np.float64).ravel()
    signal, err = float(np.sum(reference**2)), float(np.sum(noise**2))
    return math.inf if err == 0 else 10.0 * math.log10(max(signal, 1e-30) / err)
