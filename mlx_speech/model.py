"""The whole Voxtral TTS network: backbone, audio-code embeddings, flow-matching head, codec.

``ModelConfig`` reads either the original ``params.json`` (``from_params``) or our converted
``config.json`` (``from_dict``). ``Model.sanitize`` maps original checkpoint tensors to module
names and applies every one-time transform, so converted weights load with no work per call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import mlx.core as mx
import mlx.nn as nn

from .acoustic import CODE_OFFSET, AcousticConfig, FlowMatchingHead, _round_up
from .backbone import BackboneConfig, backbone_key, make_backbone, make_backbone_cache
from .codec import Codec, CodecConfig, sanitize_codec
from .prompt_cache import VoicePrefixCache

# Tensors kept in float32 whatever --dtype says: the semantic head (argmax over close logits,
# T9) and the codec's semantic codebook (divided in fp32 at conversion, T22).
FLOAT32_KEYS = (
    "acoustic_transformer.semantic_codebook_output.weight",
    "audio_tokenizer.quantizer.semantic_codebook.embedding",
)


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    acoustic: AcousticConfig = field(default_factory=AcousticConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    bos_token_id: int = 1
    audio_token_id: int = 24
    begin_audio_token_id: int = 25
    max_seq_len: int = 65536  # positions: prompt + generated frames
    voices: list[str] = field(default_factory=list)
    quantization: dict | None = None
    model_type: str = "voxtral_tts"

    @classmethod
    def from_params(cls, params: dict) -> "ModelConfig":
        """Map the original release's params.json (spec §2) onto our config."""
        mm = params["multimodal"]
        am = mm["audio_model_args"]
        at = dict(am["acoustic_transformer_args"])
        at.pop("norm_eps", None)  # absent in the release; the head uses the backbone's 1e-5
        acoustic = AcousticConfig.from_dict(
            {
                **at,
                "norm_eps": params.get("norm_eps", 1e-5),
                "semantic_codebook_size": am["semantic_codebook_size"],
                "acoustic_codebook_size": am["acoustic_codebook_size"],
                "n_acoustic_codebook": am["n_acoustic_codebook"],
            }
        )
        tok = mm["audio_tokenizer_args"]
        return cls(
            backbone=BackboneConfig.from_dict(params),
            acoustic=acoustic,
            codec=CodecConfig.from_params(tok),
            bos_token_id=mm.get("bos_token_id", 1),
            audio_token_id=am.get("audio_token_id", 24),
            begin_audio_token_id=am.get("begin_audio_token_id", 25),
            max_seq_len=params.get("max_seq_len", 65536),
            voices=sorted(tok.get("voice", {}), key=lambda v: tok["voice"][v]),
        )

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Read our config.json (unknown keys ignored)."""
        return cls(
            backbone=BackboneConfig.from_dict(d.get("backbone", {})),
            acoustic=AcousticConfig.from_dict(d.get("acoustic", {})),
            codec=CodecConfig.from_dict(d.get("codec", {})),
            bos_token_id=d.get("bos_token_id", 1),
            audio_token_id=d.get("audio_token_id", 24),
            begin_audio_token_id=d.get("begin_audio_token_id", 25),
            max_seq_len=d.get("max_seq_len", 65536),
            voices=list(d.get("voices", [])),
            quantization=d.get("quantization"),
            model_type=d.get("model_type", "voxtral_tts"),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def n_codebooks(self) -> int:
        return 1 + self.acoustic.n_acoustic_codebook

    @property
    def codebook_sizes(self) -> list[int]:
        """Rows per codebook in the audio embedding table, specials included (T13)."""
        a = self.acoustic
        return [a.semantic_codebook_size + CODE_OFFSET] + [
            a.acoustic_codebook_size + CODE_OFFSET
        ] * a.n_acoustic_codebook

    @property
    def audio_embedding_rows(self) -> int:
        return _round_up(sum(self.codebook_sizes), 128)  # 9022 → 9088 in the release

    @property
    def sample_rate(self) -> int:
        return self.codec.sampling_rate

    @property
    def samples_per_frame(self) -> int:
        return self.codec.samples_per_frame


def in_quant_recipe(quantization: dict, path: str, module: nn.Module,
                    backbone_prefix: str = "backbone.") -> bool:
    """Whether a quantization recipe covers the layer at ``path``: the backbone's linears (T35).

    The codec, the embedding tables (text prompt and code feedback) and the fp32 semantic head
    are never quantized; the flow-matching transformer's linears only when the recipe says
    ``acoustic: true``. ``backbone_prefix`` names the backbone in another module tree (the
    benchmark applies this recipe to mlx-audio's model).
    """
    if not isinstance(module, nn.Linear) or module.weight.shape[-1] % quantization.get("group_size", 64):
        return False  # input_projection (36 inputs) cannot be grouped; it is tiny anyway
    if path.startswith(backbone_prefix):
        return True
    return (
        quantization.get("acoustic", False)
        and path.startswith("acoustic_transformer.")
        and "semantic_codebook_output" not in path
    )


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = make_backbone(config.backbone)
        self.audio_embeddings = nn.Embedding(config.audio_embedding_rows, config.backbone.dim)
        self.acoustic_transformer = FlowMatchingHead(config.acoustic)
        self.audio_tokenizer = Codec(config.codec)
        offsets = [0]
        for size in config.codebook_sizes[:-1]:
            offsets.append(offsets[-1] + size)
        self._offsets = mx.array(offsets, dtype=mx.int32)  # [0, 8194, 8217, …]
        self._voices: dict[str, mx.array] = {}
        self.tokenizer = None  # set by load()
        self.voice_cache = VoicePrefixCache()  # KV state of each voice's prompt prefix

    # ---- voices ---------------------------------------------------------------------------
    def set_voices(self, voices: dict[str, mx.array]) -> None:
        self._voices = dict(voices)
        self.voice_cache.clear()

    @property
    def voices(self) -> list[str]:
        return sorted(self._voices)

    def voice(self, name: str) -> mx.array:
        """The preset's input-embedding rows (N, dim); unknown names list the valid ones."""
        if name not in self._voices:
            raise ValueError(f"unknown voice {name!r}; choose one of: {', '.join(self.voices)}")
        return self._voices[name]

    # ---- inputs to the backbone ------------------------------------------------------------
    def prompt_embeddings(self, ids: mx.array, voice: mx.array) -> mx.array:
        """Token embeddings (L, dim) with the [AUDIO] slots replaced, in order, by voice rows (T24)."""
        emb = self.backbone.embed_tokens(ids)
        is_audio = ids == self.config.audio_token_id
        n_slots = int(is_audio.sum().item())
        if n_slots != voice.shape[0]:
            raise ValueError(
                f"prompt has {n_slots} [AUDIO] slots but the voice has {voice.shape[0]} rows"
            )
        row = mx.maximum(mx.cumsum(is_audio.astype(mx.int32)) - 1, 0)
        return mx.where(is_audio[:, None], voice.astype(emb.dtype)[row], emb)

    def audio_code_embeddings(self, codes: mx.array) -> mx.array:
        """Sum of the 37 codebook rows of each frame: codes (..., 37) with the +2 offset → (..., dim)."""
        return self.audio_embeddings(codes + self._offsets).sum(axis=-2)

    def __call__(self, embeddings: mx.array, cache=None) -> mx.array:
        """Backbone: input embeddings (B, L, dim) → final-normed hidden states (B, L, dim)."""
        return self.backbone(None, cache=cache, input_embeddings=embeddings)

    def make_cache(self):
        return make_backbone_cache(self.config.backbone)

    # ---- weights ------------------------------------------------------------------------
    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Original checkpoint names → module names, with all one-time transforms applied.

        Idempotent: names that are already ours pass through unchanged.
        """
        out, codec = {}, {}
        for name, w in weights.items():
            if name.startswith("audio_tokenizer."):
                codec[name[len("audio_tokenizer."):]] = w
            elif name == "mm_audio_embeddings.audio_codebook_embeddings.embeddings.weight":
                out["audio_embeddings.weight"] = w
            elif (key := backbone_key(name)) is not None:
                out["backbone." + key] = w
            else:
                out[name] = w
        out.update({"audio_tokenizer." + k: v for k, v in sanitize_codec(codec).items()})
        return out

    def cast(self, weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
        """Cast floating weights to ``dtype``, keeping FLOAT32_KEYS in float32."""
        return {
            k: v.astype(mx.float32 if k in FLOAT32_KEYS else dtype)
            if mx.issubdtype(v.dtype, mx.floating)
            else v
            for k, v in weights.items()
        }

    def quant_predicate(self, path: str, module: nn.Module) -> bool:
        """Which layers ``--quantize`` touches (``in_quant_recipe`` with this model's recipe)."""
        return in_quant_recipe(self.config.quantization or {}, path, module)
