"""A streaming band-limited resampler for playback (NumPy only).

The player converts Voxtral's 24 kHz to the output device's own rate when the device refuses
24 kHz; chunks arrive one by one, so the resampler keeps its filter history between calls and its
output does not depend on how the input was cut.
"""

from __future__ import annotations

import math

import numpy as np


class Resampler:
    """Streaming band-limited resampler: Kaiser-windowed sinc, polyphase, NumPy only.

    Output sample j is the input's band-limited value at input time j·rate_in/rate_out, so the
    output does not depend on how the input is cut into chunks. Each output needs ``half_width``
    input samples of look-ahead (1.3 ms at 24 kHz); ``flush`` emits the held-back tail.
    Accuracy: a sine below 80% of the lower Nyquist frequency comes out within 1e-4.

    Args:
        rate_in, rate_out: integer sample rates.
        half_width: taps on each side of the output position (64 taps in all; more when
            downsampling, to keep the filter's length in output samples).
        beta: Kaiser window shape (8.6: about 85 dB stopband).
        cutoff: the filter's half-amplitude point, as a fraction of the lower Nyquist frequency.
    """

    MAX_PHASES = 4096  # finer rational phases are rounded down to 1/4096 of an input sample

    def __init__(self, rate_in: int, rate_out: int, half_width: int = 32, beta: float = 8.6,
                 cutoff: float = 0.92):
        g = math.gcd(int(rate_in), int(rate_out))
        self._down, self._up = int(rate_in) // g, int(rate_out) // g  # output j sits at j·down/up
        fc = cutoff * min(1.0, rate_out / rate_in)
        half_width = math.ceil(half_width * cutoff / fc)  # as many zero crossings when downsampling
        self._w = half_width
        self._phases = min(self._up, self.MAX_PHASES)
        frac = np.arange(self._phases)[:, None] / self._phases
        d = np.arange(-half_width + 1, half_width + 1)[None, :] - frac  # tap distance, (P, 2W)
        window = np.i0(beta * np.sqrt(np.clip(1.0 - (d / half_width) ** 2, 0.0, 1.0))) / np.i0(beta)
        h = fc * np.sinc(fc * d) * window
        self._taps = (h / h.sum(axis=1, keepdims=True)).astype(np.float32)  # unit gain at DC
        self._offsets = np.arange(2 * half_width)
        self._buf = np.zeros(half_width, np.float32)  # inputs from global index _base on
        self._base = -half_width  # silence before the first sample
        self._n_in = 0  # input samples received
        self._j = 0  # next output index

    @property
    def identity(self) -> bool:
        return self._up == self._down

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Resample the next chunk; returns the outputs whose inputs are all known."""
        if self.identity:
            return x
        self._buf = np.concatenate([self._buf, np.asarray(x, np.float32)])
        self._n_in += len(x)
        # Output j needs inputs up to floor(j·down/up) + W: emit every j with floor(j·down/up) ≤ last.
        last = self._n_in - 1 - self._w
        return self._emit(-(-(last + 1) * self._up // self._down) if last >= 0 else 0)

    def flush(self) -> np.ndarray:
        """The remaining outputs (input times before the end), reading silence after the end."""
        if self.identity:
            return np.zeros(0, np.float32)
        self._buf = np.concatenate([self._buf, np.zeros(self._w + 1, np.float32)])
        return self._emit(-(-self._n_in * self._up // self._down))  # ceil(n_in·up/down)

    def _emit(self, end: int, block: int = 8192) -> np.ndarray:
        parts = []
        for j0 in range(self._j, end, block):
            j = np.arange(j0, min(j0 + block, end), dtype=np.int64)
            num = j * self._down
            idx, phase = num // self._up, (num % self._up) * self._phases // self._up
            rows = self._buf[(idx - self._base - self._w + 1)[:, None] + self._offsets]  # (n, 2W)
            parts.append(np.einsum("ij,ij->i", rows, self._taps[phase]))
        self._j = max(self._j, end)
        keep = self._j * self._down // self._up - self._w + 1  # first input the next output reads
        if keep > self._base:
            self._buf = self._buf[keep - self._base :]
            self._base = keep
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)
