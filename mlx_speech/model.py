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
from .config import (
    MAX_VOICES,
    VOICE_NAME,
    FieldError,
    check_field,
    check_quantization,
    check_voice_name,
    field_path,
    section_dict,
)
from .errors import file_error, quoted
from .prompt_cache import VoicePrefixCache

# Tensors kept in float32 whatever --dtype says: the semantic head (argmax over close logits,
# T9) and the codec's semantic codebook (divided in fp32 at conversion, T22).
FLOAT32_KEYS = (
    "acoustic_transformer.semantic_codebook_output.weight",
    "audio_tokenizer.quantizer.semantic_codebook.embedding",
)


_REQUIRED_LAYER_FIELDS = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads")
_AM = "multimodal.audio_model_args."
_RELEASE_PATHS = {  # our field path -> params.json's, where the prefix rule below does not hold
    "acoustic.semantic_codebook_size": _AM + "semantic_codebook_size",
    "acoustic.acoustic_codebook_size": _AM + "acoustic_codebook_size",
    "acoustic.n_acoustic_codebook": _AM + "n_acoustic_codebook",
    "bos_token_id": "multimodal.bos_token_id",
    "audio_token_id": _AM + "audio_token_id",
    "begin_audio_token_id": _AM + "begin_audio_token_id",
}
_RELEASE_PREFIXES = {"backbone": "", "acoustic": _AM + "acoustic_transformer_args.",
                     "codec": "multimodal.audio_tokenizer_args."}


def _release_path(path: str) -> str:
    """Where params.json keeps the field that our config calls ``path``."""
    part, _, name = path.partition(".")
    return _RELEASE_PATHS.get(path) or _RELEASE_PREFIXES[part] + name


_MISSING = object()


def _param(d: dict, key: str, source, section: str, default=_MISSING, bounds: str | None = None):
    """``d[key]`` (or ``default``) checked as the ModelConfig / sub-config field of that name."""
    if key not in d and default is _MISSING:
        raise file_error(source, f"{field_path(section, key)} is missing")
    value = d.get(key, default)
    hint = float if isinstance(default, float) or key == "norm_eps" else int
    try:
        return check_field(bounds or key, value, hint)
    except FieldError as e:
        raise file_error(source, f"{field_path(section, key)} {e.problem}") from None


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
    def from_params(cls, params: dict, source="params.json") -> "ModelConfig":
        """Map the original release's params.json (spec §2) onto our config, every field checked.

        Raises:
            CheckpointError: "<source>: <field path> …" for a missing section or field, a value
                of the wrong type or out of range, or parts that do not fit together.
        """
        params = section_dict(params, source, "")
        mm = section_dict(params.get("multimodal"), source, "multimodal")
        am_path = "multimodal.audio_model_args"
        am = section_dict(mm.get("audio_model_args"), source, am_path)
        at_path = f"{am_path}.acoustic_transformer_args"
        at = dict(section_dict(am.get("acoustic_transformer_args"), source, at_path))
        at.pop("norm_eps", None)  # absent in the release; the head uses the backbone's 1e-5
        codes = {k: _param(am, k, source, am_path)
                 for k in ("semantic_codebook_size", "acoustic_codebook_size", "n_acoustic_codebook")}
        acoustic = AcousticConfig.from_dict(
            {**at, "norm_eps": _param(params, "norm_eps", source, "", 1e-5), **codes},
            source, at_path, required=_REQUIRED_LAYER_FIELDS + ("input_dim",),
        )
        tok_path = "multimodal.audio_tokenizer_args"
        tok = section_dict(mm.get("audio_tokenizer_args"), source, tok_path)
        voices = section_dict(tok.get("voice", {}), source, f"{tok_path}.voice")
        for name, index in voices.items():
            check_voice_name(name, source, f"{tok_path}.voice")
            _param(voices, name, source, f"{tok_path}.voice", bounds="voice index")
        config = cls(
            backbone=BackboneConfig.from_dict(params, source, "", required=_REQUIRED_LAYER_FIELDS + ("vocab_size",)),
            acoustic=acoustic,
            codec=CodecConfig.from_params(tok, source, tok_path),
            bos_token_id=_param(mm, "bos_token_id", source, "multimodal", 1),
            audio_token_id=_param(am, "audio_token_id", source, am_path, 24),
            begin_audio_token_id=_param(am, "begin_audio_token_id", source, am_path, 25),
            max_seq_len=_param(params, "max_seq_len", source, "", 65536),
            voices=sorted(voices, key=lambda v: voices[v]),
        )
        config.check(source, release=True)
        return config

    @classmethod
    def from_dict(cls, d: dict, source="config.json") -> "ModelConfig":
        """Read our config.json (unknown keys ignored, missing ones default), every field checked.

        Raises:
            CheckpointError: "<source>: <field path> …" for a value of the wrong type or out of
                range, a foreign ``model_type``, or parts that do not fit together.
        """
        d = section_dict(d, source, "")
        model_type = d.get("model_type", "voxtral_tts")
        if model_type != "voxtral_tts":
            raise file_error(source, f"model_type is {quoted(model_type)}; this loader reads 'voxtral_tts' models")
        voices = d.get("voices", [])
        if not isinstance(voices, list) or len(voices) > MAX_VOICES:
            raise file_error(source, f"voices is {quoted(voices)}; expected a list of voice names")
        config = cls(
            backbone=BackboneConfig.from_dict(d.get("backbone", {}), source, "backbone"),
            acoustic=AcousticConfig.from_dict(d.get("acoustic", {}), source, "acoustic"),
            codec=CodecConfig.from_dict(d.get("codec", {}), source, "codec"),
            bos_token_id=_param(d, "bos_token_id", source, "", 1),
            audio_token_id=_param(d, "audio_token_id", source, "", 24),
            begin_audio_token_id=_param(d, "begin_audio_token_id", source, "", 25),
            max_seq_len=_param(d, "max_seq_len", source, "", 65536),
            voices=[check_voice_name(v, source, "voices") for v in voices],
            quantization=check_quantization(d.get("quantization"), source),
            model_type=model_type,
        )
        config.check(source)
        return config

    def check(self, source="config.json", release: bool = False) -> None:
        """Refuse parts that do not fit together (each part's fields are checked on reading).

        ``release``: name the fields as params.json spells them.
        """
        b, a, c = self.backbone, self.acoustic, self.codec
        rules = [
            (b.n_heads % b.n_kv_heads == 0, "backbone.n_heads", "a multiple of", "backbone.n_kv_heads"),
            (a.n_heads % a.n_kv_heads == 0, "acoustic.n_heads", "a multiple of", "acoustic.n_kv_heads"),
            (c.n_heads % c.n_kv_heads == 0, "codec.n_heads", "a multiple of", "codec.n_kv_heads"),
            (a.input_dim == b.dim, "acoustic.input_dim", "equal to", "backbone.dim"),
            (a.semantic_codebook_size == c.semantic_codebook_size, "acoustic.semantic_codebook_size",
             "equal to", "codec.semantic_codebook_size"),
            (a.acoustic_codebook_size == c.acoustic_codebook_size, "acoustic.acoustic_codebook_size",
             "equal to", "codec.acoustic_codebook_size"),
            (a.n_acoustic_codebook == c.acoustic_dim, "acoustic.n_acoustic_codebook", "equal to", "codec.acoustic_dim"),
        ] + [
            (getattr(self, k) < b.vocab_size, k, "below", "backbone.vocab_size")
            for k in ("bos_token_id", "audio_token_id", "begin_audio_token_id")
        ]
        name = _release_path if release else (lambda path: path)
        for ok, path, relation, other in rules:
            if not ok:
                raise file_error(source, f"{name(path)} must be {relation} {name(other)}")

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

    def add_voice(self, name: str, embedding) -> None:
        """Make ``embedding`` (rows, dim) speakable as ``voice=name``, like a preset.

        The rows are checked (the model's width, 1 to ``voice_file.MAX_VOICE_ROWS`` rows,
        finite); a name already in use is replaced and its cached prompt prefix dropped.

        Raises:
            ValueError: a name that is not letters, digits and ``_`` (at most 64), or rows the
                check refuses (``CheckpointError``).
        """
        from .voice_file import check_voice_embedding

        if not isinstance(name, str) or not VOICE_NAME.fullmatch(name):
            raise ValueError(f"voice name {name!r} must be 1 to 64 letters, digits or '_'")
        rows = mx.array(embedding)
        check_voice_embedding(rows, self.config.backbone.dim, f"voice {name!r}")
        self._voices[name] = rows
        self.voice_cache.forget(name)

    @property
    def voices(self) -> list[str]:
        return sorted(self._voices)

    def voice(self, name: str) -> mx.array:
        """The rows (N, dim) of a voice the model knows; unknown names list the valid ones."""
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
