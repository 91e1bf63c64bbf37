"""Per-frame audio codes from a backbone hidden state (spec §5.3, §6).

The semantic code is a greedy argmax of a linear head; the 36 acoustic codes come from a
flow-matching transformer integrated with Euler steps and classifier-free guidance, then
quantized to 21 FSQ levels. Checkpoint names (prefix ``acoustic_transformer.``) are the
module names here, so no renaming is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import FromDict
from .layers import FeedForward

END_AUDIO = 1  # semantic code that ends generation
EMPTY_AUDIO = 0
CODE_OFFSET = 2  # emitted codes carry a +2 shift for the two special codes above


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


@dataclass
class AcousticConfig(FromDict):
    dim: int = 3072
    input_dim: int = 3072  # width of the backbone hidden fed to llm_projection
    n_layers: int = 3
    head_dim: int = 128
    hidden_dim: int = 9216
    n_heads: int = 32
    n_kv_heads: int = 8
    norm_eps: float = 1e-5
    semantic_codebook_size: int = 8192
    acoustic_codebook_size: int = 21
    n_acoustic_codebook: int = 36
    n_decoding_steps: int = 7  # absent from params.json; the reference defaults to 7 (T31)
    cfg_alpha: float = 1.2

    @property
    def semantic_head_size(self) -> int:
        # 8192 codes + 2 specials, padded to a multiple of 128 (8320); pad rows are live weights.
        return _round_up(self.semantic_codebook_size + CODE_OFFSET, 128)


class Attention(nn.Module):
    """Bidirectional GQA over the 3-token sequence: no mask, no positions (T15)."""

    def __init__(self, c: AcousticConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.scale = c.head_dim**-0.5
        self.wq = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.wk = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.wv = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)

    def project(self, h: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Queries, keys and values of normed rows h (..., dim): row by row, no mixing."""
        return self.wq(h), self.wk(h), self.wv(h)

    def attend(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """q (B, Q, heads·hd) attends to k, v (B, L, kv_heads·hd); returns (B, Q, dim)."""
        B, Q, _ = q.shape
        L = k.shape[1]
        q = q.reshape(B, Q, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.wo(o.transpose(0, 2, 1, 3).reshape(B, Q, -1))

    def __call__(self, x: mx.array, n_queries: int | None = None) -> mx.array:
        """Attend from the first ``n_queries`` positions (all by default) to every position."""
        return self.attend(self.wq(x[:, :n_queries]), self.wk(x), self.wv(x))


class Block(nn.Module):
    def __init__(self, c: AcousticConfig):
        super().__init__()
        self.attention = Attention(c)
        self.attention_norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.feed_forward = FeedForward(c.dim, c.hidden_dim)
        self.ffn_norm = nn.RMSNorm(c.dim, eps=c.norm_eps)

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Attention queries, keys and values of rows x (..., dim), each row on its own."""
        return self.attention.project(self.attention_norm(x))

    def finish(self, x, q, k, v, n_queries: int | None = None) -> mx.array:
        """The block on x (B, L, dim) given its projections; outputs the first ``n_queries``."""
        x = x[:, :n_queries] + self.attention.attend(q[:, :n_queries], k, v)
        return x + self.feed_forward(self.ffn_norm(x))

    def __call__(self, x: mx.array, n_queries: int | None = None) -> mx.array:
        """All positions, or only the first ``n_queries`` (keys and values still see all)."""
        x = x[:, :n_queries] + self.attention(self.attention_norm(x), n_queries)
        return x + self.feed_forward(self.ffn_norm(x))


class FlowMatchingHead(nn.Module):
    def __init__(self, config: AcousticConfig):
        super().__init__()
        c = self.config = config
        self.input_projection = nn.Linear(c.n_acoustic_codebook, c.dim, bias=False)
        self.time_projection = nn.Linear(c.dim, c.dim, bias=False)
        self.llm_projection = nn.Linear(c.input_dim, c.dim, bias=False)
        self.semantic_codebook_output = nn.Linear(c.dim, c.semantic_head_size, bias=False)
        self.acoustic_codebook_output = nn.Linear(c.dim, c.n_acoustic_codebook, bias=False)
        self.layers = [Block(c) for _ in range(c.n_layers)]
        self.norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        # Not in the checkpoint (T14): frequencies for cat(cos, sin) time embedding, θ = 10000.
        half = c.dim // 2
        self._inv_freq = mx.exp(-math.log(10000.0) * mx.arange(half, dtype=mx.float32) / half)
        self._time_tokens: dict[int, tuple] = {}
        self._compiled: dict[int, object] = {}

    @property
    def dtype(self) -> mx.Dtype:
        """Activation dtype of the transformer (norm weights are never quantized)."""
        return self.norm.weight.dtype

    # ---- semantic code -------------------------------------------------------------------
    def semantic_logits(self, h: mx.array) -> mx.array:
        """Masked float32 logits (B, semantic_head_size); argmax is the semantic code."""
        # Kept float32 and never quantized: argmax over 8194 close logits flips in bf16 (T9).
        logits = self.semantic_codebook_output(h.astype(mx.float32))
        # EMPTY_AUDIO (0) and the padding rows past 2 + codebook size can never be emitted (T11).
        idx = mx.arange(logits.shape[-1])
        valid = (idx != EMPTY_AUDIO) & (idx < self.config.semantic_codebook_size + CODE_OFFSET)
        return mx.where(valid, logits, -mx.inf)

    # ---- flow matching -------------------------------------------------------------------
    def time_embedding(self, t: mx.array) -> mx.array:
        """(N,) flow times in [0, 1] → (N, dim): cos first, then sin (T14)."""
        a = t.astype(mx.float32)[:, None] * self._inv_freq[None]
        return mx.concatenate([mx.cos(a), mx.sin(a)], axis=-1)

    def velocity(self, x: mx.array, time_tokens: mx.array, llm_tokens: mx.array) -> mx.array:
        """One plain transformer pass: x (B, 36); time and llm tokens (B, dim), already projected.

        The reference form, one branch at a time; the solve uses ``_cfg_velocity``, which must
        equal it (the parity and generation tests compare the two).
        """
        seq = mx.stack([self.input_projection(x.astype(self.dtype)), time_tokens, llm_tokens], axis=1)
        return self._layers_from(0, seq)

    def _layers_from(self, start: int, seq: mx.array) -> mx.array:
        """Layers ``start``… on seq (B, 3, dim), then the velocity head on token 0 → (B, 36)."""
        last = len(self.layers) - 1
        for layer in self.layers[start:last]:
            seq = layer(seq)
        # The velocity is read at position 0, the x_t token (T16): the last layer needs keys and
        # values of all three tokens but queries, output projection and FFN for token 0 only.
        if start <= last:
            seq = self.layers[last](seq, n_queries=1)
        return self.acoustic_codebook_output(self.norm(seq[:, 0])).astype(mx.float32)

    def _cfg_velocity(self, x, time_token, time_qkv, llm_tokens, llm_qkv) -> mx.array:
        """Both CFG branches at state x (B, 36) → (2B, 36) velocities, conditional rows first.

        The same math as ``velocity`` on the stacked batch [x|x, t|t, cond|0], without
        recomputing rows of the first layer's projections that repeat: x_t and the time token are
        identical in both branches, the time token's projections come with the schedule and the
        llm tokens' are made once per frame (``_solve``). Per step the first layer projects one
        row per item instead of six; every row still gets exactly the values it had.
        """
        first = self.layers[0]
        xt = self.input_projection(x.astype(self.dtype))

        def rows(of_x, of_time, of_llm):
            of_x = mx.concatenate([of_x, of_x], axis=0)
            return mx.stack([of_x, mx.broadcast_to(of_time, of_x.shape), of_llm], axis=1)

        q, k, v = (rows(*r) for r in zip(first.project(xt), time_qkv, llm_qkv))
        seq = first.finish(rows(xt, time_token, llm_tokens), q, k, v,
                           n_queries=1 if len(self.layers) == 1 else None)
        return self._layers_from(1, seq)

    def _schedule(self, steps: int):
        """Step sizes, projected time tokens and their first-layer (q, k, v) for ``steps`` steps.

        Computed once per step count and reused for every frame; recomputed only if a weight
        they come from is replaced (e.g. after loading or quantizing).
        """
        first = self.layers[0]
        sources = (self.time_projection.weight, first.attention_norm.weight,
                   first.attention.wq.weight, first.attention.wk.weight, first.attention.wv.weight)
        cached = self._time_tokens.get(steps)
        if cached is None or any(a is not b for a, b in zip(cached[0], sources)):
            t = np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)
            dts = [float(d) for d in np.diff(t)]
            emb = self.time_embedding(mx.array(t[:-1]))
            tokens = self.time_projection(emb.astype(self.dtype))
            qkv = first.project(tokens)
            mx.eval(tokens, qkv)
            cached = (sources, dts, tokens, qkv)
            self._time_tokens[steps] = cached
        return cached[1:]

    def sample_acoustic(
        self, h: mx.array, x0: mx.array, steps: int, cfg_alpha: float
    ) -> mx.array:
        """Integrate the flow from noise ``x0`` (B, 36) to the data end; returns x (B, 36) fp32."""
        dts, time_tokens, time_qkv = self._schedule(steps)
        return self._solve(h, x0, mx.array(cfg_alpha, mx.float32), time_tokens, time_qkv, dts)

    def _solve(self, h, x0, cfg_alpha, time_tokens, time_qkv, dts):
        B = h.shape[0]
        cond = self.llm_projection(h.astype(self.dtype))
        # Unconditional branch: the backbone hidden is zeroed before the bias-free projection,
        # so its token is exactly zero; both branches go through the transformer as one batch.
        llm_tokens = mx.concatenate([cond, mx.zeros_like(cond)], axis=0)
        llm_qkv = self.layers[0].project(llm_tokens)  # the same at every step of the frame
        x = x0.astype(mx.float32)
        for i, dt in enumerate(dts):
            v = self._cfg_velocity(x, time_tokens[i], [a[i] for a in time_qkv], llm_tokens, llm_qkv)
            v = cfg_alpha * v[:B] + (1.0 - cfg_alpha) * v[B:]
            x = x + v * dt
        return x

    def quantize_levels(self, x: mx.array) -> mx.array:
        """FSQ: continuous x → integer levels 0..20 (before the +2 offset), for any float input.

        The codes index embedding tables, and MLX gathers are not bounds-checked, so nothing may
        leave 0..20: ``clip`` passes NaN through and the int32 cast makes it −2³¹ on the CPU
        (S2). NaN is mapped to 0.0 (the middle level) first, so the result is the same on every
        backend, and the integer codes are clipped after the cast as the guarantee. Finite
        inputs get exactly the levels they had.
        """
        levels = self.config.acoustic_codebook_size - 1
        x = mx.clip(mx.nan_to_num(x, nan=0.0), -1.0, 1.0)
        return mx.clip(mx.round((x + 1.0) / 2.0 * levels).astype(mx.int32), 0, levels)

    def semantic_code(self, h: mx.array) -> mx.array:
        """Greedy semantic code (B,) int32: END_AUDIO or a codebook entry + 2, for any input.

        argmax already returns an index inside the head; a row with no finite valid logit (a
        non-finite hidden state) would give EMPTY_AUDIO, which the codec cannot decode, so codes
        are clipped to [END_AUDIO, last codebook entry]: such a row ends the utterance.
        """
        semantic = mx.argmax(self.semantic_logits(h), axis=-1).astype(mx.int32)
        return mx.clip(semantic, END_AUDIO, self.config.semantic_codebook_size + CODE_OFFSET - 1)

    def _frame(self, h, x0, cfg_alpha, time_tokens, time_qkv, dts):
        semantic = self.semantic_code(h)
        x = self._solve(h, x0, cfg_alpha, time_tokens, time_qkv, dts)
        acoustic = self.quantize_levels(x) + CODE_OFFSET
        # An END_AUDIO frame carries EMPTY_AUDIO acoustic codes (it is never decoded or fed back).
        acoustic = mx.where((semantic == END_AUDIO)[:, None], EMPTY_AUDIO + CODE_OFFSET, acoustic)
        return mx.concatenate([semantic[:, None], acoustic], axis=-1)

    def __call__(
        self, h: mx.array, x0: mx.array, steps: int | None = None, cfg_alpha: float | None = None
    ) -> mx.array:
        """Codes for one frame: h (B, dim), x0 (B, 36) → (B, 37) int32 with the +2 offset.

        The whole frame (semantic head, every Euler step with batched CFG, FSQ) is one compiled
        graph per step count: the weights are implicit inputs, so reloading them is seen.
        """
        c = self.config
        steps = c.n_decoding_steps if steps is None else steps
        cfg_alpha = c.cfg_alpha if cfg_alpha is None else cfg_alpha
        dts, time_tokens, time_qkv = self._schedule(steps)
        fn = self._compiled.get(steps)
        if fn is None:
            fn = mx.compile(partial(self._frame, dts=tuple(dts)), inputs=self.state)
            self._compiled[steps] = fn
        return fn(h, x0, mx.array(cfg_alpha, mx.float32), time_tokens, time_qkv)
