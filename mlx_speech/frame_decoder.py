"""The decode loop: prefilled rows in, one frame of codes per row per step, rows out.

One utterance is a batch of one: ``generation.generate_step`` (and so every streaming entry point),
``batch_generation`` (many texts) and the server's scheduler all drive ``FrameDecoder``, so there is
one decode loop. See the class docstring for how rows share a step and keep their own output.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import NamedTuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache

from .acoustic import END_AUDIO
from .model import Model
from .options import DEFAULT_CFG_ALPHA, DEFAULT_FLOW_STEPS, check_options


class Frame(NamedTuple):
    """One row's result of a ``FrameDecoder.step``.

    Attributes:
        key: the row's key (given to ``FrameDecoder.add``).
        codes: (37,) int32 codes with the +2 offset; None on the [END_AUDIO] frame, which is
            neither kept nor decoded.
        finish_reason: None while the row goes on; "stop" on its END frame, "length" on the
            frame that reaches its frame cap. Either way the row has left the decoder.
    """

    key: Hashable
    codes: mx.array | None
    finish_reason: str | None


def check_noise(noise: mx.array | None, frames: int, n_acoustic: int) -> None:
    """Refuse explicit noise that cannot give x₀ for ``frames`` frames."""
    if noise is not None and (noise.ndim != 2 or noise.shape[0] < frames or noise.shape[1] != n_acoustic):
        raise ValueError(
            f"noise must have shape (>= max_frames={frames}, {n_acoustic}); got {tuple(noise.shape)}"
        )


class _Row:
    """A decoding row: its frame count and cap, its solver settings and its own noise source."""

    __slots__ = ("key", "frame_cap", "frames", "noise", "rng", "cfg_alpha", "flow_steps")

    def __init__(self, key, frame_cap: int, seed: int | None, noise: mx.array | None, cfg_alpha: float,
                 flow_steps: int):
        self.key, self.frame_cap, self.frames, self.noise = key, frame_cap, 0, noise
        self.cfg_alpha, self.flow_steps = cfg_alpha, flow_steps
        self.rng = mx.random.key(seed if seed is not None else int(np.random.SeedSequence().entropy % 2**63))

    def next_x0(self, n_acoustic: int) -> mx.array:
        """x₀ (1, 36) of this row's next frame: its noise row, or a draw from its own key split."""
        if self.noise is not None:
            return self.noise[self.frames : self.frames + 1]
        self.rng, sub = mx.random.split(self.rng)
        return mx.random.normal((1, n_acoustic), key=sub)


class FrameDecoder:
    """The decode loop with explicit state: prefilled rows in (``add``), one frame for every row
    per ``step``, rows out (at their END frame, their frame cap, or ``remove``).

    One utterance is a batch of one: ``generate_step`` and every streaming entry point drive this
    loop, so there is no second decode loop beside it. Each row keeps everything that makes its
    output its own: its noise (the same key splits as a lone ``generate_step``, or explicit rows),
    its frame cap, its KV history, its guidance strength. All rows share one backbone step, one
    compiled flow-matching solve (both CFG branches of every row in one graph; rows asking for
    different ``flow_steps`` get one solve per step count) and one host sync per frame.

    KV state: a lone row keeps its per-layer ``KVCache`` untouched, so a single stream runs
    exactly the graph it always did (no mask, integer RoPE offset). When rows are batched they
    are merged into mlx-lm's ``BatchKVCache`` (left padding, a per-row RoPE offset, and the mask
    that hides each row's padding): new rows are merged together (``BatchKVCache.merge``) and
    joined to the running batch (``extend``) at the next frame boundary, finished rows leave with
    ``filter``; nobody is prefilled again. On MLX's CPU backend every row's hidden states, codes
    and audio are bit-identical to its solo run (tests/test_batch.py).

    Why one loop and not a batched one beside ``generate_step``: a batch of one *is* the loop it
    replaced (same graph, same single host sync per frame); what is added is host-side list work
    per frame. Measured on the 2-core CPU, single-stream time per frame, new over old, in
    alternating rounds: 1.00 on the tiny model (13.50 against 13.49 ms, 150-frame runs, median
    of 8) and 0.97 at the real width with one backbone layer (6.71 against 6.91 s,
    ``benchmarks/bench_batch.py --single --layers 1``): no slowdown within the noise, with
    identical codes and samples. So there is one loop.
    """

    def __init__(self, model: Model, *, cfg_alpha: float = DEFAULT_CFG_ALPHA,
                 flow_steps: int = DEFAULT_FLOW_STEPS):
        """``cfg_alpha`` and ``flow_steps``: the solver settings of rows that do not give their own."""
        check_options(cfg_alpha=cfg_alpha, flow_steps=flow_steps)
        self.model = model
        self.cfg_alpha, self.flow_steps = cfg_alpha, flow_steps
        self._rows: list[_Row] = []  # in batch order: row i is index i of the cache and hidden
        self._joining: list[tuple[_Row, list, mx.array]] = []
        self._cache: list | None = None  # per layer: KVCache (one row) or BatchKVCache
        self._hidden: mx.array | None = None  # (B, dim): the state each row's next frame comes from

    def __len__(self) -> int:
        return len(self._rows) + len(self._joining)

    @property
    def keys(self) -> list:
        """Keys of the rows in the decoder (running, then joining)."""
        return [r.key for r in self._rows] + [r.key for r, _, _ in self._joining]

    def add(self, key: Hashable, cache: list, hidden: mx.array, *, frame_cap: int,
            seed: int | None = None, noise: mx.array | None = None, cfg_alpha: float | None = None,
            flow_steps: int | None = None) -> None:
        """A prefilled row joins at the next ``step``.

        Args:
            key: the row's name in ``Frame.key`` (unique among the rows in the decoder).
            cache: its backbone KV cache (per-layer ``KVCache``) holding its whole prompt.
            hidden: (1, dim) the prompt's last hidden state (``prefill``'s result): frame 0
                comes straight from it.
            frame_cap: the most frames it may take.
            seed: seeds its noise exactly as ``generate_step`` does (None: random).
            noise: (≥ frame_cap, 36) explicit x₀ rows, one per frame (replaces the seed).
            cfg_alpha, flow_steps: its solver settings (None: the decoder's).
        """
        cfg_alpha = self.cfg_alpha if cfg_alpha is None else cfg_alpha
        flow_steps = self.flow_steps if flow_steps is None else flow_steps
        check_options(max_frames=frame_cap, seed=seed, cfg_alpha=cfg_alpha, flow_steps=flow_steps)
        check_noise(noise, frame_cap, self.model.config.acoustic.n_acoustic_codebook)
        if key in self.keys:
            raise ValueError(f"a row with key {key!r} is already in the decoder")
        if hidden.ndim != 2 or hidden.shape[0] != 1:
            raise ValueError(f"hidden must be one row (1, dim); got {tuple(hidden.shape)}")
        self._joining.append((_Row(key, frame_cap, seed, noise, cfg_alpha, flow_steps), cache, hidden))

    def remove(self, key: Hashable) -> bool:
        """Take a row out (a cancelled request); the others go on unchanged. False if absent."""
        for i, (row, _, _) in enumerate(self._joining):
            if row.key == key:
                del self._joining[i]
                return True
        for i, row in enumerate(self._rows):
            if row.key == key:
                self._keep([j for j in range(len(self._rows)) if j != i])
                del self._rows[i]
                return True
        return False

    def _keep(self, positions: list[int]) -> None:
        """Keep only these batch positions of the KV cache and hidden states."""
        if not positions:
            self._cache = self._hidden = None
        elif len(positions) < self._hidden.shape[0]:
            for c in self._cache:
                c.filter(positions)  # a BatchKVCache: a lone KVCache row is never filtered
            self._hidden = self._hidden[mx.array(positions)]

    def _admit(self) -> None:
        """Merge the joining rows into the running batch (at a frame boundary)."""
        if not self._joining:
            return
        rows, caches, hidden = zip(*self._joining)
        self._joining = []
        if self._cache is None and len(rows) == 1:
            self._cache, self._hidden = caches[0], hidden[0]  # a lone row keeps its own cache
        else:
            lone = self._cache is not None and isinstance(self._cache[0], KVCache)
            if lone:  # the running row leaves its KVCache for the batch layout, merged with the rest
                caches = (self._cache, *caches)
            merged = [BatchKVCache.merge(list(layer)) for layer in zip(*caches)]
            if self._cache is None or lone:
                self._cache = merged
            else:
                for running, new in zip(self._cache, merged):
                    running.extend(new)
            self._hidden = mx.concatenate([self._hidden, *hidden] if self._hidden is not None else hidden)
        self._rows += rows

    def _codes(self, rows: list[_Row], hidden: mx.array, x0: mx.array) -> mx.array:
        """Every row's codes of this frame: one compiled solve per step count in the batch.

        Guidance strengths differ per row as a (B, 1) factor inside the same graph (a scalar when
        all rows agree, so a lone row runs the graph it always did); either way every row's
        arithmetic is the same as alone.
        """
        head = self.model.acoustic_transformer
        by_steps: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_steps.setdefault(r.flow_steps, []).append(i)

        def solve(members: list[int], h: mx.array, x: mx.array) -> mx.array:
            alphas = {rows[i].cfg_alpha for i in members}
            alpha = alphas.pop() if len(alphas) == 1 else mx.array([[rows[i].cfg_alpha] for i in members], mx.float32)
            return head(h, x, rows[members[0]].flow_steps, alpha)

        if len(by_steps) == 1:
            return solve(list(range(len(rows))), hidden, x0)
        order = [i for members in by_steps.values() for i in members]
        parts = [solve(m, hidden[mx.array(m)], x0[mx.array(m)]) for m in by_steps.values()]
        back = mx.array(np.argsort(order))  # batch position of each row in the concatenation
        return mx.concatenate(parts)[back]

    def step(self) -> list[Frame]:
        """One frame for every row, in batch order (joining rows are admitted first).

        The next backbone step is queued before the END check and before the frames are handed
        out, so it runs while the host checks, decodes or plays; a row ending at this frame
        drops its part of it with the cache. Rows whose next frame would pass their cap are
        left out of that step.
        """
        self._admit()
        rows = self._rows
        if not rows:
            return []
        n_acoustic = self.model.config.acoustic.n_acoustic_codebook
        x0 = mx.concatenate([r.next_x0(n_acoustic) for r in rows]) if len(rows) > 1 else rows[0].next_x0(n_acoustic)
        codes = self._codes(rows, self._hidden, x0)  # (B, 37)
        going_on = [i for i, r in enumerate(rows) if r.frames + 1 < r.frame_cap]
        self._keep(going_on)
        if going_on:
            fed = codes if len(going_on) == len(rows) else codes[mx.array(going_on)]
            self._hidden = self.model(self.model.audio_code_embeddings(fed)[:, None], self._cache)[:, -1]
            mx.async_eval(self._hidden)
        semantic = np.array(codes[:, 0])  # the one host sync per frame
        frames, survivors = [], []
        for i, row in enumerate(rows):
            if int(semantic[i]) == END_AUDIO:
                frames.append(Frame(row.key, None, "stop"))
                continue
            row.frames += 1
            capped = row.frames >= row.frame_cap
            frames.append(Frame(row.key, codes[i], "length" if capped else None))
            if not capped:
                survivors.append(i)
        if len(survivors) < len(going_on):
            self._keep([going_on.index(i) for i in survivors])
        self._rows = [rows[i] for i in survivors]
        return frames
