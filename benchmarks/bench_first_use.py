"""First use at the real size, with random weights: bytes on disk, load time and peak memory of
the original release vs mlx-community's 4-bit pack vs our own 4-bit conversion (issue 12).

    python benchmarks/bench_first_use.py                     # the real 26 layers (~11 GB written)
    python benchmarks/bench_first_use.py --layers 2          # a quick run
    python benchmarks/bench_first_use.py --workdir /big --keep --json results/first_use.json

Nothing is downloaded. Under ``--workdir`` (default: a temporary folder, removed at the end
unless ``--keep``) the script writes

- ``release/``: a random original release in exactly the published layout: ``params.json``
  (``tests/data/params_real.json``), ``consolidated.safetensors`` (every tensor of
  ``expected_tensors`` in BF16, streamed to disk one block at a time), ``tekken.json`` (the full
  Tekken vocabulary that ships in mistral-common, with Voxtral's special tokens and an ``audio``
  section listing the 20 real voices and row counts) and ``voice_embedding/<name>.pt`` (rows x
  3072 BF16 in torch.save's zip format, written by hand);
- ``pack/``: mlx-audio 0.6.2's own converter run on that release, 4 bits, group 64, as the
  mlx-community packs were made;
- ``hf/``: a Hugging Face cache holding both as Hub repos, with only the files our ``load``
  downloads for each layout (hard links to the folders above: no second copy);

and measures each first use in a fresh subprocess (``HF_HOME=hf``, ``HF_HUB_OFFLINE=1``,
``HOME=home``):

- ``release``: ``mlx_speech.load("bench/Voxtral-4B-TTS-2603")`` (read directly, bfloat16);
- ``pack-4bit``: ``mlx_speech.load("bench/Voxtral-4B-TTS-2603-mlx-4bit")``;
- ``ours-4bit``: ``python -m mlx_speech.convert --hf-path bench/Voxtral-4B-TTS-2603 --mlx-path
  out/voxtral-4bit -q --q-bits 4 --discard-download``, then ``load`` of that folder (each step in
  its own subprocess; the conversion runs last, as it removes the release from the cache).

Per case: bytes downloaded, bytes written during first use (the change in ``hf/``, ``home/`` and
``out/``), bytes on disk after it, load wall time, peak RSS (``ru_maxrss``) and MLX peak memory
of the load, then a few generated frames to show the model works (no timing claims). One JSON
record goes to stdout (and ``--json``), progress and a table to stderr. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]  # run from anywhere without installing

import numpy as np

from mlx_speech.voices import PRESET_ROWS as VOICE_ROWS  # noqa: E402

DEFAULT_PARAMS = _HERE.parent / "tests" / "data" / "params_real.json"
RELEASE_REPO = "bench/Voxtral-4B-TTS-2603"
PACK_REPO = "bench/Voxtral-4B-TTS-2603-mlx-4bit"
PACK_BITS, PACK_GROUP = 4, 64
RESULT_MARK = "FIRST_USE_RESULT "  # a child's last stdout line: its figures as JSON

CONTROL_TOKENS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
    "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
]
AUDIO_TOKENS = {24: "[AUDIO]", 25: "[BEGIN_AUDIO]", 26: "[OUTPUT_AUDIO]", 34: "[TRANSCRIBE]",
                35: "[REPEAT_AUDIO_TEXT]", 36: "[NEXT_AUDIO_TEXT]"}

SEMANTIC_HEAD = "acoustic_transformer.semantic_codebook_output.weight"
END_AUDIO_ROW = 1  # zero, so random weights never end an utterance at its first frame
POOL_SIZE = (1 << 24) + 7  # odd length: tiled rows of a large matrix do not line up
BLOCK = 1 << 22  # elements converted and written at a time (16 MB of float32)
PT_ALIGN = 64  # torch.save aligns each storage's data to 64 bytes in the zip


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the random release, written in its published layout ---------------------------------------

def _bf16_bytes(values: np.ndarray) -> bytes:
    """float32 → BF16 (round to nearest even) as little-endian bytes; the values are finite."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype("<u2").tobytes()


def _tensor_blocks(name: str, shape: tuple[int, ...], pool2: np.ndarray, rng: np.random.Generator):
    """The BF16 bytes of one tensor, block by block: norms and weight-norm gains in [0.9, 1.1],
    codebook usage in [0.5, 4] (the codebook divides by it), LayerScale 0.01, the semantic
    codebook N(0, 1), every matrix N(0, 1/fan_in) read cyclically from the pool."""
    n = math.prod(shape)
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith(("norm.weight", ".original0")):
        yield _bf16_bytes(rng.uniform(0.9, 1.1, n))
        return
    if name.endswith("cluster_usage"):
        yield _bf16_bytes(rng.uniform(0.5, 4.0, n))
        return
    if leaf in ("attention_scale", "ffn_scale"):
        yield _bf16_bytes(np.full(n, 0.01))
        return
    scale = 1.0 if name.endswith("embedding_sum") else 1.0 / math.sqrt(math.prod(shape[1:]))
    zero = (END_AUDIO_ROW * shape[-1], (END_AUDIO_ROW + 1) * shape[-1]) if name == SEMANTIC_HEAD else None
    start = int(rng.integers(POOL_SIZE))
    for pos in range(0, n, BLOCK):
        size = min(BLOCK, n - pos)
        s = (start + pos) % POOL_SIZE
        block = pool2[s:s + size] * np.float32(scale)
        if zero and pos < zero[1] and pos + size > zero[0]:
            block[max(zero[0] - pos, 0):min(zero[1] - pos, size)] = 0
        yield _bf16_bytes(block)


def write_release_weights(path: Path, config, seed: int) -> int:
    """``consolidated.safetensors``: every release tensor in BF16, streamed (one block in memory)."""
    from mlx_speech.checkpoint import expected_tensors

    shapes = sorted(expected_tensors(config).items())
    header, offset = {}, 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes with spaces
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(POOL_SIZE, dtype=np.float32)
    pool2 = np.concatenate([pool, pool])  # any BLOCK-long cyclic read is one slice
    del pool
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes:
            f.writelines(_tensor_blocks(name, shape, pool2, rng))
    os.replace(part, path)
    return len(shapes)


def full_tekken() -> dict:
    """The Tekken vocabulary that ships in mistral-common, with Voxtral's sizes, its special
    tokens (v7) and an ``audio`` section listing the 20 voices (as ``tests/test_tokenizer.py``)."""
    import mistral_common

    base = json.loads((Path(mistral_common.__file__).parent / "data" / "tekken_240911.json").read_text())
    names = CONTROL_TOKENS + [AUDIO_TOKENS.get(i, f"<SPECIAL_{i}>") for i in range(len(CONTROL_TOKENS), 1000)]
    return {
        "config": {**base["config"], "default_vocab_size": 131072, "default_num_special_tokens": 1000,
                   "version": "v7"},
        "vocab": base["vocab"],
        "special_tokens": [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(names)],
        "audio": {"sampling_rate": 24000, "frame_rate": 12.5,
                  "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
                  "chunk_length_s": 30.0, "voice_num_audio_tokens": VOICE_ROWS},
    }


def _pickle_int(i: int) -> bytes:
    """The shortest pickle int opcode, as torch.save's pickler writes it."""
    if i < 256:
        return b"K" + bytes([i])
    if i < 65536:
        return b"M" + struct.pack("<H", i)
    return b"J" + struct.pack("<i", i)


def _tensor_pickle(rows: int, dim: int) -> bytes:
    """The data.pkl torch.save writes for one contiguous (rows, dim) BF16 tensor (protocol 2)."""
    return (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00((X\x07\x00\x00\x00storageq\x01"
            b"ctorch\nBFloat16Storage\nq\x02X\x01\x00\x00\x000q\x03X\x03\x00\x00\x00cpuq\x04"
            + _pickle_int(rows * dim) + b"tq\x05QK\x00" + _pickle_int(rows) + _pickle_int(dim)
            + b"\x86q\x06" + _pickle_int(dim) + b"K\x01\x86q\x07\x89ccollections\nOrderedDict\nq\x08"
            b")Rq\ttq\nRq\x0b.")


def write_voice_pt(path: Path, data: bytes, rows: int, dim: int) -> None:
    """A torch.save zip archive of one BF16 tensor, entries as torch writes them (prefix = the
    file's stem, stored uncompressed, the storage aligned to 64 bytes by a padding extra field)."""
    prefix = path.stem
    entries = [("data.pkl", _tensor_pickle(rows, dim)), (".format_version", b"1"),
               (".storage_alignment", str(PT_ALIGN).encode()), ("byteorder", b"little"),
               ("data/0", data), ("version", b"3\n"),
               (".data/serialization_id", hashlib.sha1(path.name.encode()).hexdigest().encode())]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, payload in entries:
            info = zipfile.ZipInfo(f"{prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            if name == "data/0":  # local header (30 bytes) + name + extra, then the data
                pad = -(zf.fp.tell() + 30 + len(info.filename) + 4) % PT_ALIGN
                info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            zf.writestr(info, payload)


def write_release(folder: Path, params: dict, seed: int) -> dict:
    """The random release folder; returns what was written (counts, bytes, seconds)."""
    from mlx_speech.model import ModelConfig

    t0 = time.perf_counter()
    folder.mkdir(parents=True)
    config = ModelConfig.from_params(params)
    (folder / "params.json").write_text(json.dumps(params, indent=4))
    (folder / "tekken.json").write_text(json.dumps(full_tekken()))
    dim = config.backbone.dim
    voices = folder / "voice_embedding"
    voices.mkdir()
    rng = np.random.default_rng(seed + 1)
    for name, rows in VOICE_ROWS.items():  # the scale of the text embeddings' rows
        values = rng.standard_normal((rows, dim), dtype=np.float32) / math.sqrt(dim)
        write_voice_pt(voices / f"{name}.pt", _bf16_bytes(values), rows, dim)
    log(f"writing {folder / 'consolidated.safetensors'} ...")
    tensors = write_release_weights(folder / "consolidated.safetensors", config, seed)
    return {"tensors": tensors, "voices": len(VOICE_ROWS), "bytes": tree_bytes(folder),
            "weights_bytes": (folder / "consolidated.safetensors").stat().st_size,
            "write_s": time.perf_counter() - t0}


# ---- disk accounting and a Hub cache as a download leaves it ------------------------------------

def tree_bytes(*roots: Path) -> int:
    """Bytes of the regular files under ``roots``, each file once (hard links are one file;
    symbolic links are not followed: the Hub cache's snapshot links cost nothing)."""
    seen, total = set(), 0
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
    return total


def repo_cache(hf_home: Path, repo_id: str) -> Path:
    return hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))


def add_to_hub_cache(hf_home: Path, repo_id: str, folder: Path, layout: str) -> Path:
    """``folder`` as Hub repo ``repo_id`` at main in the Hugging Face cache, holding only the
    files our ``load`` downloads for ``layout`` (blobs, refs, snapshot links as the Hub client
    writes them). Blobs are hard links to ``folder``'s files: no second copy on disk."""
    from huggingface_hub.utils import filter_repo_objects

    from mlx_speech.model_layout import DOWNLOAD_PATTERNS, PROBE_PATTERNS

    repo = repo_cache(hf_home, repo_id)
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    for rel in filter_repo_objects(files, allow_patterns=[*PROBE_PATTERNS, *DOWNLOAD_PATTERNS[layout]]):
        blob = repo / "blobs" / hashlib.sha256(f"{repo_id}/{rel}".encode()).hexdigest()
        os.link(folder / rel, blob)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo


# ---- children: each first use in a fresh process ------------------------------------------------

def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def child_load(target: str, frames: int, voice_rows: int) -> dict:
    """Load ``target`` with ``mlx_speech.load``, then generate ``frames`` frames."""
    t0 = time.perf_counter()
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import mlx_speech
    from mlx_speech.voice_file import Voice

    out = {"import_s": time.perf_counter() - t0, "rss_after_import_bytes": _peak_rss_bytes()}
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    model = mlx_speech.load(target)
    out["load_s"] = time.perf_counter() - t0
    out["peak_rss_load_bytes"] = _peak_rss_bytes()
    out["mlx_peak_load_bytes"] = mx.get_peak_memory()
    out["mlx_active_after_load_bytes"] = mx.get_active_memory()
    out["weights_bytes"] = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    out["source"] = model.source
    out["voices"] = len(model.voices)
    if frames:
        # A preset's first rows: a short prompt (quantized prefill is slow on the CPU backend).
        name = "neutral_female" if "neutral_female" in model.voices else next(iter(model.voices))
        rows = np.array(model.voice(name)[:voice_rows].astype(mx.float32))
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        result = mlx_speech.generate(model, "Hello.", Voice(rows, name=f"{name}[:{voice_rows}]"),
                                     seed=0, max_frames=frames)
        out["generate"] = {
            "voice": f"{name} (first {voice_rows} rows)", "frames": result.frames,
            "samples": int(result.audio.size), "finite": bool(np.isfinite(result.audio).all()),
            "rms": float(np.sqrt(np.mean(np.square(result.audio, dtype=np.float64)))) if result.audio.size else 0.0,
            "wall_s": time.perf_counter() - t0, "mlx_peak_bytes": mx.get_peak_memory(),
        }
    out["peak_rss_end_bytes"] = _peak_rss_bytes()
    return out


def child_convert(argv: list[str]) -> dict:
    """``python -m mlx_speech.convert`` with ``argv``, in this process, measured."""
    import mlx.core as mx

    from mlx_speech.convert import main

    t0 = time.perf_counter()
    try:
        main(argv)
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    return {"argv": argv, "exit_status": status, "convert_s": time.perf_counter() - t0,
            "peak_rss_bytes": _peak_rss_bytes(), "mlx_peak_bytes": mx.get_peak_memory()}


def child_mlx_audio_pack(release: str, out: str) -> dict:
    """mlx-audio's own converter on a folder holding the release (plus config.json = params.json:
    its converter reads only config.json), 4 bits, group 64, as the mlx-community packs."""
    import mlx.core as mx
    from mlx_audio.convert import convert

    t0 = time.perf_counter()
    convert(hf_path=release, mlx_path=out, quantize=True, q_bits=PACK_BITS, q_group_size=PACK_GROUP,
            model_domain="tts")
    return {"convert_s": time.perf_counter() - t0, "peak_rss_bytes": _peak_rss_bytes(),
            "mlx_peak_bytes": mx.get_peak_memory()}


def run_child(env: dict, *args: str) -> dict:
    """Run this script as a child (``--child ...``), forwarding its output to stderr; its figures."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=_HERE.parent)
    result = None
    for line in proc.stdout:
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
        else:
            sys.stderr.write("    | " + line)
    if proc.wait() != 0 or result is None:
        raise SystemExit(f"child {' '.join(args)} failed (exit {proc.returncode})")
    return result


# ---- the cases -----------------------------------------------------------------------------------

class Area:
    """What the user has on disk: the Hub cache, the home folder and the output folder."""

    def __init__(self, work: Path):
        self.hf, self.home, self.out = work / "hf", work / "home", work / "out"
        for d in (self.hf, self.home, self.out):
            d.mkdir(parents=True, exist_ok=True)

    def bytes(self) -> int:
        return tree_bytes(self.hf, self.home, self.out)

    def env(self) -> dict:
        return {**os.environ, "HF_HOME": str(self.hf), "HF_HUB_OFFLINE": "1", "HOME": str(self.home),
                "PYTHONPATH": os.pathsep.join([str(_HERE.parent), os.environ.get("PYTHONPATH", "")])}


def measure_load(area: Area, label: str, repo_id: str, args) -> dict:
    downloaded = tree_bytes(repo_cache(area.hf, repo_id))
    before = area.bytes()
    log(f"[{label}] mlx_speech.load({repo_id!r}) in a fresh process ...")
    fig = run_child(area.env(), "load", repo_id, str(args.frames), str(args.voice_rows))
    written = area.bytes() - before
    return {"downloaded_bytes": downloaded, "written_bytes": written, "on_disk_after_bytes": downloaded + written,
            "peak_on_disk_bytes": downloaded + max(written, 0), "load": fig}


def measure_ours(area: Area, args) -> dict:
    """Our conversion from the Hub id with --discard-download, then the load of its folder."""
    downloaded = tree_bytes(repo_cache(area.hf, RELEASE_REPO))
    before = area.bytes()
    out = area.out / "voxtral-4bit"
    argv = ["--hf-path", RELEASE_REPO, "--mlx-path", str(out), "-q", "--q-bits", str(PACK_BITS),
            "--q-group-size", str(PACK_GROUP), "--discard-download"]
    log(f"[ours-4bit] python -m mlx_speech.convert {' '.join(argv)} in a fresh process ...")
    convert = run_child(area.env(), "convert", json.dumps(argv))
    if convert["exit_status"] != 0:
        raise SystemExit(f"mlx_speech.convert failed (exit {convert['exit_status']})")
    folder = tree_bytes(out)
    left = tree_bytes(repo_cache(area.hf, RELEASE_REPO))
    log(f"[ours-4bit] mlx_speech.load({str(out)!r}) in a fresh process ...")
    fig = run_child(area.env(), "load", str(out), str(args.frames), str(args.voice_rows))
    written = area.bytes() - before
    return {
        "downloaded_bytes": downloaded, "converted_folder_bytes": folder, "download_left_bytes": left,
        "written_bytes": written, "on_disk_after_bytes": downloaded + written,
        # the download and the converted folder coexist until --discard-download removes the first
        "peak_on_disk_bytes": downloaded + folder,
        "on_disk_after_without_discard_bytes": downloaded + folder,
        "convert": convert, "load": fig,
    }


def make_pack(work: Path, release: Path, env: dict) -> dict:
    """mlx-audio's 4-bit pack of ``release``, in ``work/pack``; what it wrote, and its cost."""
    staging = work / "mlx-audio-input"
    (staging / "voice_embedding").mkdir(parents=True)
    for f in release.rglob("*"):
        if f.is_file():
            (staging / f.relative_to(release)).symlink_to(f)
    (staging / "config.json").write_text((release / "params.json").read_text())
    pack = work / "pack"
    log(f"[setup] mlx-audio's converter: {release.name} → {pack.name} ({PACK_BITS}-bit, group {PACK_GROUP}) ...")
    fig = run_child(env, "mlx-audio-pack", str(staging), str(pack))
    shutil.rmtree(staging)
    fig["folder_bytes_as_written"] = tree_bytes(pack)
    copied = pack / "consolidated.safetensors"
    if copied.is_file():  # its converter copies every *.safetensors; our loader never downloads it
        fig["copied_release_weights_bytes"] = copied.stat().st_size
        copied.unlink()
    fig["files"] = sorted(p.relative_to(pack).as_posix() for p in pack.rglob("*") if p.is_file()
                          and not p.relative_to(pack).as_posix().startswith("voice_embedding/"))
    return fig


# ---- report --------------------------------------------------------------------------------------

def _gb(b) -> str:
    return "—" if b is None else f"{b / 1e9:.2f}"


def table(record: dict) -> str:
    c = record["cases"]
    rows = [
        ("release (read directly, bf16)", c["release"], c["release"]["load"]),
        ("mlx-community 4-bit pack", c["pack-4bit"], c["pack-4bit"]["load"]),
    ]
    ours = c["ours-4bit"]
    lines = [
        "| first use | downloaded GB | on disk after GB | peak on disk GB | load s | peak RSS GB | MLX peak GB | weights GB | frames |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, case, load in rows:
        lines.append(_row(label, case["downloaded_bytes"], case["on_disk_after_bytes"], case["peak_on_disk_bytes"],
                          load))
    lines.append(_row("our convert -q 4 (keeps the download), then load", ours["downloaded_bytes"],
                      ours["on_disk_after_without_discard_bytes"], ours["peak_on_disk_bytes"], ours["load"]))
    lines.append(_row("our convert -q 4 --discard-download, then load", ours["downloaded_bytes"],
                      ours["on_disk_after_bytes"], ours["peak_on_disk_bytes"], ours["load"]))
    conv = ours["convert"]
    lines.append(f"our conversion step: {conv['convert_s']:.1f} s, peak RSS {_gb(conv['peak_rss_bytes'])} GB, "
                 f"MLX peak {_gb(conv['mlx_peak_bytes'])} GB")
    pack = record["setup"]["mlx_audio_pack"]
    lines.append(f"(making the pack with mlx-audio: {pack['convert_s']:.1f} s, peak RSS "
                 f"{_gb(pack['peak_rss_bytes'])} GB, MLX peak {_gb(pack['mlx_peak_bytes'])} GB)")
    return "\n".join(lines)


def _row(label, downloaded, after, peak, load) -> str:
    gen = load.get("generate", {})
    return (f"| {label} | {_gb(downloaded)} | {_gb(after)} | {_gb(peak)} | {load['load_s']:.1f} | "
            f"{_gb(load['peak_rss_load_bytes'])} | {_gb(load['mlx_peak_load_bytes'])} | "
            f"{_gb(load['weights_bytes'])} | {gen.get('frames', '—')} |")


def notes(args, real_layers: int) -> list[str]:
    out = [
        ("random weights in the release's names, shapes and dtype (BF16); disk and memory figures "
         "depend on sizes, not values"),
        ("downloaded: the files our load fetches for the layout (the Hub cache holds only those); "
         "on disk after: downloaded + what first use wrote into the Hub cache, HOME and the output "
         "folder (bytes of regular files, each once)"),
        ("peak RSS (ru_maxrss, imports included: see rss_after_import_bytes) and MLX peak "
         "(mx.get_peak_memory) cover the load only, each in a fresh process; generation follows "
         "with a short prompt and is not timed for any claim"),
        (f"the pack is mlx-audio {PACK_BITS}-bit group {PACK_GROUP} (backbone, flow-matching "
         "transformer, text embeddings and semantic head quantized; our load dequantizes the last "
         "two); our conversion quantizes the backbone's linear layers only (the default recipe)"),
        ("ours-4bit: peak on disk is the download plus the converted folder, which coexist until "
         "--discard-download removes the download; 'keeps the download' is that same sum (a "
         "conversion without the flag writes exactly the folder)"),
    ]
    if args.layers != real_layers:
        out.insert(0, f"REDUCED backbone: {args.layers} of {real_layers} layers; bytes and memory "
                      "scale with the backbone's share (~116 M parameters a layer), not real-size figures")
    return out


# ---- main ----------------------------------------------------------------------------------------

def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None,
                   help="where to write everything (default: a temporary folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep --workdir's contents at the end")
    p.add_argument("--layers", type=int, default=None, help="backbone layers (default: the real 26)")
    p.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params.json to build from")
    p.add_argument("--frames", type=int, default=1, help="frames generated after each load (0: none)")
    p.add_argument("--voice-rows", type=int, default=4,
                   help="rows of a preset voice in the generation prompt (default 4: a short prefill)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the record here")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return p


def _child_main(argv: list[str]) -> int:
    kind, rest = argv[0], argv[1:]
    if kind == "load":
        result = child_load(rest[0], int(rest[1]), int(rest[2]))
    elif kind == "convert":
        result = child_convert(json.loads(rest[0]))
    elif kind == "mlx-audio-pack":
        result = child_mlx_audio_pack(rest[0], rest[1])
    else:
        raise SystemExit(f"unknown child {kind!r}")
    sys.stdout.flush()
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if args.child:
        return _child_main(args.child)
    params = json.loads(args.params.read_text())
    real_layers = params["n_layers"]
    args.layers = real_layers if args.layers is None else args.layers
    if args.layers < 1 or args.frames < 0 or args.voice_rows < 1:
        raise SystemExit("--layers and --voice-rows must be at least 1, --frames at least 0")
    params["n_layers"] = args.layers
    if missing := mlx_audio_missing():
        raise SystemExit(f"the pack is written with mlx-audio's own converter: {missing}")

    from bench_generate import backend_info, machine_info, software_info

    from mlx_speech.checkpoint import expected_tensors
    from mlx_speech.model import ModelConfig
    from mlx_speech.model_layout import MLX_AUDIO, RELEASE

    weights = sum(math.prod(s) * 2 for s in expected_tensors(ModelConfig.from_params(params)).values())
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-first-use-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()) and args.workdir is not None:
        raise SystemExit(f"--workdir {work} is not empty; give an empty or new folder")
    # the release, mlx-audio's transient copy of its weights, the pack and our folder (~0.3 each)
    need = int(2.7 * weights) + (1 << 30)
    free = shutil.disk_usage(work).free
    log(f"workdir {work}: {free / 1e9:.1f} GB free, about {need / 1e9:.1f} GB needed at the peak")
    if free < need:
        raise SystemExit(f"--workdir {work} has {free / 1e9:.1f} GB free; about {need / 1e9:.1f} GB are "
                         "needed (use --layers for a smaller run, or another --workdir)")
    record = {
        "benchmark": "bench_first_use",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**machine_info(), "memory_available_at_start_gb": _mem_available_gb()},
        "software": software_info(),
        "backend": backend_info(),
        "config": {"params": str(args.params), "layers": args.layers, "layers_real": real_layers,
                   "reduced": args.layers != real_layers, "pack": {"bits": PACK_BITS, "group_size": PACK_GROUP},
                   "ours": {"bits": PACK_BITS, "group_size": PACK_GROUP, "acoustic": False},
                   "frames": args.frames, "voice_rows": args.voice_rows, "seed": args.seed},
        "notes": notes(args, real_layers),
    }
    t_start = time.perf_counter()
    try:
        release = work / "release"
        log(f"[setup] writing a random release ({args.layers} of {real_layers} layers, "
            f"{weights / 1e9:.2f} GB of weights) in {release} ...")
        record["setup"] = {"release": write_release(release, params, args.seed)}
        area = Area(work)
        record["setup"]["mlx_audio_pack"] = make_pack(work, release, area.env())
        add_to_hub_cache(area.hf, RELEASE_REPO, release, RELEASE)
        add_to_hub_cache(area.hf, PACK_REPO, work / "pack", MLX_AUDIO)
        record["cases"] = {
            "release": measure_load(area, "release", RELEASE_REPO, args),
            "pack-4bit": measure_load(area, "pack-4bit", PACK_REPO, args),
            "ours-4bit": measure_ours(area, args),  # last: it removes the release from the cache
        }
        record["total_s"] = time.perf_counter() - t_start
    finally:
        if args.keep:
            log(f"kept {work}")
        elif args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for name in ("release", "pack", "mlx-audio-input", "hf", "home", "out"):
                shutil.rmtree(work / name, ignore_errors=True)
    text = json.dumps(record, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    log(table(record))
    return 0


def mlx_audio_missing() -> str | None:
    """Why mlx-audio's Voxtral converter cannot be used, or None when it can."""
    try:
        import mlx_audio.convert
        import mlx_audio.tts.models.voxtral_tts  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure: say why
        return f"mlx-audio is not importable ({type(e).__name__}: {e}); pip install mlx-audio==0.6.2"
    return None


def _mem_available_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


if __name__ == "__main__":
    sys.exit(main())
