"""Layers shared by the flow-matching transformer and the codec."""

import mlx.core as mx
import mlx.nn as nn


class FeedForward(nn.Module):
    """SwiGLU feed-forward with Mistral's checkpoint names: w2(silu(w1 x) · w3 x), no biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))
