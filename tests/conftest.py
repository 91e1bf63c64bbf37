"""Shared fixtures: the golden reference folder and a float32 conversion of its checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("MLX_SPEECH_GOLDEN", REPO.parent / "shared" / "golden"))
TINY = GOLDEN / "tiny-voxtral"


def pytest_configure(config):
    if not (GOLDEN / "cases.safetensors").is_file():
        raise pytest.UsageError(
            f"golden reference files not found at {GOLDEN}; the tests need ../shared/golden "
            "beside the checkout (or set MLX_SPEECH_GOLDEN)"
        )


@pytest.fixture(scope="session")
def cases() -> dict[str, dict[str, mx.array]]:
    """Reference tensors grouped by case: cases["g1_e2e"]["codes"]."""
    out: dict[str, dict[str, mx.array]] = {}
    for key, value in mx.load(str(GOLDEN / "cases.safetensors")).items():
        case, name = key.split("/", 1)
        out.setdefault(case, {})[name] = value
    return out


@pytest.fixture(scope="session")
def tiny_mlx(tmp_path_factory) -> Path:
    """The golden checkpoint converted by the real converter, in float32."""
    from mlx_speech.convert import convert

    out = tmp_path_factory.mktemp("converted") / "tiny-f32"
    return convert(hf_path=str(TINY), mlx_path=str(out), dtype="float32", verbose=False)


@pytest.fixture(scope="session")
def model(tiny_mlx):
    from mlx_speech import load

    return load(tiny_mlx)


def assert_close(actual, reference, rel: float = 1e-4):
    """The golden tolerance: max|a − b| ≤ rel · max(1, max|ref|)."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != reference {b.shape}"
    bound = rel * max(1.0, float(np.abs(b).max()) if b.size else 1.0)
    err = float(np.abs(a - b).max()) if a.size else 0.0
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"
