"""Model packs in mlx-audio's Voxtral layout (the mlx-community conversions), read onto our model.

mlx-audio 0.6.2 wrote ``mlx-community/Voxtral-4B-TTS-2603-mlx-{bf16,6bit,4bit}``. Such a pack
holds ``config.json`` (the release's params.json content plus ``quantization``),
``model*.safetensors`` in mlx-audio's module names, ``tekken.json`` and
``voice_embedding/<voice>.{safetensors,pt}``. Its tensors are the release's own values, renamed
and (for the quantized packs) quantized, but not otherwise transformed: weight norm is not
folded, convs keep the release's axes, and the semantic codebook is still ``embedding_sum`` /
``cluster_usage``. So reading a pack is a rename plus the codec transforms our converter applies
(``sanitize_codec``), done once here; the math stays ours.

mlx-audio quantizes every linear whose input width the group size divides, and the text
embedding table: that is the backbone's linears (our recipe too), the flow-matching
transformer's linears (our ``acoustic`` recipe) and also the text embedding table and the
semantic head, which our recipe never quantizes. Those two are dequantized here (the table to
the pack's float dtype, the semantic head to float32). Dequantizing cannot undo the rounding
the pack already has: a quantized semantic head may pick a different semantic code than the
release would.

``is_mlx_audio_pack(folder)`` recognises the layout (``is_mlx_audio_config`` from config.json
alone, before a download); ``read_mlx_audio_pack(folder)`` checks
every tensor name, shape and dtype against config.json before loading anything, and returns our
``ModelConfig`` (with the quantization recipe set), the weights in our names, the voices and a
one-line description for the load log.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from .backbone import backbone_key
from .checkpoint import expected_tensors, read_safetensors_header
from .codec import sanitize_codec
from .config import QUANT_BITS, QUANT_GROUP_SIZES, VOICE_NAME
from .errors import CheckpointError, file_error, quoted
from .untrusted_files import MAX_CONFIG_BYTES, read_json
from .model import FLOAT32_KEYS, ModelConfig, in_quant_recipe
from .model_layout import (
    CONFIG_FILE,
    DOWNLOAD_PATTERNS,
    INDEX_FILE,
    MLX_AUDIO,
    RELEASE_VOICES_DIR,
    config_layout,
    detect_layout,
)
from .pt_reader import read_pt_tensor
from .voice_file import MAX_VOICE_FILE_BYTES, check_voice_embedding, read_voice_file

VOICES_DIR = RELEASE_VOICES_DIR
# What to download from the Hub for a pack (and nothing else: mlx-audio's converter also copies
# the release's params.json, and may copy its 8 GB consolidated.safetensors, beside the weights).
PACK_PATTERNS = DOWNLOAD_PATTERNS[MLX_AUDIO]

MAX_VOICES = 256
_FLOAT_DTYPES = {"BF16", "F16", "F32"}

# mlx-audio's module names → ours (the flow head and the codec keep the release's names in both).
_THEIR_BACKBONE = "language_model.model.model."
_THEIR_AUDIO_EMBEDDINGS = "audio_codebook_embeddings.embeddings.weight"
_RELEASE_AUDIO_EMBEDDINGS = "mm_audio_embeddings.audio_codebook_embeddings.embeddings.weight"
_CODEC = "audio_tokenizer."
_EMBEDDING_LAYERS = ("backbone.embed_tokens", "audio_embeddings")  # nn.Embedding in our model


class MlxAudioPack(NamedTuple):
    """What ``read_mlx_audio_pack`` returns: enough for ``Model(config)`` + a strict load.

    ``weights`` are in our parameter names; the layers with ``.scales`` are exactly those that
    ``nn.quantize(model, group_size, bits, class_predicate=lambda p, m:
    model.quant_predicate(p, m) and f"{p}.scales" in weights)`` quantizes, as ``loading.load``
    does. ``quantization`` is ``config.quantization`` ({bits, group_size, acoustic} or None).
    """

    config: ModelConfig
    weights: dict[str, mx.array]
    voices: dict[str, mx.array]
    quantization: dict | None
    description: str


def _read_config(path: Path) -> dict:
    """config.json as a dict (bounded, regular file, valid JSON); CheckpointError naming it."""
    return read_json(path / CONFIG_FILE)


def is_mlx_audio_config(path: str | Path) -> bool:
    """Whether ``path``/config.json has the release's params.json shape, as mlx-audio's packs do
    (``model_layout.config_layout``): enough to choose what to download after fetching it alone."""
    return config_layout(path) == MLX_AUDIO


def is_mlx_audio_pack(path: str | Path) -> bool:
    """Whether ``path`` is a folder in mlx-audio's Voxtral layout: such a config.json, and weights.

    A release folder someone gave a config.json (to feed mlx-audio's converter) is not a pack.
    """
    return detect_layout(path) == MLX_AUDIO


def _model_config(raw: dict, source: Path) -> ModelConfig:
    try:
        return ModelConfig.from_params(raw)
    except CheckpointError as e:  # names params.json, whose content config.json carries
        raise file_error(source, str(e).removeprefix("params.json: ")) from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise file_error(source, f"not the params.json layout of a Voxtral pack "
                                 f"({type(e).__name__}: {quoted(str(e))})") from None


def _quantization(raw: dict, source: Path) -> dict | None:
    """The pack's ``quantization`` block checked: None, or {bits, group_size} (affine, uniform)."""
    q = raw.get("quantization", raw.get("quantization_config"))
    if q is None:
        return None
    if not isinstance(q, dict):
        raise file_error(source, f"quantization is {quoted(q)}; expected an object with bits and group_size")
    for key, choices in (("bits", QUANT_BITS), ("group_size", QUANT_GROUP_SIZES)):
        value = q.get(key)
        if isinstance(value, bool) or value not in choices:
            problem = "is missing" if key not in q else f"is {quoted(value)}"
            raise file_error(source, f"quantization.{key} {problem}; expected one of {', '.join(map(str, choices))}")
    mode = q.get("mode", "affine")  # mlx-audio 0.6.2 writes it; earlier converters did not
    if mode != "affine":
        raise file_error(source, f"quantization.mode is {quoted(mode)}; only 'affine' packs are supported")
    for layer, entry in q.items():  # mixed-bit recipes record their layers one by one
        if isinstance(entry, dict) and (entry.get("bits"), entry.get("group_size")) != (q["bits"], q["group_size"]):
            raise file_error(source, f"quantization.{quoted(layer)} sets its own bits/group size; "
                                     "mixed-precision packs are not supported")
    return {"bits": q["bits"], "group_size": q["group_size"]}


def _their_name(release_name: str) -> str:
    """The name mlx-audio's sanitize gives a release tensor."""
    if release_name == _RELEASE_AUDIO_EMBEDDINGS:
        return _THEIR_AUDIO_EMBEDDINGS
    if (key := backbone_key(release_name)) is not None:
        return _THEIR_BACKBONE + key
    return release_name


def expected_pack_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a pack and its float shape (before quantization), in mlx-audio's names."""
    return {_their_name(n): shape for n, shape in expected_tensors(config).items()}


def _our_name(their_name: str) -> str:
    """Our parameter name for a non-codec pack tensor (the codec is renamed by sanitize_codec)."""
    if their_name == _THEIR_AUDIO_EMBEDDINGS:
        return "audio_embeddings.weight"
    if their_name.startswith(_THEIR_BACKBONE):
        return "backbone." + their_name[len(_THEIR_BACKBONE):]
    return their_name


def _weight_files(path: Path) -> tuple[list[Path], Path]:
    """The weight files (those the index lists, when there is one) and the file to name in errors."""
    index = path / INDEX_FILE
    if not index.is_file():
        files = sorted(path.glob("model*.safetensors"))
        if not files:
            raise file_error(path, "holds no model*.safetensors weights")
        return files, files[0] if len(files) == 1 else path
    weight_map = read_json(index, 16 * MAX_CONFIG_BYTES).get("weight_map")
    if not isinstance(weight_map, dict):
        raise file_error(index, "is not a safetensors index with a weight_map")
    names = sorted(set(weight_map.values()), key=str)
    for name in names:
        if not isinstance(name, str) or "/" in name or "\\" in name or not name.endswith(".safetensors"):
            raise file_error(index, f"weight_map names {quoted(name)}, not a .safetensors file beside it")
        if not (path / name).is_file():
            raise file_error(index, f"lists {name}, which is missing (an interrupted download?)")
    return [path / n for n in names], index


def _shown(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f", … ({len(names)} in all)" if len(names) > 6 else "")


def check_pack_header(header: dict[str, dict], expected: dict[str, tuple], q: dict | None,
                      source: Path, config_file: Path) -> list[str]:
    """The pack's quantized layers (mlx-audio's names), after refusing, in one CheckpointError
    naming ``source``, missing, unexpected, mis-shaped or mis-typed tensors.

    ``header`` is every weight file's safetensors table together; ``expected`` is
    ``expected_pack_tensors(config)``; ``q`` the pack's checked {bits, group_size} or None.
    """
    quantized = sorted(n[: -len(".scales")] for n in header if n.endswith(".scales"))
    if quantized and q is None:
        raise file_error(config_file, f"has no quantization block with bits and group_size, but the weights "
                                      f"are quantized ({quantized[0]}.scales in {source.name})")
    missing, unexpected, bad = [], [], []
    for layer in quantized:
        out_in = expected.get(layer + ".weight")
        if out_in is None or len(out_in) != 2:
            unexpected.append(layer + ".scales")
            continue
        (n_out, n_in), bits, gs = out_in, q["bits"], q["group_size"]
        for suffix, shape, dtypes in ((".weight", (n_out, n_in * bits // 32), {"U32"}),
                                      (".scales", (n_out, n_in // gs), _FLOAT_DTYPES),
                                      (".biases", (n_out, n_in // gs), _FLOAT_DTYPES)):
            t = header.get(layer + suffix)
            if t is None:
                missing.append(layer + suffix)
            elif tuple(t["shape"]) != shape or t["dtype"] not in dtypes:
                bad.append(f"{layer}{suffix} {t['dtype']} {tuple(t['shape'])} "
                           f"(expected {shape}, {bits}-bit group {gs})")
    quantized_names = {layer + s for layer in quantized for s in (".weight", ".scales", ".biases")}
    for name, shape in expected.items():
        t = header.get(name)
        if t is None:
            missing.append(name)
        elif name not in quantized_names and (tuple(t["shape"]) != shape or t["dtype"] not in _FLOAT_DTYPES):
            bad.append(f"{name} {t['dtype']} {tuple(t['shape'])} (expected {shape})")
    unexpected += sorted(set(header) - set(expected) - quantized_names)
    problems = [f"{label}: {_shown(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape or dtype", bad)) if names]
    if problems:
        raise file_error(source, f"does not match {CONFIG_FILE} ({len(header)} tensors) — " + "; ".join(problems))
    return quantized


def _kept_quantized(recipe: dict, our_layer: str, n_in: int) -> bool:
    """Whether our recipe quantizes this layer too (else it is dequantized at load)."""
    if our_layer in _EMBEDDING_LAYERS:
        return False
    # in_quant_recipe looks only at the module's type and input width: a lazy 1-row probe
    # (never evaluated) lets the one recipe predicate decide, rather than a copy of it.
    return in_quant_recipe(recipe, our_layer, nn.Linear(n_in, 1, bias=False))


def split_quantized(quantized: list[str], expected: dict[str, tuple], q: dict | None):
    """Our recipe for a pack's quantized layers, and which of them (our names) it keeps or not.

    Args:
        quantized: the pack's quantized layers, in mlx-audio's names (those with ``.scales``).
        expected: every tensor's float shape, in mlx-audio's names.
        q: the pack's {bits, group_size}.

    Returns:
        (recipe, kept, dequantized): ``recipe`` is our {bits, group_size, acoustic} (acoustic
        when mlx-audio quantized flow-transformer layers our recipe can hold quantized) or None;
        ``kept`` the layers our model quantizes the same way; ``dequantized`` those it holds in
        float (the text embedding table, the semantic head).
    """
    if not quantized:
        return None, [], []
    layers = {their: _our_name(their + ".weight")[: -len(".weight")] for their in quantized}
    n_in = {their: expected[their + ".weight"][1] for their in quantized}
    flow = {**q, "acoustic": True}
    recipe = {**q, "acoustic": any(ours.startswith("acoustic_transformer.")
                                   and _kept_quantized(flow, ours, n_in[their])
                                   for their, ours in layers.items())}
    kept = [ours for their, ours in layers.items() if _kept_quantized(recipe, ours, n_in[their])]
    return recipe, kept, [ours for ours in layers.values() if ours not in kept]


def _read_voices(path: Path, dim: int, voice_rows: dict[str, int] | None) -> dict[str, mx.array]:
    """voice_embedding/<name>.safetensors (what mlx-audio reads), else <name>.pt (the release's).

    The .pt files are read without unpickling (``pt_reader``); every voice is checked for
    shape, row count (when ``voice_rows`` gives it) and finite values.
    """
    folder = path / VOICES_DIR
    if not folder.is_dir():
        return {}
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.pt"))
    voices: dict[str, mx.array] = {}
    for f in files:
        name = f.stem
        if name in voices:
            continue  # the .safetensors of this voice was read already
        if not VOICE_NAME.fullmatch(name):
            raise file_error(f, "is not a valid voice name (1 to 64 letters, digits or '_')")
        if len(voices) == MAX_VOICES:
            raise file_error(folder, f"holds more than {MAX_VOICES} voices")
        rows = (voice_rows or {}).get(name)
        if f.suffix == ".pt":
            try:
                emb = read_pt_tensor(f)
            except ValueError as e:  # PtFormatError: its message names the file
                raise CheckpointError(str(e)) from None
            check_voice_embedding(emb, dim, f, rows)
        else:
            emb = _read_safetensors_voice(f, dim, rows)
        voices[name] = emb
    return voices


def _read_safetensors_voice(f: Path, dim: int, rows: int | None) -> mx.array:
    """Key ``embedding``, or a file's only tensor (mlx-audio accepts either)."""
    if f.stat().st_size > MAX_VOICE_FILE_BYTES:
        raise file_error(f, f"voice file is larger than {MAX_VOICE_FILE_BYTES} bytes")
    header = read_safetensors_header(f)
    if "embedding" in header or len(header) != 1:
        return read_voice_file(f, dim, rows)[0]  # names what is missing when there is no 'embedding'
    (entry,) = header.values()
    if entry.get("dtype") not in _FLOAT_DTYPES:
        raise file_error(f, f"voice tensor has dtype {quoted(entry.get('dtype'))}; expected a float")
    emb = next(iter(mx.load(str(f)).values()))
    check_voice_embedding(emb, dim, f, rows)
    return emb


# Rows dequantized per evaluation: MLX's CPU dequantize of the whole 131072-row text embedding
# needed 4 GB of temporaries for a 0.8 GB result (benchmarks/bench_first_use.py); in blocks the
# temporaries are a block's.
DEQUANTIZE_ROWS = 8192


def _dequantize_rows(w, scales, biases, group_size: int, bits: int, dtype) -> mx.array:
    """``mx.dequantize`` of a quantized layer, cast to ``dtype``, a block of rows at a time."""
    blocks = []
    for start in range(0, w.shape[0], DEQUANTIZE_ROWS):
        rows = slice(start, start + DEQUANTIZE_ROWS)
        block = mx.dequantize(w[rows], scales[rows], biases[rows], group_size=group_size, bits=bits).astype(dtype)
        mx.eval(block)
        blocks.append(block)
    return mx.concatenate(blocks) if len(blocks) > 1 else blocks[0]


def read_mlx_audio_pack(path: str | Path, voice_rows: dict[str, int] | None = None) -> MlxAudioPack:
    """Read a folder in mlx-audio's Voxtral layout onto our model, once.

    Args:
        path: the pack folder (``is_mlx_audio_pack(path)`` is true).
        voice_rows: each preset's row count from tekken.json (``Tokenizer.voice_num_audio_tokens``),
            to check the voice files against; None checks only their width.

    Returns:
        ``MlxAudioPack``: build ``Model(pack.config)``, quantize as ``loading.load`` does when
        ``pack.quantization`` is set, then ``load_weights(list(pack.weights.items()), strict=True)``.

    Raises:
        CheckpointError: one line naming the file and the field or tensors at fault (a missing
            tensor, a shape that config.json does not imply, quantized weights without a
            ``quantization`` block, a damaged voice file, ...).
    """
    path = Path(path)
    config_file = path / CONFIG_FILE
    raw = _read_config(path)
    config = _model_config(raw, config_file)
    q = _quantization(raw, config_file)
    files, source = _weight_files(path)
    header: dict[str, dict] = {}
    for f in files:
        for name, entry in read_safetensors_header(f).items():
            if name in header:
                raise file_error(f, f"repeats tensor {name}, already in another weight file")
            header[name] = entry
    expected = expected_pack_tensors(config)
    quantized = check_pack_header(header, expected, q, source, config_file)

    loaded: dict[str, mx.array] = {}
    for f in files:
        loaded.update(mx.load(str(f)))
    weights, codec = {}, {}
    for name, w in loaded.items():
        if name.startswith(_CODEC):
            codec[name[len(_CODEC):]] = w
        else:
            weights[_our_name(name)] = w
    del loaded
    # The codec as our converter leaves it: weight norm folded, conv axes ours, codebook divided.
    weights.update({_CODEC + k: v for k, v in sanitize_codec(codec).items()})

    recipe, kept, dequantized = split_quantized(quantized, expected, q)
    dtype = weights["backbone.norm.weight"].dtype
    for layer in dequantized:
        parts = [weights.pop(layer + suffix) for suffix in (".weight", ".scales", ".biases")]
        weights[layer + ".weight"] = _dequantize_rows(*parts, q["group_size"], q["bits"],
                                                      mx.float32 if layer + ".weight" in FLOAT32_KEYS else dtype)
    # Our converter's cast: every float tensor in the pack's dtype (the codec's folded weights
    # come out of sanitize_codec in float32), except the semantic head and codebook, float32 (T9).
    weights = {k: v.astype(mx.float32 if k in FLOAT32_KEYS else dtype)
               if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    quantization = recipe if kept else None
    config.quantization = quantization

    voices = _read_voices(path, config.backbone.dim, voice_rows)
    config.voices = sorted(voices)
    dtypes = "/".join(sorted({t["dtype"] for t in header.values() if t["dtype"] != "U32"}))
    what = "plain"
    if quantized:
        what = f"{q['bits']}-bit group {q['group_size']}: {len(kept)} layers kept quantized"
        if dequantized:
            shown = ", ".join(f"{n} → {str(weights[n + '.weight'].dtype).removeprefix('mlx.core.')}"
                              for n in dequantized)
            what += f", dequantized at load: {shown}"
    description = (f"mlx-audio Voxtral pack {path.name} ({len(header)} tensors in {len(files)} file(s), "
                   f"{dtypes}; {what}; {len(voices)} voices)")
    return MlxAudioPack(config, weights, voices, quantization, description)
