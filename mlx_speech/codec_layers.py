"""Layers of the Voxtral codec decoder: causal convs and ALiBi sliding-window attention.

Activations are channels-last (B, L, C). Every layer takes an optional streaming state
(`ConvState` for a conv, a list of `KVWindow` for a transformer stage). Calls on consecutive
chunks with the same state give the same result as one call on the whole sequence, because
every op here is causal and ALiBi positions are relative.
"""

import math

import mlx.core as mx
import mlx.nn as nn

from .layers import FeedForward


class ConvState:
    """Streaming state of a causal conv: the trailing inputs the next chunk still needs."""

    def __init__(self):
        self.tail: mx.array | None = None  # None until the first chunk (utterance start)


class KVWindow:
    """Rolling keys and values of one attention layer, the last `window` positions."""

    def __init__(self, window: int):
        self.window = window
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def size(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        # keys, values: (B, H_kv, L, D) → the kept past followed by the new positions
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        start = max(keys.shape[2] - self.window, 0)
        self.keys, self.values = keys[:, :, start:], values[:, :, start:]
        return keys, values


def pad_left(x: mx.array, pad: int, mode: str) -> mx.array:
    """Left-pad (B, L, C) along L with `mode` "replicate" or "reflect".

    Reflect follows the reference `pad1d`: an input no longer than `pad` is first zero-extended on
    the right, reflected, and the extension dropped again ([0, 1, 2] by 3 → [0, 2, 1, 0, 1, 2]).
    """
    if pad == 0:
        return x
    if mode == "replicate":
        return mx.concatenate([mx.repeat(x[:, :1], pad, axis=1), x], axis=1)
    if mode != "reflect":
        raise ValueError(f"Unknown pad mode {mode!r}; expected 'replicate' or 'reflect'.")
    extra = max(pad - x.shape[1] + 1, 0)
    if extra:
        x = mx.concatenate([x, mx.zeros((x.shape[0], extra, x.shape[2]), x.dtype)], axis=1)
    x = mx.concatenate([x[:, pad:0:-1], x], axis=1)
    return x[:, : x.shape[1] - extra]


class CausalConv1d(nn.Module):
    """Stride-1 conv, left-padded by K−1 at the utterance start and by the cached tail afterwards.

    Weight `conv.weight` (C_out, K, C_in), folded from the checkpoint's weight norm by
    `sanitize_codec`. `pad_mode` is "replicate" for decoder_blocks.0, "reflect" for output_proj.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, pad_mode: str):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, bias=False)
        self._pad = kernel_size - 1
        self._pad_mode = pad_mode

    def make_cache(self) -> ConvState:
        return ConvState()

    def __call__(self, x: mx.array, cache: ConvState | None = None) -> mx.array:
        if cache is None or cache.tail is None:
            x = pad_left(x, self._pad, self._pad_mode)
        else:
            x = mx.concatenate([cache.tail, x], axis=1)
        if cache is not None and self._pad > 0:
            cache.tail = x[:, x.shape[1] - self._pad :]
        return self.conv(x)


class CausalConvTranspose1d(nn.Module):
    """Transposed conv (stride s, kernel K) trimmed by K−s on the right: L inputs → L·s outputs.

    Weight `conv.weight` (C_out, K, C_in). Output n depends on inputs ⌈(n−K+1)/s⌉ … ⌊n/s⌋, so the
    stream keeps the last ⌈(K−s)/s⌉ inputs and recomputes their overlap with the new chunk.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(
            in_channels, out_channels, kernel_size, stride=stride, bias=False
        )
        self._stride = stride
        self._context = max(-(-(kernel_size - stride) // stride), 0)

    def make_cache(self) -> ConvState:
        return ConvState()

    def __call__(self, x: mx.array, cache: ConvState | None = None) -> mx.array:
        n_new = x.shape[1]
        n_past = 0
        if cache is not None and cache.tail is not None:
            n_past = cache.tail.shape[1]
            x = mx.concatenate([cache.tail, x], axis=1)
        if cache is not None and self._context > 0:
            cache.tail = x[:, max(x.shape[1] - self._context, 0) :]
        y = self.conv(x)  # (B, (L−1)·s + K, C): untrimmed
        start = n_past * self._stride
        return y[:, start : start + n_new * self._stride]


def alibi_slopes(n_heads: int) -> mx.array:
    """Reference codec slopes r^h, h = 0…n−1 with r = 2^(−8/n): the first slope is 1 (not r)."""

    def geometric(n: int) -> list[float]:
        r = 2.0 ** (-8.0 / n)
        return [r**h for h in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = geometric(n_heads)
    else:
        m = 2 ** math.floor(math.log2(n_heads))
        slopes = geometric(m) + geometric(2 * m)[::2][: n_heads - m]
    return mx.array(slopes, dtype=mx.float32)


def alibi_window_bias(slopes: mx.array, n_queries: int, n_keys: int, window: int) -> mx.array:
    """Additive attention bias (H, n_queries, n_keys), float32.

    The queries are the last `n_queries` of `n_keys` positions. Query i sees keys i−window … i
    (window + 1 keys) with bias slope_h·(j − i); every other key gets −inf.
    """
    q_pos = mx.arange(n_keys - n_queries, n_keys)[:, None]
    rel = mx.arange(n_keys)[None, :] - q_pos  # (n_queries, n_keys): j − i
    bias = slopes[:, None, None] * rel.astype(mx.float32)
    allowed = (rel <= 0) & (rel >= -window)
    return mx.where(allowed, bias, mx.array(-mx.inf, dtype=mx.float32))


class Attention(nn.Module):
    """Codec attention: QK-RMSNorm over the full projection (before the head split), no RoPE."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, qk_norm_eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.scale = head_dim**-0.5
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(n_heads * head_dim, eps=qk_norm_eps)
        self.k_norm = nn.RMSNorm(n_kv_heads * head_dim, eps=qk_norm_eps)

    def __call__(self, x: mx.array, bias: mx.array, cache: KVWindow | None = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_norm(self.wq(x)).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_norm(self.wk(x)).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.wv(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # float32 attention: the ALiBi bias and softmax stay exact with bf16 weights
        f32 = mx.float32
        o = mx.fast.scaled_dot_product_attention(
            q.astype(f32), k.astype(f32), v.astype(f32), scale=self.scale, mask=bias
        )
        o = o.astype(x.dtype).transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.wo(o)


class TransformerLayer(nn.Module):
    """Pre-norm block with LayerScale (`attention_scale`, `ffn_scale`) on both residual branches."""

    def __init__(self, dim, hidden_dim, n_heads, n_kv_heads, head_dim, norm_eps, qk_norm_eps):
        super().__init__()
        self.attention = Attention(dim, n_heads, n_kv_heads, head_dim, qk_norm_eps)
        self.feed_forward = FeedForward(dim, hidden_dim)
        self.attention_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.attention_scale = mx.ones((dim,))
        self.ffn_scale = mx.ones((dim,))

    def __call__(self, x: mx.array, bias: mx.array, cache: KVWindow | None = None) -> mx.array:
        h = x + self.attention_scale * self.attention(self.attention_norm(x), bias, cache)
        return h + self.ffn_scale * self.feed_forward(self.ffn_norm(h))


class TransformerStage(nn.Module):
    """`layers` sharing one sliding window; the bias is built once per call for all of them."""

    def __init__(self, n_layers: int, window: int, *, n_heads: int, **layer_args):
        super().__init__()
        self.layers = [TransformerLayer(n_heads=n_heads, **layer_args) for _ in range(n_layers)]
        self._window = window
        self._slopes = alibi_slopes(n_heads)

    def make_cache(self) -> list[KVWindow]:
        return [KVWindow(self._window) for _ in self.layers]

    def __call__(self, x: mx.array, cache: list[KVWindow] | None = None) -> mx.array:
        n_new = x.shape[1]
        n_past = cache[0].size if cache else 0
        bias = alibi_window_bias(self._slopes, n_new, n_past + n_new, self._window)
        for i, layer in enumerate(self.layers):
            x = layer(x, bias, cache[i] if cache else None)
        return x
