"""Voxtral codec decoder: per-frame codes (B, T, 37) → 24 kHz waveform (B, T·1920).

codes − 2 → latent [semantic VQ lookup | acoustic FSQ levels] → decoder_blocks (conv k3, then
transformer stages with sliding windows 2/4/8/16 between stride-2 transposed convs) → output_proj
(conv k7 to 240-sample patches) → waveform. Decoding is exact in streaming: pass the same
`make_cache()` object to `decode` for consecutive chunks of frames.
"""

import json
import math
import re
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from .codec_layers import CausalConv1d, CausalConvTranspose1d, ConvState, KVWindow, TransformerStage
from .config import MAX_LIST_LENGTH, FieldError, FromDict, check_field, field_path, section_dict
from .errors import file_error, quoted

# Frames decoded per internal step: bounds the attention bias at (H, 8·64, 8·64 + 16).
DEFAULT_CHUNK_FRAMES = 64

# Fields a params.json audio_tokenizer_args must give (the rest have the release's values).
_REQUIRED_PARAMS = ("dim", "hidden_dim", "head_dim", "n_heads", "n_kv_heads",
                    "semantic_codebook_size", "semantic_dim", "acoustic_codebook_size", "acoustic_dim")
# The release has 240 × 2 × 2 × 2 = 1920 samples per frame (80 ms at 24 kHz).
MAX_SAMPLES_PER_FRAME = 1 << 20

# params.json options this decoder implements, with the only value it supports
_FIXED_PARAMS = {
    "channels": 1,
    "causal": True,
    "qk_norm": True,
    "layer_scale": True,
    "use_biases": False,
    "conv_weight_norm": True,
}


def _int_list(args: dict, key: str, default: str, source, section: str) -> list[int]:
    """A params.json "1,2,2,2" field as ints, refused naming ``key`` if it is anything else."""
    text = args.get(key, default)
    parts = text.split(",") if isinstance(text, str) and len(text) <= 256 else None
    if parts is None or len(parts) > MAX_LIST_LENGTH or not all(re.fullmatch(r"\s*\d{1,9}\s*", p) for p in parts):
        raise file_error(source, f"{field_path(section, key)} is {quoted(text)}; expected comma-separated "
                                 f"integers like {default!r} (at most {MAX_LIST_LENGTH})")
    return [int(p) for p in parts]


def derive_window_sizes(
    base: int,
    encoder_strides: list[int],
    decoder_strides: list[int],
    halve: bool = True,
) -> list[int]:
    """Sliding window of each decoder transformer stage, as the reference builds it.

    The reference threads one window through the *encoder* first (halved at every stride-2 conv)
    and the decoder continues from there, doubling after every stride-2 conv: 16 → [2, 4, 8, 16].
    """
    window = base
    if halve:
        for stride in encoder_strides:
            window = window // 2 if stride > 1 else window
    windows = []
    for i, stride in enumerate(decoder_strides):
        window = window * 2 if halve and stride > 1 else window  # conv i comes before stage i
        windows.append(window)
    return windows


@dataclass
class CodecConfig(FromDict):
    dim: int = 1024
    hidden_dim: int = 4096
    head_dim: int = 128
    n_heads: int = 8
    n_kv_heads: int = 8
    norm_eps: float = 0.01
    qk_norm_eps: float = 1e-6
    patch_size: int = 240
    output_kernel_size: int = 7
    semantic_codebook_size: int = 8192
    semantic_dim: int = 256
    acoustic_codebook_size: int = 21
    acoustic_dim: int = 36
    transformer_lengths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    conv_kernels: list[int] = field(default_factory=lambda: [3, 4, 4, 4])
    conv_strides: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    window_sizes: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    sampling_rate: int = 24000

    def __post_init__(self):
        lists = (self.transformer_lengths, self.conv_kernels, self.conv_strides, self.window_sizes)
        if len(set(map(len, lists))) != 1:
            raise ValueError(
                "transformer_lengths, conv_kernels, conv_strides and window_sizes must have the "
                f"same length, got {[len(v) for v in lists]}."
            )
        if self.conv_strides[0] != 1:
            raise ValueError(
                f"conv_strides[0] must be 1 (decoder input conv), got {self.conv_strides[0]}."
            )
        if self.samples_per_frame > MAX_SAMPLES_PER_FRAME:
            raise ValueError(
                f"patch_size × the conv strides gives {self.samples_per_frame} samples per frame; "
                f"at most {MAX_SAMPLES_PER_FRAME} are supported (the release has 1920)."
            )

    @classmethod
    def from_params(cls, args: dict, source="params.json",
                    section: str = "multimodal.audio_tokenizer_args") -> "CodecConfig":
        """From params.json["multimodal"]["audio_tokenizer_args"], every field checked.

        Raises:
            CheckpointError: naming ``source`` and the field for a missing, mistyped, out of
                range or unsupported value.
        """
        args = section_dict(args, source, section)
        for key, value in _FIXED_PARAMS.items():
            if args.get(key, value) != value or type(args.get(key, value)) is not type(value):
                raise file_error(source, f"{field_path(section, key)} is {quoted(args[key])}; "
                                         f"only {json.dumps(value)} is supported")

        def scalar(key, default, as_field):
            try:
                return check_field(as_field, args.get(key, default), type(default))
            except FieldError as e:
                raise file_error(source, f"{field_path(section, key)} {e.problem}") from None

        strides = _int_list(args, "decoder_convs_strides_str", "1,2,2,2", source, section)
        windows = derive_window_sizes(
            scalar("attn_sliding_window_size", 16, "window_sizes"),
            _int_list(args, "encoder_convs_strides_str", "2,2,2,1", source, section),  # absent in the release
            strides,
            scalar("half_attn_window_upon_downsampling", True, "half_attn_window_upon_downsampling"),
        )
        renamed = {
            "patch_size": args.get("pretransform_patch_size", 240),
            "output_kernel_size": args.get("patch_proj_kernel_size", 7),
            "transformer_lengths": _int_list(args, "decoder_transformer_lengths_str", "2,2,2,2", source, section),
            "conv_kernels": _int_list(args, "decoder_convs_kernels_str", "3,4,4,4", source, section),
            "conv_strides": strides,
            "window_sizes": windows,
        }
        aliases = {
            "patch_size": "pretransform_patch_size",
            "output_kernel_size": "patch_proj_kernel_size",
            "transformer_lengths": "decoder_transformer_lengths_str",
            "conv_kernels": "decoder_convs_kernels_str",
            "conv_strides": "decoder_convs_strides_str",
            "window_sizes": "window_sizes (from attn_sliding_window_size)",
        }
        return cls.from_dict({**args, **renamed}, source, section, aliases, required=_REQUIRED_PARAMS)

    @property
    def samples_per_frame(self) -> int:
        return self.patch_size * math.prod(self.conv_strides)

    @property
    def latent_dim(self) -> int:
        return self.semantic_dim + self.acoustic_dim


class SemanticCodebook(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        # embedding_sum / max(cluster_usage, 1e-5) from the checkpoint, folded by sanitize_codec
        self.embedding = mx.zeros((size, dim))


class Quantizer(nn.Module):
    """Codes without the +2 offset (B, T, 1 + acoustic_dim) → float32 latent (B, T, latent_dim)."""

    def __init__(self, config: CodecConfig):
        super().__init__()
        size, dim = config.semantic_codebook_size, config.semantic_dim
        self.semantic_codebook = SemanticCodebook(size, dim)
        self._levels = config.acoustic_codebook_size

    def __call__(self, codes: mx.array) -> mx.array:
        semantic = self.semantic_codebook.embedding[codes[..., 0]].astype(mx.float32)
        # FSQ level → [−1, 1], rounded like the reference: (c·2) / (levels − 1) − 1
        acoustic = (codes[..., 1:] * 2).astype(mx.float32) / (self._levels - 1) - 1
        return mx.concatenate([semantic, acoustic], axis=-1)


class CodecCache:
    """Streaming state for `Codec.decode`; the Codec itself holds none.

    `blocks[i]` belongs to `decoder_blocks[i]`: a ConvState (conv tail) or, for a transformer
    stage, one KVWindow per layer. `output` is output_proj's ConvState. `frames` counts the
    frames decoded so far.
    """

    def __init__(self, blocks: list, output: ConvState):
        self.blocks = blocks
        self.output = output
        self.frames = 0

    @property
    def state(self) -> list[mx.array]:
        """Every array held, e.g. for `mx.eval(audio, cache.state)` between chunks."""
        arrays = []
        for s in [*self.blocks, self.output]:
            for item in s if isinstance(s, list) else [s]:
                if isinstance(item, KVWindow) and item.keys is not None:
                    arrays += [item.keys, item.values]
                elif isinstance(item, ConvState) and item.tail is not None:
                    arrays.append(item.tail)
        return arrays


class Codec(nn.Module):
    def __init__(self, config: CodecConfig):
        super().__init__()
        c = config
        self.config = c
        self.chunk_frames = DEFAULT_CHUNK_FRAMES
        layer_args = dict(
            dim=c.dim,
            hidden_dim=c.hidden_dim,
            n_heads=c.n_heads,
            n_kv_heads=c.n_kv_heads,
            head_dim=c.head_dim,
            norm_eps=c.norm_eps,
            qk_norm_eps=c.qk_norm_eps,
        )
        self.quantizer = Quantizer(c)
        # Same block list as the reference, so checkpoint indices match: conv, stage, (conv, stage)…
        blocks = [CausalConv1d(c.latent_dim, c.dim, c.conv_kernels[0], "replicate")]
        n_stages = len(c.transformer_lengths)
        for i, (n_layers, window) in enumerate(zip(c.transformer_lengths, c.window_sizes)):
            blocks.append(TransformerStage(n_layers, window, **layer_args))
            if i + 1 < n_stages and (c.conv_kernels[i + 1] != 1 or c.conv_strides[i + 1] != 1):
                kernel, stride = c.conv_kernels[i + 1], c.conv_strides[i + 1]
                blocks.append(CausalConvTranspose1d(c.dim, c.dim, kernel, stride))
        self.decoder_blocks = blocks
        self.output_proj = CausalConv1d(c.dim, c.patch_size, c.output_kernel_size, "reflect")

    def make_cache(self) -> CodecCache:
        blocks = [b.make_cache() for b in self.decoder_blocks]
        return CodecCache(blocks, self.output_proj.make_cache())

    def decode(self, codes: mx.array, cache: CodecCache | None = None) -> mx.array:
        """Decode frames of emitted codes to audio.

        Args:
            codes: (B, T, 1 + acoustic_dim) ints, as emitted (with the +2 special offset), already
                cut before END_AUDIO.
            cache: from `make_cache()`; consecutive calls with it continue one utterance and give
                the same samples as a single call. None decodes a whole utterance.

        Returns:
            (B, T · samples_per_frame) float32 waveform.
        """
        B, T = self._check(codes)
        if T == 0:
            return mx.zeros((B, 0), dtype=mx.float32)
        patches = self._run(codes, cache, keep_all=False)[-1]
        return patches.reshape(B, -1).astype(mx.float32)

    def decode_blocks(self, codes: mx.array, cache: CodecCache | None = None) -> list[mx.array]:
        """Like `decode`, but returns every intermediate (B, L, C): the latent, the output of each
        decoder block, and output_proj's patches (B, 8T, patch_size)."""
        _, T = self._check(codes)
        if T == 0:
            raise ValueError("decode_blocks needs at least one frame, got codes with T=0.")
        return self._run(codes, cache, keep_all=True)

    def _check(self, codes: mx.array) -> tuple[int, int]:
        n = 1 + self.config.acoustic_dim
        if codes.ndim != 3 or codes.shape[-1] != n:
            raise ValueError(f"codes must have shape (B, T, {n}), got {tuple(codes.shape)}.")
        return codes.shape[0], codes.shape[1]

    def _run(self, codes: mx.array, cache: CodecCache | None, keep_all: bool) -> list[mx.array]:
        cache = self.make_cache() if cache is None else cache
        steps = []
        for start in range(0, codes.shape[1], self.chunk_frames):
            outputs = self._step(codes[:, start : start + self.chunk_frames], cache)
            steps.append(outputs if keep_all else outputs[-1:])
        if len(steps) == 1:
            return steps[0]
        return [mx.concatenate(parts, axis=1) for parts in zip(*steps)]

    def _step(self, codes: mx.array, cache: CodecCache) -> list[mx.array]:
        x = self.quantizer(codes - 2)  # strip the [EMPTY_AUDIO]/[END_AUDIO] offset
        x = x.astype(self.decoder_blocks[0].conv.weight.dtype)
        outputs = [x]
        for block, state in zip(self.decoder_blocks, cache.blocks):
            x = block(x, state)
            outputs.append(x)
        outputs.append(self.output_proj(x, cache.output))  # (B, 8T, patch_size)
        cache.frames += codes.shape[1]
        return outputs


_WEIGHT_NORM = ".parametrizations.weight.original"


def _fold_weight_norm(g: mx.array, v: mx.array, transposed: bool) -> mx.array:
    """w = g·v/‖v‖ over all axes but axis 0 of the PyTorch tensor, then MLX layout (C_out, K, C_in).

    Axis 0 is C_out for Conv1d [C_out, C_in, K] but C_in for ConvTranspose1d [C_in, C_out, K].
    """
    v = v.astype(mx.float32)
    norm = mx.sqrt(mx.sum(v * v, axis=(1, 2), keepdims=True))
    w = v * (g.astype(mx.float32) / norm)
    return w.transpose(1, 2, 0) if transposed else w.swapaxes(1, 2)


def sanitize_codec(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Checkpoint codec tensors ("audio_tokenizer." already stripped) → `Codec` parameters.

    Folds weight norm (`*.conv.parametrizations.weight.original0/1` → `*.conv.weight`), folds the
    EMA semantic codebook (`embedding_sum`, `cluster_usage` → `embedding`, float32), and drops the
    unreleased encoder. Already-sanitized names pass through unchanged.
    """
    out = {}
    for name, value in weights.items():
        if name.startswith(("input_proj.", "encoder_blocks.")):
            continue
        if _WEIGHT_NORM in name:
            prefix = name.split(_WEIGHT_NORM)[0]  # e.g. "decoder_blocks.2.conv"
            if name.endswith("0"):
                continue  # folded together with original1
            g_name = prefix + _WEIGHT_NORM + "0"
            if g_name not in weights:
                raise ValueError(f"{name} has no weight-norm gain {g_name}.")
            # decoder_blocks.0 is the Conv1d input conv; later decoder convs are ConvTranspose1d
            transposed = prefix.startswith("decoder_blocks.") and prefix.split(".")[1] != "0"
            out[prefix + ".weight"] = _fold_weight_norm(weights[g_name], value, transposed)
        elif name == "quantizer.semantic_codebook.embedding_sum":
            usage = weights["quantizer.semantic_codebook.cluster_usage"].astype(mx.float32)
            out["quantizer.semantic_codebook.embedding"] = (
                value.astype(mx.float32) / mx.maximum(usage, 1e-5)[:, None]
            )
        elif name != "quantizer.semantic_codebook.cluster_usage":
            out[name] = value
    for name in weights:
        if name.endswith(_WEIGHT_NORM + "0") and name[:-1] + "1" not in weights:
            raise ValueError(f"{name} has no weight-norm direction {name[:-1] + '1'}.")
    return out
