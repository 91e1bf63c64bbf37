"""Refusing weights that hold NaN or infinities, with one cheap pass over every byte.

A non-finite weight does not fail loudly: it gives 0 frames and an empty file, or (in the flow
head) codes that index outside their table. Every loader checks each floating tensor once, in
the same evaluation that reads it, and names the first bad one.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from .errors import file_error, quoted

# Exponent bits of each float dtype: a value is NaN or infinite exactly when all of them are set.
_EXPONENT_MASKS = {"bfloat16": (0x7F80, "uint16"), "float16": (0x7C00, "uint16"), "float32": (0x7F800000, "uint32")}


def all_finite(x: mx.array) -> mx.array:
    """A lazy scalar: whether every element of the floating array ``x`` is finite.

    For bfloat16, float16 and float32 this tests the exponent bits (max over ``bits & mask``):
    on the CPU it is 5x faster than ``mx.all(mx.isfinite(x))`` for bfloat16 (measured 0.69 vs
    0.12 GiB/s), which matters when every byte of an 8 GB model is checked at load.
    """
    mask, bits = _EXPONENT_MASKS.get(str(x.dtype).rsplit(".", 1)[-1], (None, None))
    if mask is None:
        return mx.all(mx.isfinite(x))
    if x.size == 0:
        return mx.array(True)
    return mx.max(x.view(getattr(mx, bits)) & mask) != mask


def refuse_non_finite(tensors: dict[str, mx.array], source: Path, when: str = "",
                      where: dict[str, Path] | None = None) -> None:
    """Evaluate ``tensors`` and raise CheckpointError naming the first floating one with a NaN or
    an infinity, in ``where[name]`` (default ``source``); ``when`` qualifies the message (e.g.
    " after conversion")."""
    flags = {k: all_finite(v) for k, v in tensors.items() if mx.issubdtype(v.dtype, mx.floating)}
    try:
        mx.eval(tensors, flags)
    except RuntimeError as e:  # a file changed or was cut after its header was read
        raise file_error(source, f"weights cannot be read ({quoted(str(e), 200)})") from None
    bad = sorted(k for k, ok in flags.items() if not ok.item())
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise file_error((where or {}).get(bad[0], source),
                         f"tensor {bad[0]} holds NaN or infinite values{when}{more}; the model cannot be used")
