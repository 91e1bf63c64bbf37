"""The original release read straight into a model: checked, renamed, folded and cast once.

``python -m mlx_speech.convert`` writes the result to a folder (optionally quantized); ``load``
of a release folder or of the release's Hub id uses it directly, so the user keeps one copy of
the weights on disk (the download), not the download plus a converted copy beside it.
Everything the model needs once is done here and never per call: tensor renaming, weight-norm
folding and conv layouts for the codec, the semantic codebook division, the cast (the semantic
head and the codec's semantic codebook stay float32 at every dtype).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .checkpoint import WEIGHTS_FILE, Release, read_release
from .errors import file_error, quoted
from .finite import refuse_non_finite
from .model import Model

DTYPE_NAMES = ("bfloat16", "float16", "float32")


def model_from_release(release: Release, dtype: str = "bfloat16", *, check_raw: bool = False) -> Model:
    """The model of a checked release (``checkpoint.read_release``), its weights in ``dtype``.

    Every floating weight is checked for NaN and infinities after the transforms (a weight-norm
    direction of zeros folds to 0/0); with ``check_raw`` also before, naming the release's own
    tensor (the converter does both: its messages point into the file the user has).

    Raises:
        CheckpointError: an unreadable weights file, or a non-finite tensor, named.
        ValueError: an unknown ``dtype``.
    """
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPE_NAMES)}")
    source = release.source / WEIGHTS_FILE
    try:
        raw = dict(mx.load(str(source)))
    except (RuntimeError, ValueError, OSError) as e:
        raise file_error(source, f"unreadable safetensors file ({quoted(str(e), 200)})") from None
    if check_raw:
        refuse_non_finite(raw, source)
    model = Model(release.config)
    weights = model.cast(model.sanitize(raw), getattr(mx, dtype))
    del raw
    model.load_weights(list(weights.items()), strict=True)
    del weights
    refuse_non_finite(dict(tree_flatten(model.parameters())), source, " after conversion")
    return model


def load_release(source: Path, dtype: str = "bfloat16") -> Model:
    """A ready model (tokenizer and preset voices set) read from a release folder.

    Raises:
        CheckpointError: a damaged or hostile release, naming the file and the field or tensor.
    """
    release = read_release(source)
    model = model_from_release(release, dtype)
    model.eval()
    model.tokenizer = release.tokenizer
    model.set_voices({name: rows.astype(getattr(mx, dtype)) for name, rows in release.voices.items()})
    return model
