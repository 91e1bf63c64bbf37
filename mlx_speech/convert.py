"""Convert the original Voxtral-4B-TTS release into an MLX model folder.

    python -m mlx_speech.convert --hf-path mistralai/Voxtral-4B-TTS-2603 --mlx-path voxtral-mlx
    python -m mlx_speech.convert --hf-path ./Voxtral-4B-TTS-2603 --mlx-path voxtral-4bit -q --q-bits 4

Everything the model needs once is done here and never per call: tensor renaming, weight-norm
folding and conv layouts for the codec, the semantic codebook division, casting and optional
quantization. The release is checked against params.json first; the output is written into a
temporary folder that is renamed at the very end, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .checkpoint import (
    PARAMS_FILE,
    TOKENIZER_FILE,
    VOICES_DIR,
    WEIGHTS_FILE,
    CheckpointError,
    check_checkpoint,
)
from .model import Model, ModelConfig
from .pt_reader import read_pt_tensor
from .tokenizer import Tokenizer
from .utils import VOICES_DIR as MLX_VOICES_DIR
from .utils import get_model_path, save_model

DEFAULT_HF_PATH = "mistralai/Voxtral-4B-TTS-2603"
DEFAULT_MLX_PATH = "mlx_model"
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
Q_BITS = (2, 3, 4, 5, 6, 8)


def _read_voices(source: Path, tokenizer: Tokenizer, dim: int) -> dict[str, mx.array]:
    """Every voice tekken.json lists, read from its .pt without torch and checked for shape."""
    voices = {}
    for name, n_rows in tokenizer.voice_num_audio_tokens.items():
        f = source / VOICES_DIR / f"{name}.pt"
        if not f.is_file():
            raise CheckpointError(f"voice {name!r} is listed in {TOKENIZER_FILE} but {f} is missing")
        emb = read_pt_tensor(f)
        if tuple(emb.shape) != (n_rows, dim):
            raise CheckpointError(
                f"{f} has shape {tuple(emb.shape)}; {TOKENIZER_FILE} and {PARAMS_FILE} imply ({n_rows}, {dim})"
            )
        voices[name] = emb
    return voices


def convert(
    hf_path: str = DEFAULT_HF_PATH,
    mlx_path: str = DEFAULT_MLX_PATH,
    dtype: str = "bfloat16",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    q_acoustic: bool = False,
    overwrite: bool = False,
    revision: str | None = None,
    verbose: bool = True,
) -> Path:
    """Convert the original release (Hub repo id or local folder) into an MLX model folder.

    Args:
        hf_path: Hub repo id or a local folder in the original layout.
        mlx_path: output folder; refused if it exists unless ``overwrite``.
        dtype: weight dtype: bfloat16, float16 or float32. The semantic head and the codec's
            semantic codebook stay float32.
        quantize: quantize the backbone's linear layers (the codec and embedding tables never).
        q_bits, q_group_size: quantization bits and group size.
        q_acoustic: also quantize the flow-matching transformer (off by default: it is small
            and precision-sensitive).
        overwrite: replace an existing ``mlx_path``.
        revision: Hub revision.
        verbose: print progress.

    Returns:
        The path of the written folder.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if q_acoustic and not quantize:
        raise ValueError("--q-acoustic only applies with -q/--quantize")
    if quantize and q_bits not in Q_BITS:
        raise ValueError(f"unsupported --q-bits {q_bits}; choose one of: {', '.join(map(str, Q_BITS))}")
    if quantize and q_group_size not in (32, 64, 128):
        raise ValueError(f"unsupported --q-group-size {q_group_size}; choose 32, 64 or 128")
    dst = Path(mlx_path).expanduser()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; choose another --mlx-path or pass --overwrite")

    log = print if verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()
    log(f"[1/5] locating the release: {hf_path}")
    source = get_model_path(hf_path, revision)
    for name in (WEIGHTS_FILE, PARAMS_FILE, TOKENIZER_FILE):
        if not (source / name).is_file():
            raise FileNotFoundError(f"{source / name} is missing; the original release has {name}")
    params = json.loads((source / PARAMS_FILE).read_text())
    config = ModelConfig.from_params(params)

    log(f"[2/5] checking {WEIGHTS_FILE} against {PARAMS_FILE}")
    header = check_checkpoint(source / WEIGHTS_FILE, config)
    tokenizer = Tokenizer.from_file(source / TOKENIZER_FILE)
    voices = _read_voices(source, tokenizer, config.backbone.dim)
    config.voices = list(voices)

    log(f"[3/5] loading {len(header)} tensors and transforming them ({dtype})")
    model = Model(config)
    weights = model.cast(model.sanitize(mx.load(str(source / WEIGHTS_FILE))), DTYPES[dtype])
    model.load_weights(list(weights.items()), strict=True)
    del weights
    if quantize:
        log(f"[4/5] quantizing to {q_bits} bits, group size {q_group_size}"
            + (" (backbone and flow-matching transformer)" if q_acoustic else " (backbone)"))
        config.quantization = {"bits": q_bits, "group_size": q_group_size, "acoustic": q_acoustic}
        nn.quantize(model, group_size=q_group_size, bits=q_bits, class_predicate=model.quant_predicate)
    else:
        log("[4/5] no quantization")
    mx.eval(model.parameters())

    log(f"[5/5] writing {dst}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        save_model(tmp, model)
        shutil.copyfile(source / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        (tmp / MLX_VOICES_DIR).mkdir()
        for name, emb in voices.items():
            mx.save_safetensors(str(tmp / MLX_VOICES_DIR / f"{name}.safetensors"),
                                {"embedding": emb.astype(DTYPES[dtype])})
        if dst.exists():  # overwrite: swap in the new folder, then drop the old one
            old = dst.with_name(f".{dst.name}.old-{int(time.time())}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    log(f"done: {dst} ({size / 1e9:.2f} GB, {len(voices)} voices) in {time.perf_counter() - t0:.1f} s")
    return dst


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Convert Voxtral-4B-TTS-2603 to an MLX model folder.")
    p.add_argument("--hf-path", "--model", default=DEFAULT_HF_PATH,
                   help=f"Hub repo id or local folder of the original release (default: {DEFAULT_HF_PATH})")
    p.add_argument("--mlx-path", default=DEFAULT_MLX_PATH, help=f"output folder (default: {DEFAULT_MLX_PATH})")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="weight dtype (default: bfloat16)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the backbone's linear layers")
    p.add_argument("--q-bits", type=int, default=4, help="bits per weight when quantizing (default: 4)")
    p.add_argument("--q-group-size", type=int, default=64, help="quantization group size (default: 64)")
    p.add_argument("--q-acoustic", action="store_true",
                   help="also quantize the flow-matching transformer (with -q)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --mlx-path")
    p.add_argument("--revision", default=None, help="Hub revision to download")
    return p


def main(argv: list[str] | None = None) -> None:
    args = configure_parser().parse_args(argv)
    try:
        convert(**vars(args))
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
