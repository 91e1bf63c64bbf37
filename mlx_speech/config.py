"""What every part's config dataclass shares: building it from a dictionary, every field checked.

Config dictionaries come from files anyone can edit (the release's ``params.json``, a model
folder's ``config.json``), and their sizes decide how much is allocated, so every field is
type- and range-checked here before anything is built: a ``"n_layers": 1000000`` or a
``"dim": "64"`` is refused in microseconds, naming the file and the field, instead of building
a million layers or failing deep inside MLX. A field name means the same thing in every config
(``dim`` is a width wherever it appears), so one bounds table serves them all.
"""

from __future__ import annotations

import math
import os
import re
import typing
from dataclasses import fields
from typing import Self

from .errors import file_error, quoted

MAX_DIM = 65536
MAX_LAYERS = 256
MAX_LIST_LENGTH = 16  # codec stages

# Inclusive integer ranges by field name (for list fields: of each element). Generous: the real
# model is well inside them, while a value beyond them is an edit, not a model.
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "dim": (1, MAX_DIM),
    "input_dim": (1, MAX_DIM),
    "hidden_dim": (1, MAX_DIM),
    "head_dim": (1, MAX_DIM),
    "semantic_dim": (1, MAX_DIM),
    "acoustic_dim": (1, MAX_DIM),
    "n_layers": (1, MAX_LAYERS),
    "n_heads": (1, 1024),
    "n_kv_heads": (1, 1024),
    "vocab_size": (1, 1 << 20),
    "semantic_codebook_size": (1, 1 << 20),
    "acoustic_codebook_size": (2, 1 << 16),  # FSQ levels; the decoder divides by levels - 1
    "n_acoustic_codebook": (1, 1024),
    "n_decoding_steps": (1, 64),
    "patch_size": (1, 1 << 16),
    "output_kernel_size": (1, 1024),
    "transformer_lengths": (0, MAX_LAYERS),
    "conv_kernels": (1, 1024),
    "conv_strides": (1, 64),
    "window_sizes": (1, 1 << 20),
    "sampling_rate": (1000, 384_000),
    "bos_token_id": (0, (1 << 20) - 1),
    "audio_token_id": (0, (1 << 20) - 1),
    "begin_audio_token_id": (0, (1 << 20) - 1),
    "max_seq_len": (1, 1 << 24),
    "voice index": (0, 1 << 16),  # params.json audio_tokenizer_args.voice values
}

# Finite float ranges by field name: (low, high, low excluded, high excluded).
FLOAT_BOUNDS: dict[str, tuple[float, float, bool, bool]] = {
    "rope_theta": (0.0, 1e12, True, False),
    "norm_eps": (0.0, 1.0, True, True),
    "qk_norm_eps": (0.0, 1.0, True, True),
    "cfg_alpha": (0.0, 10.0, False, False),
}

MAX_STR_CHARS = 256


class FieldError(ValueError):
    """One config field is invalid; ``from_dict`` adds the file and the section to the message."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem


def field_path(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def check_int_field(name: str, value, bounds_name: str | None = None) -> int:
    """``value`` as an int in ``INT_BOUNDS[bounds_name or name]``; bool, float and str refused."""
    lo, hi = INT_BOUNDS.get(bounds_name or name, (0, 2**31 - 1))
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(name, f"is {quoted(value)}; expected an integer from {lo} to {hi}")
    if not lo <= value <= hi:
        raise FieldError(name, f"is {quoted(value)}; expected an integer from {lo} to {hi}")
    return value


def check_float_field(name: str, value) -> float:
    """``value`` as a finite float in ``FLOAT_BOUNDS[name]`` (an int is accepted and converted)."""
    lo, hi, lo_open, hi_open = FLOAT_BOUNDS.get(name, (-math.inf, math.inf, True, True))
    span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        value = float(value)
        ok = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise FieldError(name, f"is {quoted(value)}; expected a finite number in {span}")
    return value


def check_int_list(name: str, value) -> list[int]:
    """A list of 1 to MAX_LIST_LENGTH ints, each in the bounds of ``name``."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_LIST_LENGTH:
        raise FieldError(name, f"is {quoted(value)}; expected a list of 1 to {MAX_LIST_LENGTH} integers")
    return [check_int_field(f"{name}[{i}]", v, name) for i, v in enumerate(value)]


def check_field(name: str, value, hint):
    """``value`` checked against the dataclass annotation ``hint`` and the bounds of ``name``."""
    if hint is int:
        return check_int_field(name, value)
    if hint is float:
        return check_float_field(name, value)
    if hint is bool:
        if not isinstance(value, bool):
            raise FieldError(name, f"is {quoted(value)}; expected true or false")
        return value
    if hint is str:
        if not isinstance(value, str) or len(value) > MAX_STR_CHARS:
            raise FieldError(name, f"is {quoted(value)}; expected a string")
        return value
    if typing.get_origin(hint) is list and typing.get_args(hint) == (int,):
        return check_int_list(name, value)
    raise TypeError(f"config field {name} has an annotation ({hint}) that from_dict cannot check")


def section_dict(d, source: str | os.PathLike, section: str) -> dict:
    """``d`` if it is a dict; else CheckpointError naming ``section`` of ``source``."""
    if not isinstance(d, dict):
        kind = "missing" if d is None else f"a JSON {type(d).__name__.replace('list', 'array')}"
        raise file_error(source, f"{section or 'the top level'} is {kind}, expected an object")
    return d


class FromDict:
    """Mixin for a config dataclass: ``from_dict`` takes the keys it knows, checked, and ignores the rest.

    The same dictionaries carry other parts' keys (a params.json section, our config.json
    section), so unknown keys are not an error; missing ones keep the dataclass defaults unless
    listed in ``required``.
    """

    @classmethod
    def from_dict(
        cls,
        d: dict,
        source: str | os.PathLike = "config",
        section: str = "",
        aliases: dict[str, str] | None = None,
        required: tuple[str, ...] = (),
    ) -> Self:
        """Build the config from ``d`` (a section of the file ``source``), checking every field.

        Args:
            d: the dictionary; keys that are not fields are ignored.
            source, section: the file and the dotted path of ``d`` in it, for messages.
            aliases: field name -> the key the file spells it with (params.json renames some),
                for messages.
            required: fields that must be present.

        Raises:
            CheckpointError: "<source>: <section>.<field> is <value>; expected …" for the first
                field of the wrong type or out of range, or a missing required one.
        """
        d = section_dict(d, source, section)
        aliases = aliases or {}
        hints = typing.get_type_hints(cls)
        values = {}
        for f in fields(cls):
            shown = field_path(section, aliases.get(f.name, f.name))
            if f.name not in d:
                if f.name in required:
                    raise file_error(source, f"{shown} is missing")
                continue
            try:
                values[f.name] = check_field(f.name, d[f.name], hints[f.name])
            except FieldError as e:
                raise file_error(source, f"{shown}{e.name[len(f.name):]} {e.problem}") from None
        try:
            return cls(**values)
        except ValueError as e:  # a __post_init__ consistency check
            raise file_error(source, f"{section + ': ' if section else ''}{e}") from None


# Names that come from files and become file names (voice presets): letters, digits and "_"
# only, so a name can never be a path ("../x", "/abs", "a/b") or a device name. The release's
# 20 voices all match.
VOICE_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
MAX_VOICES = 1024

# Quantization recipes a config.json may name (what the converter can write).
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (32, 64, 128)


def check_voice_name(name, source: str | os.PathLike, what: str) -> str:
    """``name`` if it is a valid voice name; else CheckpointError naming ``what`` in ``source``."""
    if not isinstance(name, str) or not VOICE_NAME.fullmatch(name):
        raise file_error(source, f"{what}: {quoted(name)} is not a valid voice name "
                                 "(1 to 64 letters, digits or '_'); refusing the file")
    return name


def check_quantization(q, source: str | os.PathLike, section: str = "quantization") -> dict | None:
    """A config.json ``quantization`` entry: null, or {bits, group_size[, acoustic]} the converter writes."""
    if q is None:
        return None
    q = section_dict(q, source, section)
    for key, choices in (("bits", QUANT_BITS), ("group_size", QUANT_GROUP_SIZES)):
        value = q.get(key)
        if isinstance(value, bool) or value not in choices:
            problem = "is missing" if key not in q else f"is {quoted(value)}"
            raise file_error(source, f"{section}.{key} {problem}; expected one of {', '.join(map(str, choices))}")
    if not isinstance(q.get("acoustic", False), bool):
        raise file_error(source, f"{section}.acoustic is {quoted(q['acoustic'])}; expected true or false")
    return {"bits": q["bits"], "group_size": q["group_size"], "acoustic": q.get("acoustic", False)}
