"""Convert the original Voxtral-4B-TTS release into an MLX model folder.

    python -m mlx_speech.convert --hf-path mistralai/Voxtral-4B-TTS-2603 --mlx-path voxtral-mlx
    python -m mlx_speech.convert --hf-path ./Voxtral-4B-TTS-2603 --mlx-path voxtral-4bit -q --q-bits 4

Everything the model needs once is done here and never per call: tensor renaming, weight-norm
folding and conv layouts for the codec, the semantic codebook division, casting and optional
quantization. The release is checked against params.json first (``checkpoint.read_release``:
every size bounded, every voice name a plain name, every tensor and voice finite); the output
is written into a temporary folder that is swapped in at the very end (``folder_swap``), so a
failed, interrupted or killed run leaves nothing behind and ``--overwrite`` replaces only a
converted model.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from . import folder_swap
from .config import QUANT_BITS, QUANT_GROUP_SIZES
from .commands import add_version
from .signals import exit_status, graceful_signals

DEFAULT_HF_PATH = "mistralai/Voxtral-4B-TTS-2603"
DEFAULT_MLX_PATH = "mlx_model"
DTYPE_NAMES = ("bfloat16", "float16", "float32")
Q_BITS = QUANT_BITS
DEFAULT_Q_BITS = 4
DEFAULT_Q_GROUP_SIZE = 64


def check_convert_options(dtype: str, quantize: bool, q_bits: int | None, q_group_size: int | None,
                          q_acoustic: bool) -> tuple[int, int]:
    """The (bits, group size) to quantize with; ValueError naming the flag for a bad combination."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPE_NAMES)}")
    if not quantize:
        given = [flag for flag, v in (("--q-bits", q_bits), ("--q-group-size", q_group_size),
                                      ("--q-acoustic", q_acoustic or None)) if v is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise ValueError(f"{' and '.join(given)} only {verb} with -q/--quantize; add -q to quantize")
    bits = DEFAULT_Q_BITS if q_bits is None else q_bits
    group = DEFAULT_Q_GROUP_SIZE if q_group_size is None else q_group_size
    if quantize and (isinstance(bits, bool) or bits not in Q_BITS):
        raise ValueError(f"unsupported --q-bits {bits}; choose one of: {', '.join(map(str, Q_BITS))}")
    if quantize and (isinstance(group, bool) or group not in QUANT_GROUP_SIZES):
        raise ValueError(f"unsupported --q-group-size {group}; choose one of: "
                         f"{', '.join(map(str, QUANT_GROUP_SIZES))}")
    return bits, group


def convert(
    hf_path: str = DEFAULT_HF_PATH,
    mlx_path: str = DEFAULT_MLX_PATH,
    dtype: str = "bfloat16",
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_acoustic: bool = False,
    overwrite: bool = False,
    revision: str | None = None,
    discard_download: bool = False,
    verbose: bool = True,
) -> Path:
    """Convert the original release (Hub repo id or local folder) into an MLX model folder.

    Args:
        hf_path: Hub repo id or a local folder in the original layout.
        mlx_path: output folder; refused if it exists unless ``overwrite``.
        dtype: weight dtype: bfloat16, float16 or float32. The semantic head and the codec's
            semantic codebook stay float32.
        quantize: quantize the backbone's linear layers (the codec and embedding tables never).
        q_bits, q_group_size: quantization bits (default 4) and group size (default 64); only
            with ``quantize``.
        q_acoustic: also quantize the flow-matching transformer (off by default: it is small
            and precision-sensitive).
        overwrite: replace an existing ``mlx_path``, if it is empty or a converted model; a
            folder with anything else in it, or one that holds the release, is never replaced.
        revision: Hub revision.
        discard_download: after converting from a Hub repo id, remove that download from the
            Hugging Face cache, so only the converted folder stays on disk (e.g. 2.5 GB at 4 bits
            instead of 8 GB + 2.5 GB). Refused for a local folder: the converter never deletes
            a folder it was given.
        verbose: print progress.

    Returns:
        The path of the written folder.

    Raises:
        CheckpointError: a damaged or hostile release, naming the file and the field or tensor.
        FileExistsError: ``mlx_path`` exists (or appeared meanwhile) and ``overwrite`` is off.
        folder_swap.FolderError: the output cannot be written or must not be replaced.
        KeyboardInterrupt: Ctrl-C, or SIGTERM/SIGHUP (``signals.Terminated``); nothing is left.
    """
    started_ns = time.time_ns()
    bits, group = check_convert_options(dtype, quantize, q_bits, q_group_size, q_acoustic)
    check_discard(hf_path, discard_download)
    dst = Path(mlx_path).expanduser()
    local = Path(hf_path).expanduser()
    # before any download or reading; a local source is known already
    folder_swap.check_target(dst, overwrite, sources=(local,) if local.is_dir() else ())
    log = print if verbose else (lambda *a, **k: None)
    with graceful_signals():
        out = _convert(hf_path, revision, dst, dtype, quantize and (bits, group, q_acoustic),
                       overwrite, started_ns, log)
        if discard_download:
            _discard_download(hf_path, revision, log)
        return out


def check_discard(hf_path: str, discard_download: bool) -> None:
    """Refuse ``--discard-download`` unless the source is a Hub repo id (never a local folder)."""
    from .model_source import looks_like_hub_id

    if discard_download and (Path(hf_path).expanduser().exists() or not looks_like_hub_id(hf_path)):
        raise ValueError(f"--discard-download removes a Hub download, but --hf-path {hf_path} is a local "
                         "folder (the converter never deletes a folder it was given)")


def _discard_download(repo: str, revision: str | None, log) -> None:
    """Remove the cached snapshot of ``repo`` (at ``revision``) that the conversion read."""
    from huggingface_hub import scan_cache_dir, snapshot_download

    snapshot = Path(snapshot_download(repo, revision=revision, local_files_only=True)).resolve()
    cache = scan_cache_dir()
    commits = [rev.commit_hash for r in cache.repos if r.repo_id == repo and r.repo_type == "model"
               for rev in r.revisions if rev.snapshot_path.resolve() == snapshot]
    if not commits:
        log(f"the download of {repo} is not in the Hugging Face cache; nothing to remove")
        return
    plan = cache.delete_revisions(*commits)
    plan.execute()
    log(f"removed the download of {repo} from the Hugging Face cache ({plan.expected_freed_size_str} freed)")


def _convert(hf_path, revision, dst: Path, dtype: str, quantization, overwrite: bool, started_ns: int, log) -> Path:
    import mlx.core as mx
    import mlx.nn as nn

    from .checkpoint import WEIGHTS_FILE, read_release
    from .release_loader import model_from_release
    from .model_source import get_model_path

    t0 = time.perf_counter()
    log(f"[1/5] locating the release: {hf_path}")
    source = get_model_path(hf_path, revision)
    folder_swap.check_target(dst, overwrite, sources=(source,))

    log(f"[2/5] checking {WEIGHTS_FILE} against params.json")
    release = read_release(source)
    config = release.config

    log(f"[3/5] loading {len(release.header)} tensors and transforming them ({dtype})")
    model = model_from_release(release, dtype, check_raw=True)
    if quantization:
        bits, group, acoustic = quantization
        log(f"[4/5] quantizing to {bits} bits, group size {group}"
            + (" (backbone and flow-matching transformer)" if acoustic else " (backbone)"))
        config.quantization = {"bits": bits, "group_size": group, "acoustic": acoustic}
        nn.quantize(model, group_size=group, bits=bits, class_predicate=model.quant_predicate)
    else:
        log("[4/5] no quantization")

    log(f"[5/5] writing {dst}")
    _write(dst, model, release, getattr(mx, dtype), overwrite, started_ns)
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    log(f"done: {dst} ({size / 1e9:.2f} GB, {len(release.voices)} voices) in {time.perf_counter() - t0:.1f} s")
    return dst


def _write(dst: Path, model, release, dtype, overwrite: bool, started_ns: int) -> None:
    """Write the model folder beside ``dst`` and swap it in; on any failure nothing is left."""
    import mlx.core as mx

    from .checkpoint import TOKENIZER_FILE, voice_path
    from .loading import VOICES_DIR, save_model

    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise folder_swap.FolderError(f"{dst}: cannot create its parent folder ({e.strerror})") from None
    folder_swap.remove_stale(dst, started_ns)  # what killed runs left (never a live run's)
    tmp, lock = folder_swap.make_partial(dst)
    try:
        save_model(tmp, model)
        (tmp / TOKENIZER_FILE).write_bytes(release.tokenizer_bytes)
        (tmp / VOICES_DIR).mkdir()
        for name, emb in release.voices.items():
            f = voice_path(tmp / VOICES_DIR, name, ".safetensors", [tmp.resolve()])
            mx.save_safetensors(str(f), {"embedding": emb.astype(dtype)})
        folder_swap.publish(tmp, dst, overwrite)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (RuntimeError, OSError)) and not isinstance(e, (folder_swap.FolderError, FileExistsError)):
            text = (getattr(e, "strerror", None) or str(e)).replace(str(tmp), str(dst))
            raise folder_swap.FolderError(f"{dst}: writing the converted model failed ({text}); "
                                          "nothing was written") from None
        raise
    finally:
        lock.release()


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_speech.convert",
                                description="Convert Voxtral-4B-TTS-2603 to an MLX model folder.")
    add_version(p)
    p.add_argument("--hf-path", "--model", default=DEFAULT_HF_PATH,
                   help=f"Hub repo id or local folder of the original release (default: {DEFAULT_HF_PATH})")
    p.add_argument("--mlx-path", default=DEFAULT_MLX_PATH, help=f"output folder (default: {DEFAULT_MLX_PATH})")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16", help="weight dtype (default: bfloat16)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the backbone's linear layers")
    p.add_argument("--q-bits", type=int, default=None,
                   help=f"bits per weight when quantizing: {', '.join(map(str, Q_BITS))} (default: {DEFAULT_Q_BITS})")
    p.add_argument("--q-group-size", type=int, default=None,
                   help=f"quantization group size: {', '.join(map(str, QUANT_GROUP_SIZES))} "
                        f"(default: {DEFAULT_Q_GROUP_SIZE})")
    p.add_argument("--q-acoustic", action="store_true",
                   help="also quantize the flow-matching transformer (with -q)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --mlx-path (only an empty folder or a converted model)")
    p.add_argument("--revision", default=None, help="Hub revision to download")
    p.add_argument("--discard-download", action="store_true",
                   help="after converting from a Hub repo id, remove the download from the Hugging Face "
                        "cache, so only the converted folder stays (e.g. with -q --q-bits 4: 2.5 GB, "
                        "not 8 GB + 2.5 GB)")
    return p


def main(argv: list[str] | None = None) -> None:
    """The command line: exit 0 on success, 1 for a bad release or output, 2 for a usage error,
    130 (or 128 + the signal) when interrupted."""
    parser = configure_parser()
    args = parser.parse_args(argv)
    try:
        check_convert_options(args.dtype, args.quantize, args.q_bits, args.q_group_size, args.q_acoustic)
        check_discard(args.hf_path, args.discard_download)
    except ValueError as e:
        parser.error(str(e))  # exit 2
    try:
        convert(**vars(args))
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e.args[0] if e.args else 'SIGINT'}); nothing was written", file=sys.stderr)
        raise SystemExit(exit_status(e)) from None
    except (ValueError, OSError) as e:  # CheckpointError, FolderError, FileExistsError, ...
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
