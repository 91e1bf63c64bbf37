"""Per-stage speed of Voxtral TTS generation at the real configuration, with random weights.

    python benchmarks/bench_generate.py                       # 2 backbone layers, bfloat16
    python benchmarks/bench_generate.py --layers 26 --compare # real size, against mlx-audio
    python benchmarks/bench_generate.py --quantize 4 --json out/q4.json

Builds the model from tests/data/params_real.json with seeded random weights (no download),
times each stage of a request on its own (prefill, backbone step, flow matching, codec), and
prints one JSON record on stdout: machine, software, backend, configuration and every figure.
With --compare it runs mlx-audio's Voxtral on the same weights in the same process and adds the
ratio ours/theirs per stage. Progress and a summary table go to stderr. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]  # run from anywhere without installing

import mlx.core as mx  # noqa: E402

from mlx_speech.generation import (  # noqa: E402
    DEFAULT_CFG_ALPHA, DEFAULT_CHUNK_FRAMES, DEFAULT_FIRST_CHUNK_FRAMES, DEFAULT_FLOW_STEPS,
)
from mlx_speech.model import ModelConfig  # noqa: E402
from random_weights import (  # noqa: E402
    build_ours, parameter_bytes, prompt_ids, quantization_recipe, random_text_ids, random_voice,
)
from runners import OursRunner  # noqa: E402

DEFAULT_PARAMS = _HERE.parent / "tests" / "data" / "params_real.json"
DEFAULT_LAYERS = 2  # of 26: keeps a default run within minutes on a slow CPU backend
DEFAULT_FRAMES = 4
DEFAULT_CODEC_REPS = 2
DEFAULT_VOICE_ROWS = 218  # neutral_female, the longest preset (17.4 s)
DEFAULT_TEXT_TOKENS = 20
PRIME_FRAMES = 16  # history before the timed codec chunks: mlx-audio re-decodes up to 16 frames
FRAME_MS = 80.0  # audio per frame: 1920 samples at 24 kHz
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
STAGES = ("prefill_ms", "backbone_ms_per_frame", "flow_ms_per_frame", "codec_ms_per_frame",
          "total_ms_per_frame", "ttfa_ms")
OURS_ONLY = ("prefill_voice_miss_ms", "prefill_cached_ms", "ttfa_cached_ms", "ttfa_cached_over_uncached")


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_generate.py",
                                description="Per-stage speed of Voxtral TTS generation (random weights).")
    p.add_argument("--params", default=str(DEFAULT_PARAMS), help="params.json of the configuration")
    p.add_argument("--layers", type=int, default=DEFAULT_LAYERS,
                   help=f"backbone layers (default {DEFAULT_LAYERS}; the release has 26)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--quantize", type=int, choices=(4, 6, 8), help="quantize the backbone to this many bits")
    p.add_argument("--q-group-size", type=int, default=64)
    p.add_argument("--q-acoustic", action="store_true", help="also quantize the flow-matching transformer")
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="timed frames (median reported)")
    p.add_argument("--first-chunk-frames", type=int, default=DEFAULT_FIRST_CHUNK_FRAMES,
                   help="frames in the first audio chunk, for time-to-first-audio")
    p.add_argument("--chunk-frames", type=int, default=DEFAULT_CHUNK_FRAMES,
                   help="frames per codec chunk in steady state")
    p.add_argument("--codec-reps", type=int, default=DEFAULT_CODEC_REPS, help="timed codec chunks")
    p.add_argument("--voice-rows", type=int, default=DEFAULT_VOICE_ROWS, help="voice embedding rows in the prompt")
    p.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS, help="text tokens in the prompt")
    p.add_argument("--flow-steps", type=int, default=DEFAULT_FLOW_STEPS)
    p.add_argument("--cfg-alpha", type=float, default=DEFAULT_CFG_ALPHA)
    p.add_argument("--compare", action="store_true", help="also measure mlx-audio's Voxtral (pip install mlx-audio)")
    p.add_argument("--interleave", action="store_true",
                   help="implies --compare: hold both models and time them in turns, one stage at a time "
                        "(steadier ratios on a shared machine; needs memory for both; no peak memory)")
    p.add_argument("--e2e", action="store_true",
                   help="also time each implementation's own streaming API (costs --e2e-frames more frames)")
    p.add_argument("--e2e-frames", type=int, default=None,
                   help="frames of the --e2e run (default: first chunk + 2 chunks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the record to this file")
    return p


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn, *args):
    """Run ``fn``, evaluate what it returns, wait for the device; returns (result, ms)."""
    start = time.perf_counter()
    out = fn(*args)
    mx.eval(out)
    mx.synchronize()
    return out, (time.perf_counter() - start) * 1e3


def _tile(frames: list[mx.array], n: int) -> mx.array:
    codes = mx.concatenate(frames, axis=0)  # (F, 37)
    return mx.concatenate([codes] * math.ceil(n / codes.shape[0]), axis=0)[:n]


def _warm_up(runner, warm_ids: list[int], args) -> None:
    """Every stage once, on a short prompt, so first-call and compile costs are not timed."""
    h, _ = timed(runner.prefill, warm_ids)
    codes, _ = timed(runner.flow, h, args.flow_steps)  # compiles the solve where it is compiled
    timed(runner.step, codes)
    state = runner.new_codec_state()
    timed(runner.codec, _tile([codes], args.first_chunk_frames), state)


def stage_timings(runner, ids: list[int], warm_ids: list[int], args):
    """One request, stage by stage, each evaluated and timed on its own (no overlap).

    A generator: it yields after each timed unit of work (a prefill, a flow frame, a backbone
    step, a codec chunk) so that two implementations can take turns (``--interleave``), and
    returns the figures. ``measure_stages`` runs one alone.
    """
    _warm_up(runner, warm_ids, args)
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    yield
    h, prefill_ms = timed(runner.prefill, ids)
    yield
    miss_ms = cached_ms = None
    if hasattr(runner, "prefill_cached"):
        _, miss_ms = timed(runner.prefill_voice_miss, ids)
        h, cached_ms = timed(runner.prefill_cached, ids)  # frames continue from this one
    yield
    frames, flow_ms, step_ms = [], [], []
    for i in range(args.frames):
        codes, ms = timed(runner.flow, h, args.flow_steps)
        flow_ms.append(ms)
        frames.append(codes)
        yield
        h, ms = timed(runner.step, codes)
        step_ms.append(ms)
        log(f"  [{runner.name}] frame {i + 1}/{args.frames}: flow {flow_ms[-1]:.0f} ms, "
            f"backbone step {ms:.0f} ms")
        yield
    k1, k = args.first_chunk_frames, args.chunk_frames
    pool = _tile(frames, max(k1, k, PRIME_FRAMES))
    state = runner.new_codec_state()
    _, first_chunk_ms = timed(runner.codec, pool[:k1], state)
    runner.mid_utterance(state, pool[:PRIME_FRAMES])
    yield
    chunk_ms = []
    for _ in range(args.codec_reps):
        chunk_ms.append(timed(runner.codec, pool[:k], state)[1])
        yield
    peak = mx.get_peak_memory()

    backbone, flow = statistics.median(step_ms), statistics.median(flow_ms)
    codec = statistics.median(chunk_ms) / k
    total = backbone + flow + codec
    after_prefill = k1 * flow + (k1 - 1) * backbone + first_chunk_ms
    out = {
        "prefill_ms": prefill_ms,
        "backbone_ms_per_frame": backbone,
        "flow_ms_per_frame": flow,
        "codec_ms_per_frame": codec,
        "total_ms_per_frame": total,
        "x_real_time": FRAME_MS / total,
        "ttfa_ms": prefill_ms + after_prefill,
        "codec_first_chunk_ms": first_chunk_ms,
        "peak_memory_gb": peak / 1e9,
        "samples_ms": {"backbone": step_ms, "flow": flow_ms, "codec_chunk": chunk_ms},
    }
    if cached_ms is not None:
        out.update({
            "prefill_voice_miss_ms": miss_ms,
            "prefill_cached_ms": cached_ms,
            "ttfa_cached_ms": cached_ms + after_prefill,
            "ttfa_cached_over_uncached": (cached_ms + after_prefill) / out["ttfa_ms"],
        })
    return out


def _finish(gen) -> dict | None:
    """Advance a ``stage_timings`` generator by one unit; its figures once it is done."""
    try:
        next(gen)
    except StopIteration as done:
        return done.value
    return None


def measure_stages(runner, ids: list[int], warm_ids: list[int], args) -> dict:
    gen = stage_timings(runner, ids, warm_ids, args)
    while (out := _finish(gen)) is None:
        pass
    return out


def measure_interleaved(runners: list, ids: list[int], warm_ids: list[int], args) -> list[dict]:
    """Both implementations in turns, one timed unit each, the first alternating every round.

    Load from other tenants of a shared machine then falls on both sides of each pair of
    timings alike, which a sequential run (minutes apart at the real size) cannot promise.
    Peak memory covers both models at once, so it is dropped.
    """
    gens = [stage_timings(r, ids, warm_ids, args) for r in runners]
    results: list[dict | None] = [None] * len(gens)
    turn = 0
    while any(r is None for r in results):
        order = list(range(len(gens)))
        if turn % 2:
            order.reverse()
        for i in order:
            if results[i] is None:
                results[i] = _finish(gens[i])
        turn += 1
    for r in results:
        r.pop("peak_memory_gb")
    return results


def paired_frame_ratios(ours: dict, theirs: dict) -> list[float]:
    """Per timed frame: (flow + backbone step + codec per frame), ours over theirs, same round."""
    o, t = ours["samples_ms"], theirs["samples_ms"]
    return [(fo + so + ours["codec_ms_per_frame"]) / (ft + st + theirs["codec_ms_per_frame"])
            for fo, so, ft, st in zip(o["flow"], o["backbone"], t["flow"], t["backbone"])]


def measure_e2e(runner, ids: list[int], args) -> dict:
    """Wall time of the implementation's own streaming API: first chunk, then steady state."""
    frames = args.e2e_frames or args.first_chunk_frames + 2 * args.chunk_frames
    marks = []
    start = time.perf_counter()
    for done in runner.e2e(ids, frames, args.first_chunk_frames, args.chunk_frames, args.flow_steps):
        mx.synchronize()
        marks.append((done, time.perf_counter()))
    out = {"e2e_frames": marks[-1][0], "e2e_first_chunk_frames": marks[0][0],
           "e2e_ttfa_ms": (marks[0][1] - start) * 1e3}
    if len(marks) > 1 and marks[-1][0] > marks[0][0]:
        out["e2e_ms_per_frame"] = (marks[-1][1] - marks[0][1]) * 1e3 / (marks[-1][0] - marks[0][0])
    return out


def machine_info() -> dict:
    uname = platform.uname()
    info = {
        "processor": platform.processor() or uname.machine,
        "uname": f"{uname.system} {uname.release} {uname.machine}",
        "cpu_count": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if hasattr(mx, "device_info"):
        info["mlx_device_info"] = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    try:
        info["memory_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        pass
    return info


def software_info() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"mlx": mx.__version__}
    for pkg in ("mlx-lm", "mlx-audio"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:
        out["mlx_speech_commit"] = subprocess.run(
            ["git", "-C", str(_HERE.parent), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["mlx_speech_commit"] = None
    return out


def backend_info() -> dict:
    device = mx.default_device()
    return {
        "default_device": str(device),
        "metal_available": mx.metal.is_available(),
        "cuda_available": bool(hasattr(mx, "cuda") and mx.cuda.is_available()),
    }


def _cpu(backend: dict) -> bool:
    return backend["default_device"].startswith("Device(cpu")


def _notes(args, real_layers: int, backend: dict) -> list[str]:
    notes = ["random weights: figures are speed only; the END_AUDIO row of the semantic head is "
             "zero so no run stops early"]
    if args.layers != real_layers:
        notes.append(f"REDUCED backbone: {args.layers} of {real_layers} layers; prefill, backbone "
                     "step, total, x_real_time and ttfa are not real-size figures (flow matching "
                     "and codec are full size)")
    if _cpu(backend) and args.quantize:
        notes.append("CPU backend: no fast quantized matmul (a 4-bit backbone step runs several "
                     "times slower than bfloat16 here, prefill slower still); quantized timings "
                     "here say nothing about Apple GPUs")
    notes.append(f"ttfa_ms = prefill + {args.first_chunk_frames} x flow + "
                 f"{args.first_chunk_frames - 1} x backbone step + codec of the first "
                 f"{args.first_chunk_frames}-frame chunk (stages timed apart, no overlap)")
    notes.append("prefill_ms: the whole prompt in one backbone call, no voice cache (both "
                 "implementations); ours only: prefill_voice_miss_ms, a voice's first request "
                 "(the voice-prefix cache is filled; the prefix call evaluates only its KV, so the "
                 "last layer's post-attention work on the prefix is skipped: a large saving with "
                 "few --layers, about 1/26 of a layer at the real size), and prefill_cached_ms / "
                 "ttfa_cached_ms, the same voice again (only the text is prefilled)")
    notes.append(f"codec_ms_per_frame = median of {args.codec_reps} streamed {args.chunk_frames}-frame "
                 f"chunks / {args.chunk_frames}, mid-utterance")
    if args.e2e:
        notes.append("e2e: ours runs after the stage measurements, so its voice prefix is cached")
    if args.interleave:
        notes.append("interleaved: both models are held at once and timed in turns, one stage "
                     "unit each (who goes first alternates), so load on a shared machine falls on "
                     "both alike; no peak memory (it would cover both models); "
                     "paired_total_ratios: per frame, ours over theirs within one round")
    else:
        notes.append("peak_memory_gb: MLX peak over the timed request (weights included); each "
                     "implementation is built, measured and freed before the next")
    return notes


def _build(label: str, build):
    """Build one implementation's model; returns it with its setup time and weight size."""
    log(f"[{label}] building the model with random weights …")
    start = time.perf_counter()
    model = build()
    return model, {"setup_s": time.perf_counter() - start, "weights_gb": parameter_bytes(model) / 1e9}


def _measure_e2e_into(result: dict, runner, ids, args) -> None:
    if args.e2e:
        log(f"[{runner.name}] measuring its streaming API …")
        result.update(measure_e2e(runner, ids, args))


def run_impl(label: str, build, runner_cls, voice, ids, warm_ids, args) -> dict:
    model, result = _build(label, build)
    runner = runner_cls(model, voice, args.cfg_alpha)
    log(f"[{label}] measuring stages (warm-up, prefill of {len(ids)} tokens, {args.frames} frames, codec) …")
    result.update(measure_stages(runner, ids, warm_ids, args))
    _measure_e2e_into(result, runner, ids, args)
    del runner, model
    gc.collect()
    mx.clear_cache()
    return result


def _mlx_audio_missing() -> str | None:
    """Why mlx-audio's Voxtral cannot be imported, or None when it can."""
    try:
        import mlx_audio.tts.models.voxtral_tts  # noqa: F401
    except ImportError as e:
        return f"mlx-audio is not importable ({e}); pip install mlx-audio"
    return None


def _their_notes(quantization) -> list[str]:
    notes = ["codec: mlx-audio streams without state, re-decoding up to 16 earlier frames per chunk",
             "its flow transformer and codec compute in float32 whatever --dtype: its float32 "
             "noise and codec latent promote each matmul with the weights",
             "its semantic head runs in the model dtype (ours in float32)"]
    if quantization:
        notes.append("quantized with our recipe (backbone linears; flow transformer if --q-acoustic)")
    return notes


def _builders(params: dict, config, dtype, quantization, args):
    """(label, build) for ours and mlx-audio's, on the same seeded random weights."""
    from mlx_audio_runner import build_theirs

    return (("mlx-speech", lambda: build_ours(config, dtype, quantization, args.seed)),
            ("mlx-audio", lambda: build_theirs(params, config, dtype, quantization, args.seed)))


def run_theirs(params: dict, config, dtype, quantization, voice, ids, warm_ids, args) -> dict:
    """mlx-audio on the same weights; any failure is reported, not raised."""
    if missing := _mlx_audio_missing():
        return {"error": missing}
    from mlx_audio_runner import MlxAudioRunner

    label, build = _builders(params, config, dtype, quantization, args)[1]
    try:
        out = run_impl(label, build, MlxAudioRunner, voice, ids, warm_ids, args)
    except Exception as e:  # fail soft: the comparison is optional, ours is already measured
        import traceback

        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
    out["notes"] = _their_notes(quantization)
    return out


def run_interleaved(params: dict, config, dtype, quantization, voice, ids, warm_ids, args) -> dict:
    """Both implementations built side by side and timed in turns (``measure_interleaved``)."""
    from mlx_audio_runner import MlxAudioRunner

    (ours_model, ours_setup), (their_model, their_setup) = (
        _build(label, build) for label, build in _builders(params, config, dtype, quantization, args))
    runners = [OursRunner(ours_model, voice, args.cfg_alpha),
               MlxAudioRunner(their_model, voice, args.cfg_alpha)]
    log(f"[both] measuring stages in turns (warm-up, prefill of {len(ids)} tokens, "
        f"{args.frames} frames, codec) …")
    ours, theirs = measure_interleaved(runners, ids, warm_ids, args)
    for runner, out in zip(runners, (ours, theirs)):
        _measure_e2e_into(out, runner, ids, args)
    ours.update(ours_setup)
    theirs.update(their_setup)
    theirs["notes"] = _their_notes(quantization)
    record = {"ours": ours, "theirs": theirs}
    # Only here are the frames of a pair timed in the same round; sequential runs have no pairs.
    record["paired_total_ratios"] = paired_frame_ratios(ours, theirs)
    return record


def ratios(ours: dict, theirs: dict) -> dict:
    keys = [*STAGES, "e2e_ms_per_frame", "peak_memory_gb", "weights_gb"]
    return {k: ours[k] / theirs[k] for k in keys if k in ours and theirs.get(k)}


def summary(record: dict) -> str:
    ours, theirs = record["ours"], record.get("theirs") or {}
    ratio = record.get("ratio_ours_over_theirs", {})
    rows = [f"{'figure':<24}{'ours':>12}{'mlx-audio':>12}{'ours/theirs':>13}"]
    for k in [*STAGES, *OURS_ONLY, "x_real_time", "e2e_ms_per_frame", "e2e_ttfa_ms",
              "peak_memory_gb", "weights_gb"]:
        if k not in ours:
            continue
        t = f"{theirs[k]:12.2f}" if k in theirs else f"{'-':>12}"
        r = f"{ratio[k]:13.2f}" if k in ratio else f"{'-':>13}"
        rows.append(f"{k:<24}{ours[k]:12.2f}{t}{r}")
    if "total_paired_median" in ratio:
        rows.append(f"{'total, paired median':<48}{ratio['total_paired_median']:13.2f}")
    if "error" in theirs:
        rows.append(f"mlx-audio: {theirs['error']}")
    return "\n".join(rows)


def _round(x):
    if isinstance(x, float):
        return round(x, 3)
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_round(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    for name in ("layers", "frames", "first_chunk_frames", "chunk_frames", "codec_reps", "flow_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.interleave:
        args.compare = True
        if missing := _mlx_audio_missing():
            raise SystemExit(f"--interleave: {missing}")
    params = json.loads(Path(args.params).read_text())
    real_layers = params["n_layers"]
    params["n_layers"] = args.layers
    config = ModelConfig.from_params(params)
    dtype = DTYPES[args.dtype]
    quantization = quantization_recipe(args.quantize, args.q_group_size, args.q_acoustic)
    backend = backend_info()
    if args.layers != real_layers:
        log(f"NOTE: backbone reduced to {args.layers} of {real_layers} layers (--layers); "
            "prefill/backbone/total figures are not real-size")

    if _cpu(backend) and args.quantize:
        log("NOTE: quantized matmul is slow on the CPU backend: a 243-token prefill takes minutes "
            "per backbone layer (about 25 min for the default run with --compare); "
            "--voice-rows shortens it")
    voice = random_voice(config, args.voice_rows, args.seed)
    text = random_text_ids(config, args.text_tokens, args.seed)
    ids = prompt_ids(config, args.voice_rows, text)
    warm_ids = prompt_ids(config, min(4, args.voice_rows), text[:4])

    record = {
        "benchmark": "bench_generate",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "software": software_info(),
        "backend": backend,
        "config": {
            "params": str(args.params), "layers": args.layers, "layers_real": real_layers,
            "reduced": args.layers != real_layers, "dtype": args.dtype, "quantization": quantization,
            "prompt_tokens": len(ids), "voice_rows": args.voice_rows, "text_tokens": args.text_tokens,
            "frames": args.frames, "first_chunk_frames": args.first_chunk_frames,
            "chunk_frames": args.chunk_frames, "codec_reps": args.codec_reps,
            "flow_steps": args.flow_steps, "cfg_alpha": args.cfg_alpha, "seed": args.seed,
        },
        "notes": _notes(args, real_layers, backend),
    }
    if args.interleave:
        record["mode"] = "interleaved"
        record.update(run_interleaved(params, config, dtype, quantization, voice, ids, warm_ids, args))
    else:
        record["mode"] = "sequential"
        label, build = _builders(params, config, dtype, quantization, args)[0]
        record["ours"] = run_impl(label, build, OursRunner, voice, ids, warm_ids, args)
        if args.compare:
            record["theirs"] = run_theirs(params, config, dtype, quantization, voice, ids, warm_ids, args)
    theirs = record.get("theirs")
    if theirs and "error" not in theirs:
        record["ratio_ours_over_theirs"] = ratios(record["ours"], theirs)
        if "paired_total_ratios" in record:
            record["ratio_ours_over_theirs"]["total_paired_median"] = statistics.median(
                record["paired_total_ratios"])
    record = _round(record)
    text_out = json.dumps(record, indent=2)
    print(text_out)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text_out + "\n")
    log(summary(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
