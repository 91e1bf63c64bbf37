"""Enrollment speed and memory at the real codec size, with random weights.

    python benchmarks/bench_clone.py                                 # 5 s and 16 s, bf16 and fp32
    python benchmarks/bench_clone.py --seconds 16 --dtype float32 --checkpoint both
    python benchmarks/bench_clone.py --json results/clone.json

Builds only the codec decoder of tests/data/params_real.json (1024 wide, 8 layers, 8192 × 256
semantic codebook) with seeded random weights (``random_weights``), and runs
enrollment's compiled steps (``enroll.compiled_step``) on a random clip of each length:
``--steps`` continuous steps, then as many straight-through steps, each evaluated before the clock
stops. Each phase's first step includes compiling it; the per-step figures are medians over the
later ones. Peak memory is
``mx.get_peak_memory()`` over the run, the codec's weights included. Prints one JSON record on
stdout (and to ``--json``), a summary on stderr. Speed does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]  # run from anywhere without installing

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from bench_generate import backend_info, machine_info, software_info  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from random_weights import POOL_SIZE, random_tensor  # noqa: E402

from mlx_speech.checkpoint import expected_tensors  # noqa: E402
from mlx_speech.codec import Codec, sanitize_codec  # noqa: E402
from mlx_speech.enroll import EnrollConfig, LatentSpace, compiled_step  # noqa: E402
from mlx_speech.model import FLOAT32_KEYS, ModelConfig  # noqa: E402
from mlx_speech.spectral_loss import SpectralLoss  # noqa: E402

DEFAULT_PARAMS = _HERE.parent / "tests" / "data" / "params_real.json"
DTYPES = {"bfloat16": mx.bfloat16, "float32": mx.float32}
PREFIX = "audio_tokenizer."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_clone.py",
                                description="Enrollment step time and peak memory at the real codec size.")
    p.add_argument("--params", default=str(DEFAULT_PARAMS), help="params.json of the configuration")
    p.add_argument("--dtype", choices=[*DTYPES, "both"], default="both")
    p.add_argument("--seconds", type=float, nargs="+", default=[5.0, 16.0], help="clip lengths")
    p.add_argument("--steps", type=int, default=3,
                   help="steps per phase (continuous, then straight-through); the first compiles")
    p.add_argument("--checkpoint", choices=["off", "on", "both"], default="off",
                   help="recompute decoder activations in the backward pass (mx.checkpoint)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the record to this file")
    return p


def random_codec(config: ModelConfig, dtype: mx.Dtype, seed: int = 0) -> Codec:
    """The codec with every release tensor drawn as ``random_weights`` draws it, loaded the way a
    converted checkpoint is (weight norm folded, semantic codebook float32)."""
    rng = np.random.default_rng(seed)
    pool = mx.array(rng.standard_normal(POOL_SIZE, dtype=np.float32))
    raw = {}
    for name, shape in sorted(expected_tensors(config).items()):
        offset = int(rng.integers(POOL_SIZE))  # drawn for every tensor, as random_release_weights does
        if name.startswith(PREFIX):
            raw[name[len(PREFIX):]] = random_tensor(name, shape, mx.float32, pool, offset)
    weights = {k: v if PREFIX + k in FLOAT32_KEYS else v.astype(dtype) for k, v in sanitize_codec(raw).items()}
    codec = Codec(config.codec)
    codec.load_weights(list(weights.items()), strict=True)
    mx.eval(codec.parameters())
    return codec


def measure(codec: Codec, seconds: float, steps: int, checkpoint: bool, seed: int) -> dict:
    """Time ``steps`` compiled steps of each phase, one at a time (evaluated before the clock stops)."""
    c = codec.config
    frames = int(round(seconds * c.sampling_rate / c.samples_per_frame))
    rng = np.random.default_rng(seed)
    audio = (0.1 * rng.standard_normal((1, frames * c.samples_per_frame))).astype(np.float32)
    config = EnrollConfig()
    mx.clear_cache()
    mx.reset_peak_memory()
    space = LatentSpace(codec)
    loss_fn = SpectralLoss(replace(config.loss, sample_rate=c.sampling_rate))
    target = loss_fn.target(mx.array(audio))
    params = space.random(frames, seed, config.init_noise)
    phases = {}
    for name, quantized, lr in (("continuous", False, config.learning_rate), ("ste", True, config.ste_learning_rate)):
        step, best = compiled_step(space, loss_fn, target, params, steps, lr, quantized, checkpoint)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = step()
            mx.eval(loss, params, best)
            times.append(time.perf_counter() - t0)
        phases[name] = times
    peak = mx.get_peak_memory() / 1e9
    later = phases["continuous"][1:] + phases["ste"][1:]  # each phase's first step compiles
    per_step = statistics.median(later)
    return {
        "seconds": seconds, "frames": frames, "checkpoint": checkpoint,
        "ms_per_step": 1000 * per_step,
        "steps_per_second": 1.0 / per_step,
        "continuous_ms_per_step": 1000 * statistics.median(phases["continuous"][1:]),
        "ste_ms_per_step": 1000 * statistics.median(phases["ste"][1:]),
        "first_step_ms": {k: 1000 * v[0] for k, v in phases.items()},  # compile included
        "peak_memory_gb": peak,
        "samples_ms": {k: [round(1000 * t, 2) for t in v] for k, v in phases.items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if args.steps < 2:
        raise SystemExit(f"--steps must be at least 2 (the first compiles), got {args.steps}")
    config = ModelConfig.from_params(json.loads(Path(args.params).read_text()))
    dtypes = list(DTYPES) if args.dtype == "both" else [args.dtype]
    checkpoints = {"off": [False], "on": [True], "both": [False, True]}[args.checkpoint]
    results = []
    for dtype in dtypes:
        t0 = time.perf_counter()
        codec = random_codec(config, DTYPES[dtype], args.seed)
        weights_gb = sum(v.nbytes for _, v in tree_flatten(codec.parameters())) / 1e9
        log(f"{dtype}: codec built in {time.perf_counter() - t0:.1f} s ({weights_gb:.2f} GB of weights)")
        for seconds in args.seconds:
            for checkpoint in checkpoints:
                r = measure(codec, seconds, args.steps, checkpoint, args.seed)
                r.update(dtype=dtype, weights_gb=weights_gb)
                results.append(r)
                log(f"  {dtype} {seconds:g} s ({r['frames']} frames) checkpoint={checkpoint}: "
                    f"{r['ms_per_step']:.0f} ms/step ({r['steps_per_second']:.2f} steps/s), "
                    f"peak {r['peak_memory_gb']:.2f} GB")
        del codec
        mx.clear_cache()
    record = {
        "benchmark": "bench_clone",
        "machine": machine_info(),
        "software": software_info(),
        "backend": backend_info(),
        "config": {"params": str(args.params), "steps_per_phase": args.steps, "seed": args.seed,
                   "codec": {"dim": config.codec.dim, "semantic_codebook": config.codec.semantic_codebook_size,
                             "semantic_dim": config.codec.semantic_dim}},
        "notes": ["random weights: speed and memory only",
                  "per-step figures exclude each phase's first (compiling) step",
                  f"a default enrollment is {EnrollConfig().steps} steps"],
        "results": results,
    }
    text = json.dumps(record, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    log(f"{'dtype':<9} {'clip':>5} {'ckpt':>5} {'ms/step':>9} {'steps/s':>8} {'peak GB':>8}  "
        f"{EnrollConfig().steps}-step enrollment")
    for r in results:
        log(f"{r['dtype']:<9} {r['seconds']:>4g}s {r['checkpoint']!s:>5} {r['ms_per_step']:>9.0f} "
            f"{r['steps_per_second']:>8.2f} {r['peak_memory_gb']:>8.2f}  {EnrollConfig().steps * r['ms_per_step'] / 60000:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
