"""Streaming benchmark: codec cost per chunk (stateful vs re-decoding context) and time to first audio.

    python benchmarks/bench_streaming.py                      # defaults: 3-5 min on a 2-core CPU
    python benchmarks/bench_streaming.py --repeats 5 --frames 1,10,25 --json out.json
    python benchmarks/bench_streaming.py --skip-ttfa

A script, not a test: it prints figures and asserts nothing.

1. Codec, at the real size (``CodecConfig()``: dim 1024, 4 stages of 2 layers, 1920 samples per
   frame) with random weights in ``--dtype`` (the semantic codebook stays float32, as converted
   checkpoints keep it). For each chunk size N it times, in the same run and on the same weights:
   - ``stateful``: ``decode(codes, cache=...)`` of N new frames mid-utterance (our streaming path:
     conv tails and attention windows carried between chunks);
   - ``redecode``: ``decode`` of ``--context`` frames of left context plus the N new frames from
     an empty state, keeping the last N frames' samples (how ports without a codec state stream);
   and prints the median per chunk and per frame, and redecode ÷ stateful.
2. Time to first audio, with the model at the real configuration (``tests/data/params_real.json``)
   but only ``--layers`` backbone and flow-matching layers (random weights; the codec is full
   size): request → first sample handed to the output device, through ``stream_generate`` and
   ``AudioPlayer`` with a fake output stream that pulls 20 ms blocks in real time from its own
   thread, as PortAudio does. Playback starts at the first chunk (``first_chunk_frames``).
   "cold" is a voice's first request (its prompt prefix is prefilled and cached), "warm" the next.

One JSON record goes to stdout (and ``--json PATH``): machine, OS, Python, MLX version and
backend, the configuration, and every figure; progress and a table go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlx_speech.codec import Codec, CodecConfig  # noqa: E402
from mlx_speech.generation import DEFAULT_CHUNK_FRAMES, DEFAULT_FIRST_CHUNK_FRAMES, stream_generate  # noqa: E402
from mlx_speech.model import ModelConfig  # noqa: E402
from mlx_speech.player import AudioPlayer  # noqa: E402

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
CODEBOOK = "quantizer.semantic_codebook.embedding"
BLOCK = 480  # fake device: 20 ms blocks at 24 kHz


def log(*args, **kwargs):
    print(*args, file=sys.stderr, flush=True, **kwargs)


def environment() -> dict:
    def cpu_name() -> str:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        if sys.platform == "darwin":
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
            return out.stdout.strip()
        return platform.processor()

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "machine": {"arch": platform.machine(), "processor": cpu_name(), "cpus": os.cpu_count(),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "backend": {"default_device": str(mx.default_device()), "metal": mx.metal.is_available(),
                    "cuda": bool(getattr(mx, "cuda", None) and mx.cuda.is_available())},
        "commit": commit,
    }


# ---- 1. codec per chunk ------------------------------------------------------------------


def real_codec(dtype: mx.Dtype, seed: int) -> Codec:
    """The real-size codec with random weights (values do not change the speed)."""
    mx.random.seed(seed)
    codec = Codec(CodecConfig())
    codec.set_dtype(dtype)
    codebook = codec.quantizer.semantic_codebook
    codebook.embedding = mx.random.normal(codebook.embedding.shape).astype(mx.float32)  # stays fp32
    mx.eval(codec.parameters())
    codec.eval()
    return codec


def random_codes(config: CodecConfig, frames: int, seed: int) -> mx.array:
    """(1, frames, 37) codes with the +2 offset."""
    rng = np.random.default_rng(seed)
    semantic = rng.integers(2, 2 + config.semantic_codebook_size, (1, frames, 1))
    acoustic = rng.integers(2, 2 + config.acoustic_codebook_size, (1, frames, config.acoustic_dim))
    return mx.array(np.concatenate([semantic, acoustic], axis=-1).astype(np.int32))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    mx.synchronize()
    return time.perf_counter() - start


def bench_codec(dtype: mx.Dtype, chunk_sizes: list[int], context: int, repeats: int, seed: int) -> dict:
    codec = real_codec(dtype, seed)
    config = codec.config
    spf = config.samples_per_frame
    warm = 4  # fills every attention window (16 positions at the last stage = 2 frames)
    codes = random_codes(config, warm + context + max(chunk_sizes) * repeats, seed)
    mx.eval(codec.decode(codes[:, :2]))  # first use: allocations, kernel set-up
    results = {}
    for n in chunk_sizes:
        # stateful: N new frames per call, mid-utterance (after `warm` frames)
        cache = codec.make_cache()
        mx.eval(codec.decode(codes[:, :warm], cache=cache), cache.state)
        stateful = []
        for r in range(repeats):
            chunk = codes[:, warm + r * n : warm + (r + 1) * n]

            def step():
                audio = codec.decode(chunk, cache=cache)
                mx.eval(audio, cache.state)

            stateful.append(timed(step))
        # redecode: context + N frames from an empty state, keep the last N frames
        redecode = []
        for r in range(repeats):
            window = codes[:, r * n : r * n + context + n]

            def step():
                audio = codec.decode(window)[:, -n * spf :]
                mx.eval(audio)

            redecode.append(timed(step))
        s, d = statistics.median(stateful), statistics.median(redecode)
        results[str(n)] = {
            "chunk_frames": n,
            "stateful_ms_per_chunk": s * 1e3,
            "stateful_ms_per_frame": s * 1e3 / n,
            "redecode_ms_per_chunk": d * 1e3,
            "redecode_ms_per_frame": d * 1e3 / n,
            "redecode_over_stateful": d / s,
            "stateful_x_real_time": n * spf / config.sampling_rate / s,
            "samples_ms": {"stateful": [t * 1e3 for t in stateful], "redecode": [t * 1e3 for t in redecode]},
        }
        log(f"  codec, {n:2d}-frame chunks: stateful {s * 1e3:9.1f} ms   redecode ({context}+{n} frames) "
            f"{d * 1e3:9.1f} ms   ratio {d / s:5.2f}x")
    del codec
    mx.clear_cache()
    return results


# ---- 2. time to first audio --------------------------------------------------------------


class RealTimeStream:
    """A fake output stream that calls the callback with 20 ms blocks, in real time, from its own
    thread once started: a stand-in for PortAudio's audio thread."""

    def __init__(self, samplerate, channels, dtype, device, callback, blocksize, latency):
        self.samplerate, self.callback = samplerate, callback
        self.latency = 0.0
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        block = np.zeros((BLOCK, 1), np.float32)
        period, next_time = BLOCK / self.samplerate, time.perf_counter()
        while not self._stop.is_set():
            self.callback(block, BLOCK, None, None)
            next_time += period
            self._stop.wait(max(0.0, next_time - time.perf_counter()))

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    abort = stop

    def close(self):
        self.stop()


class PromptOnly:
    """Stands in for the tokenizer: the tekken speech-prompt layout with fixed text ids."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def encode_speech(self, text: str, voice: str) -> list[int]:
        return list(self.ids)


def reduced_model(layers: int, dtype: mx.Dtype, seed: int):
    from random_weights import build_ours, prompt_ids, random_text_ids, random_voice

    params = json.loads((REPO / "tests" / "data" / "params_real.json").read_text())
    config = ModelConfig.from_params(params)
    config.backbone.n_layers = layers
    config.acoustic.n_layers = layers
    model = build_ours(config, dtype, None, seed)
    voice_rows = 218  # neutral_female, the longest preset
    model.tokenizer = PromptOnly(prompt_ids(config, voice_rows, random_text_ids(config, 20, seed)))
    model.set_voices({"bench": random_voice(config, voice_rows, seed)})
    return model, len(model.tokenizer.ids)


def time_to_first_audio(model, first_chunk_frames: int, seed: int) -> dict:
    t_request = time.perf_counter()
    player = AudioPlayer(model.config.sample_rate, stream_factory=RealTimeStream)
    first = None
    for response in stream_generate(model, "benchmark", "bench", seed=seed, max_frames=first_chunk_frames + 1,
                                     first_chunk_frames=first_chunk_frames):
        first = response
        t_chunk = time.perf_counter()
        player.queue(response.audio)  # no plan(): start at the first chunk
        break
    deadline = time.perf_counter() + 2.0
    while player.first_output_time is None and time.perf_counter() < deadline:
        time.sleep(0.0005)
    player.abort()
    return {
        "first_chunk_ms": (t_chunk - t_request) * 1e3,
        "first_sample_to_device_ms": (player.first_output_time - t_request) * 1e3,
        "first_chunk_frames": first.frames,
        "first_chunk_real_time_factor": first.real_time_factor,
    }


def bench_ttfa(layers: int, dtype: mx.Dtype, first_chunk_frames: int, seed: int) -> dict:
    t = time.perf_counter()
    model, prompt_len = reduced_model(layers, dtype, seed)
    setup_s = time.perf_counter() - t
    cold = time_to_first_audio(model, first_chunk_frames, seed)
    warm = time_to_first_audio(model, first_chunk_frames, seed + 1)
    # What the CLI would plan at the warm request's measured speed (10-frame chunks, a 10 s
    # utterance): playback waits for this lead, so below real time it dominates the first sound.
    r = warm["first_chunk_real_time_factor"]
    chunk_s = DEFAULT_CHUNK_FRAMES * 0.08
    lead_s = chunk_s + (1.1 * (1 - r) * (10.0 - chunk_s) if r < 1 else 0.0)
    for name, m in (("cold", cold), ("warm", warm)):
        log(f"  time to first audio ({name}): first chunk {m['first_chunk_ms']:8.1f} ms, "
            f"first sample at the device {m['first_sample_to_device_ms']:8.1f} ms")
    return {"layers": layers, "prompt_tokens": prompt_len, "setup_s": setup_s, "cold": cold, "warm": warm,
            "cli_planned_lead_s_for_10s_utterance": lead_s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed chunks per measurement (median; default 3)")
    p.add_argument("--frames", default="1,25", help="chunk sizes in frames, comma-separated (default 1,25)")
    p.add_argument("--context", type=int, default=25, help="left-context frames re-decoded per chunk (default 25)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--layers", type=int, default=1,
                   help="backbone and flow-matching layers for time to first audio (real: 26 and 3; default 1)")
    p.add_argument("--first-chunk-frames", type=int, default=DEFAULT_FIRST_CHUNK_FRAMES)
    p.add_argument("--skip-ttfa", action="store_true", help="only the codec figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the record to this file")
    args = p.parse_args(argv)
    chunk_sizes = [int(v) for v in args.frames.split(",")]
    dtype = DTYPES[args.dtype]

    record = {"benchmark": "bench_streaming", **environment(),
              "config": {"dtype": args.dtype, "repeats": args.repeats, "chunk_frames": chunk_sizes,
                         "context_frames": args.context, "codec": "CodecConfig() (real size), random weights"}}
    log(f"codec at the real size, {args.dtype}, median of {args.repeats}:")
    record["codec"] = bench_codec(dtype, chunk_sizes, args.context, args.repeats, args.seed)
    if not args.skip_ttfa:
        log(f"time to first audio: real configuration with {args.layers} backbone and flow layers "
            f"(NOT the full model), real codec, {args.dtype}:")
        record["ttfa"] = bench_ttfa(args.layers, dtype, args.first_chunk_frames, args.seed)
        record["ttfa"]["note"] = (
            f"backbone and flow-matching transformer reduced to {args.layers} layer(s) (real: 26 and 3); "
            "the full model's time to first audio is larger by the extra layers' prefill and per-frame "
            "cost. 'cold' includes the voice-prefix prefill, which keeps only keys and values, so the "
            "last layer's MLP never runs: with 1 layer cold is close to warm, with L layers the prefix "
            "costs about (L - 1)/L of a full prefill."
        )
    text = json.dumps(record, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
