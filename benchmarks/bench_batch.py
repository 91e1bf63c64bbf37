"""Throughput of batched generation at the real configuration, with random weights.

    python benchmarks/bench_batch.py                          # 2 backbone layers, bfloat16, batch 1 2 4 8
    python benchmarks/bench_batch.py --layers 26 --json out/batch.json   # the real size (minutes)
    python benchmarks/bench_batch.py --single --layers 1      # one stream: the decoder vs the plain loop

For each batch size B it runs ``FrameDecoder`` (the library's decode loop) with B rows and times
what one frame of all B rows costs: the pipelined decoder step (flow-matching solve of every
row + one backbone step for all, one host sync), the codec on a chunk of every row (one batched
call), and each stage alone. Aggregate throughput is B × 80 ms of audio per frame time; its ratio
to batch 1 is ``aggregate_speedup``. Next to the measured figures it prints the cost model that
carries over to Metal: weight bytes read per generated frame (they fall as 1/B) and FLOPs per
frame per row (constant), hence the batch size at which a GPU turns from memory- to
compute-bound. One JSON record on stdout (and ``--json``), a summary on stderr.

Rows start from random KV caches of slightly different lengths (as prompts of different lengths
would be, so the batch has left padding) instead of a prefill: speed does not depend on the
values, prefill is per row and unchanged by batching (``bench_generate.py`` measures it), and a
26-layer prefill would take minutes per row here.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]  # run from anywhere without installing

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import KVCache  # noqa: E402

from bench_generate import DTYPES, FRAME_MS, _round, backend_info, log, machine_info, software_info, timed  # noqa: E402
from mlx_speech.batch_generation import PreparedRow, RowStream, respond_all  # noqa: E402
from mlx_speech.acoustic import END_AUDIO  # noqa: E402
from mlx_speech.frame_decoder import FrameDecoder  # noqa: E402
from mlx_speech.options import DEFAULT_CFG_ALPHA, DEFAULT_CHUNK_FRAMES, DEFAULT_FLOW_STEPS  # noqa: E402
from mlx_speech.model import ModelConfig  # noqa: E402
from random_weights import build_ours, parameter_bytes  # noqa: E402

DEFAULT_PARAMS = _HERE.parent / "tests" / "data" / "params_real.json"
DEFAULT_LAYERS = 2
DEFAULT_BATCHES = "1,2,4,8"
DEFAULT_FRAMES = 3
DEFAULT_CONTEXT = 243  # the bench_generate prompt: 218 voice rows + 20 text tokens + 5 specials
PADDING_STEP = 2  # row b's history is 2b positions shorter than row 0's

# Apple GPUs with published figures: FP32 TFLOPS (bf16 matmuls run at about that rate on the
# GPUs before M5, which have no separate matrix units) and memory bandwidth in GB/s.
APPLE_GPUS = {
    "M1 (8-core GPU)": (2.6, 68.25),
    "M1 Max (32-core GPU)": (10.4, 400.0),
    "M2 Max (38-core GPU)": (13.6, 400.0),
    "M2 Ultra (76-core GPU)": (27.2, 800.0),
}


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_batch.py",
                                description="Aggregate throughput of batched generation (random weights).")
    p.add_argument("--params", default=str(DEFAULT_PARAMS), help="params.json of the configuration")
    p.add_argument("--layers", type=int, default=DEFAULT_LAYERS,
                   help=f"backbone layers (default {DEFAULT_LAYERS}; the release has 26)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--batch-sizes", default=DEFAULT_BATCHES, help=f"comma-separated (default {DEFAULT_BATCHES})")
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES,
                   help="timed rounds: one decoder step and one codec chunk per batch size each (median)")
    p.add_argument("--stage-reps", type=int, default=1, help="timed calls of each stage alone per batch size")
    p.add_argument("--chunk-frames", type=int, default=DEFAULT_CHUNK_FRAMES, help="frames per codec chunk")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="KV history of row 0 (positions)")
    p.add_argument("--flow-steps", type=int, default=DEFAULT_FLOW_STEPS)
    p.add_argument("--cfg-alpha", type=float, default=DEFAULT_CFG_ALPHA)
    p.add_argument("--single", action="store_true",
                   help="instead: one stream, the FrameDecoder (a batch of one) against the plain "
                        "pre-batching loop, in alternating rounds")
    p.add_argument("--rounds", type=int, default=3, help="--single: alternating rounds")
    p.add_argument("--gpu-tflops", type=float, help="also estimate the compute-bound batch for this GPU …")
    p.add_argument("--gpu-bandwidth", type=float, help="… with this memory bandwidth in GB/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the record to this file")
    return p


# ---- rows without a prefill --------------------------------------------------------------------
def random_row(model, length: int, seed: int) -> tuple[list[KVCache], mx.array]:
    """A row as a prefill would leave it: per-layer KV history of ``length`` positions and the
    last hidden state (1, dim), drawn at random (speed does not depend on the values)."""
    b = model.config.backbone
    key = mx.random.key(seed)
    dtype = model.backbone.norm.weight.dtype
    caches = []
    for _ in range(b.n_layers):
        key, k1, k2 = mx.random.split(key, 3)
        kv = [mx.random.normal((1, b.n_kv_heads, length, b.head_dim), key=k).astype(dtype) for k in (k1, k2)]
        c = KVCache()
        c.state = (*kv, length)
        caches.append(c)
    hidden = mx.random.normal((1, b.dim), key=key).astype(dtype)
    mx.eval([c.state for c in caches], hidden)
    return caches, hidden


def row_lengths(context: int, batch: int) -> list[int]:
    return [max(1, context - PADDING_STEP * b) for b in range(batch)]


def check_never_ends(frames) -> None:
    """Random weights never pick END_AUDIO (its head row is zero); checked, not assumed."""
    if any(f.codes is None for f in frames):
        raise SystemExit(f"a row produced END_AUDIO ({END_AUDIO}) on random weights; the figures would be short")


# ---- every batch size, in turns -----------------------------------------------------------------
class BatchUnderTest:
    """A decoder with ``batch`` rows in steady state and their codec streams mid-utterance."""

    def __init__(self, model, batch: int, args):
        self.model, self.batch, self.args = model, batch, args
        self.lengths = row_lengths(args.context, batch)
        self.decoder = FrameDecoder(model, cfg_alpha=args.cfg_alpha, flow_steps=args.flow_steps)
        cap = 4 + args.frames + 2 * args.stage_reps
        for b, n in enumerate(self.lengths):
            self.decoder.add(b, *random_row(model, n, args.seed + b), frame_cap=cap, seed=args.seed + b)
        self.frames = self.decoder.step()  # warm-up: merges the rows, compiles the solve for this batch
        check_never_ends(self.frames)
        self.chunk = [self.frames[b % batch].codes for b in range(args.chunk_frames)]
        plan = PreparedRow("", None, [], 1 << 20, chunk_frames=args.chunk_frames)
        self.streams = [RowStream(model, plan, time.perf_counter()) for _ in range(batch)]
        for s in self.streams:
            s.pending = self.chunk[:2]
        respond_all(self.streams, [None] * batch)  # fills every conv tail and attention window
        self.samples = {"decoder_step": [], "codec_chunk": [], "flow": [], "backbone_step": []}

    def time_frame(self) -> tuple[float, float]:
        """One decoder step, including the backbone step it queues, and one codec chunk of every
        row (one batched call), timed apart.

        The backbone step is waited for inside the timed step: MLX runs a stream's graphs in
        order, so otherwise the codec call queued behind it would be charged with it (on this
        backend nothing overlaps but host work, so step + codec share is the true frame cost).
        """
        start = time.perf_counter()
        self.frames = self.decoder.step()
        mx.eval(self.decoder._hidden)  # the next frame's hidden states: the queued backbone step
        step = (time.perf_counter() - start) * 1e3
        check_never_ends(self.frames)
        for s in self.streams:
            s.pending = list(self.chunk)
        start = time.perf_counter()
        respond_all(self.streams, [None] * self.batch)
        codec = (time.perf_counter() - start) * 1e3
        self.samples["decoder_step"].append(step)
        self.samples["codec_chunk"].append(codec)
        return step, codec

    def time_stages(self) -> None:
        """The flow solve and the backbone step alone, on the decoder's own batch state."""
        decoder, model = self.decoder, self.model
        hidden, cache = decoder._hidden, decoder._cache  # borrowed: exactly what the decoder runs
        mx.eval(hidden)
        x0 = mx.random.normal((self.batch, model.config.acoustic.n_acoustic_codebook))
        self.samples["flow"].append(timed(model.acoustic_transformer, hidden, x0, self.args.flow_steps,
                                          self.args.cfg_alpha)[1])
        codes = mx.stack([f.codes for f in self.frames])
        self.samples["backbone_step"].append(
            timed(lambda: model(model.audio_code_embeddings(codes)[:, None], cache)[:, -1])[1])

    def figures(self) -> dict:
        m = {k: statistics.median(v) for k, v in self.samples.items()}
        codec = m["codec_chunk"] / self.args.chunk_frames
        frame_ms = m["decoder_step"] + codec
        return {
            "batch": self.batch, "row_history_positions": self.lengths,
            "decoder_step_ms": m["decoder_step"], "codec_ms_per_frame": codec,
            "frame_ms": frame_ms, "frame_ms_per_row": frame_ms / self.batch,
            "aggregate_audio_s_per_s": self.batch * FRAME_MS / frame_ms,
            "stages_alone_ms": {"backbone_step": m["backbone_step"], "flow": m["flow"], "codec_per_frame": codec},
            "samples_ms": self.samples,
        }


def measure_batches(model, batches: list[int], args) -> tuple[list[dict], dict, float]:
    """Every batch size held at once and timed in rounds, one frame each per round, the order
    reversed every round, so load from other tenants of a shared machine falls on all alike.

    Returns the figures per batch size, the per-round speedups over batch 1, and the peak memory.
    """
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    runs = {}
    for batch in batches:
        log(f"batch {batch}: rows, warm-up step, codec priming …")
        runs[batch] = BatchUnderTest(model, batch, args)
    paired = {b: [] for b in batches}
    for r in range(args.frames):
        order = batches if r % 2 == 0 else batches[::-1]
        frame_ms = {}
        for batch in order:
            step, codec = runs[batch].time_frame()
            frame_ms[batch] = step + codec / args.chunk_frames
            log(f"  round {r + 1}/{args.frames}, batch {batch}: decoder step {step:.0f} ms, "
                f"codec chunk {codec:.0f} ms")
        for batch in batches:
            paired[batch].append(batch * frame_ms[1] / frame_ms[batch])
    for r in range(args.stage_reps):
        for batch in batches if r % 2 == 0 else batches[::-1]:
            runs[batch].time_stages()
            st = runs[batch].samples
            log(f"  stages alone, batch {batch}: flow {st['flow'][-1]:.0f} ms, backbone step {st['backbone_step'][-1]:.0f} ms")
    return [runs[b].figures() for b in batches], paired, mx.get_peak_memory() / 1e9


# ---- one stream: the decoder against the loop it replaced ---------------------------------------
def plain_loop(model, cache, hidden, frames: int, seed: int, flow_steps: int, cfg_alpha: float):
    """The single-stream loop as it was before batching (generate_step after its prefill)."""
    key = mx.random.key(seed)
    head = model.acoustic_transformer
    for i in range(frames):
        key, sub = mx.random.split(key)
        codes = head(hidden, mx.random.normal((1, model.config.acoustic.n_acoustic_codebook), key=sub),
                     flow_steps, cfg_alpha)
        if i + 1 < frames:
            hidden = model(model.audio_code_embeddings(codes)[:, None], cache)[:, -1]
            mx.async_eval(hidden)
        if codes[0, 0].item() == END_AUDIO:
            return
        yield codes[0]


def decoder_loop(model, cache, hidden, frames: int, seed: int, flow_steps: int, cfg_alpha: float):
    decoder = FrameDecoder(model, cfg_alpha=cfg_alpha, flow_steps=flow_steps)
    decoder.add(0, cache, hidden, frame_cap=frames, seed=seed)
    while len(decoder):
        (frame,) = decoder.step()
        if frame.codes is None:
            return
        yield frame.codes


def measure_single(model, args) -> dict:
    """Per-frame time of one stream through each loop, in alternating rounds (who goes first
    alternates), from identical starting states; also checks that both give the same codes."""
    frames = args.frames + 1
    loops = {"plain_loop": plain_loop, "frame_decoder": decoder_loop}
    ms = {name: [] for name in loops}
    codes = {}
    for r in range(args.rounds):
        order = list(loops) if r % 2 == 0 else list(loops)[::-1]
        for name in order:
            cache, hidden = random_row(model, args.context, args.seed)
            marks, out = [time.perf_counter()], []
            for c in loops[name](model, cache, hidden, frames, args.seed, args.flow_steps, args.cfg_alpha):
                out.append(c)
                marks.append(time.perf_counter())
            # The first frame includes the row's first solve; the rest are steady-state frames.
            ms[name] += [(b - a) * 1e3 for a, b in zip(marks[1:], marks[2:])]
            codes[name] = mx.stack(out)
            log(f"  round {r + 1}/{args.rounds} {name}: {statistics.median(ms[name][-(frames - 1):]):.1f} ms/frame")
    same = bool(mx.array_equal(codes["plain_loop"], codes["frame_decoder"]).item())
    plain, ours = statistics.median(ms["plain_loop"]), statistics.median(ms["frame_decoder"])
    return {"plain_loop_ms_per_frame": plain, "frame_decoder_ms_per_frame": ours,
            "decoder_over_plain": ours / plain, "same_codes": same, "samples_ms": ms}


# ---- the cost model ----------------------------------------------------------------------------
def _module_bytes(module) -> int:
    return parameter_bytes(module)


def cost_model(model, args) -> dict:
    """Weight bytes read per decode step (the whole batch) and FLOPs per frame per row.

    Each weight is read once per batched call whatever B (the minimum; a kernel that re-reads
    weight tiles per row block reads more), so weight bytes per generated frame fall as 1/B,
    while FLOPs per row and KV-cache bytes per row do not.
    """
    c = model.config
    b, a, k = c.backbone, c.acoustic, c.codec
    head = model.acoustic_transformer
    steps = args.flow_steps

    backbone_bytes = sum(_module_bytes(layer) for layer in model.backbone.layers) + _module_bytes(model.backbone.norm)
    flow_step_bytes = (sum(_module_bytes(layer) for layer in head.layers) + _module_bytes(head.norm)
                       + _module_bytes(head.input_projection) + _module_bytes(head.acoustic_codebook_output))
    first = head.layers[0].attention
    flow_frame_bytes = (_module_bytes(head.llm_projection) + _module_bytes(head.semantic_codebook_output)
                        + _module_bytes(first.wq) + _module_bytes(first.wk) + _module_bytes(first.wv))
    codec_bytes = _module_bytes(model.audio_tokenizer) - _module_bytes(model.audio_tokenizer.quantizer)
    step_bytes = backbone_bytes + steps * flow_step_bytes + flow_frame_bytes + codec_bytes / args.chunk_frames
    kv_bytes_per_row = 2 * b.n_layers * b.n_kv_heads * b.head_dim * args.context * model.backbone.norm.weight.dtype.size

    # FLOPs = 2 × multiply-adds, per row and frame.
    def layer_macs(dim, heads, kv_heads, head_dim, hidden):
        qkv = dim * heads * head_dim + 2 * dim * kv_heads * head_dim
        return qkv, heads * head_dim * dim, 3 * dim * hidden

    qkv, wo, ffn = layer_macs(b.dim, b.n_heads, b.n_kv_heads, b.head_dim, b.hidden_dim)
    backbone = 2 * b.n_layers * (qkv + wo + ffn + 2 * b.n_heads * b.head_dim * args.context)
    fq, fwo, fffn = layer_macs(a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.hidden_dim)
    attn3 = 2 * a.n_heads * a.head_dim * 3  # one query over 3 keys: scores and values
    n = a.n_layers
    # Our solve per Euler step and row (both CFG branches = 2 sequences of 3 tokens): x_t's
    # first-layer projections once for both branches (the time token's come with the schedule,
    # the llm token's once per frame), middle layers in full, the last layer's queries, output
    # projection and FFN for token 0 only.
    euler = a.n_acoustic_codebook * a.dim + fq
    last = 2 * (attn3 + fwo + fffn)  # the last layer's token-0 work, both branches
    if n > 1:
        euler += 2 * 3 * (attn3 + fwo + fffn)  # layer 0 on all 3 tokens
        euler += (n - 2) * 2 * 3 * (fq + attn3 + fwo + fffn)
        last += 2 * (3 * 2 * a.dim * a.n_kv_heads * a.head_dim + a.dim * a.n_heads * a.head_dim)
    euler += last + 2 * a.dim * a.n_acoustic_codebook
    flow = 2 * (steps * euler + a.input_dim * a.dim + 2 * fq + a.input_dim * a.semantic_head_size)
    flow_naive = 2 * (2 * steps) * 3 * n * (fq + fwo + fffn)  # the reference: 14 full 3-token passes
    # Codec per frame: stage i runs at prod(strides[:i+1]) positions per frame.
    cq, cwo, cffn = layer_macs(k.dim, k.n_heads, k.n_kv_heads, k.head_dim, k.hidden_dim)
    codec, rate = 0, 1
    codec += k.conv_kernels[0] * k.latent_dim * k.dim  # input conv at 1 position per frame
    for i, (layers, window) in enumerate(zip(k.transformer_lengths, k.window_sizes)):
        if i > 0:
            codec += rate * k.conv_kernels[i] * k.dim * k.dim  # transposed conv, per input position
            rate *= k.conv_strides[i]
        codec += rate * layers * (cq + cwo + cffn + 2 * k.n_heads * k.head_dim * (window + 1))
    codec += rate * k.output_kernel_size * k.dim * k.patch_size
    codec *= 2
    flops = backbone + flow + codec
    return {
        "weight_bytes_per_decode_step": {
            "backbone": backbone_bytes, "flow_per_euler_step": flow_step_bytes, "flow_euler_steps": steps,
            "flow_once_per_frame": flow_frame_bytes, "codec_per_chunk": codec_bytes,
            "codec_chunk_frames": args.chunk_frames, "total": step_bytes,
        },
        "kv_cache_bytes_per_row_per_frame": kv_bytes_per_row,
        "flops_per_frame_per_row": {"backbone_step": backbone, "flow": flow, "flow_as_14_full_passes": flow_naive,
                                    "codec": codec, "total": flops},
        "weight_bytes_per_generated_frame": {
            str(bsz): step_bytes / bsz + kv_bytes_per_row for bsz in parse_batches(args.batch_sizes)},
    }


def compute_bound_batch(cost: dict, tflops: float, bandwidth_gbs: float) -> dict:
    """Where a GPU turns compute-bound: B × FLOPs / peak = (weights + B × KV) / bandwidth."""
    w = cost["weight_bytes_per_decode_step"]["total"]
    kv = cost["kv_cache_bytes_per_row_per_frame"]
    f = cost["flops_per_frame_per_row"]["total"]
    peak, bw = tflops * 1e12, bandwidth_gbs * 1e9
    weights_ms = w / bw * 1e3
    row_ms = f / peak * 1e3
    kv_ms = kv / bw * 1e3
    b_star = weights_ms / (row_ms - kv_ms) if row_ms > kv_ms else float("inf")
    return {
        "tflops": tflops, "bandwidth_gb_s": bandwidth_gbs,
        "weights_read_ms_per_step": weights_ms, "compute_ms_per_row": row_ms, "kv_read_ms_per_row": kv_ms,
        "compute_bound_from_batch": b_star,
        "arithmetic": (f"B* = (weights {w / 1e9:.2f} GB / {bandwidth_gbs:.0f} GB/s = {weights_ms:.1f} ms) / "
                       f"(FLOPs {f / 1e9:.1f} G / {tflops:.1f} TFLOPS = {row_ms:.2f} ms per row − KV "
                       f"{kv / 1e6:.1f} MB / {bandwidth_gbs:.0f} GB/s = {kv_ms:.2f} ms) = {b_star:.1f}"),
        "frame_ms_at_batch": {str(bsz): max(weights_ms + bsz * kv_ms, bsz * row_ms) for bsz in (1, 2, 4, 8, 16, 32)},
    }


def parse_batches(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1 or 1 not in sizes:
        raise SystemExit(f"--batch-sizes must be at least 1 and include 1 (the baseline), got {text!r}")
    return sorted(set(sizes))


def _notes(args, real_layers: int) -> list[str]:
    notes = [
        "random weights and random KV histories (rows of --context, --context-2, … positions, so the "
        "merged batch has left padding); prefill is per row, unchanged by batching, and not included",
        "decoder_step_ms: median wall time of FrameDecoder.step() with B rows, up to the end of the "
        "backbone step it queues: the flow-matching solve of every row (one compiled graph, both CFG "
        "branches), one host sync, one backbone step for all rows",
        "codec_ms_per_frame: one batched codec call on a --chunk-frames chunk of every row (mid-utterance), "
        "÷ chunk frames",
        "frame_ms = decoder_step_ms + codec_ms_per_frame: one frame of every row; aggregate_audio_s_per_s "
        "= B × 80 ms / frame_ms; aggregate_speedup = that over batch 1",
        "stages_alone_ms: each stage evaluated on its own for the whole batch (no overlap)",
        "every batch size is held at once and timed in rounds (one frame each, the order reversed every "
        "round), so load on a shared machine falls on all alike; aggregate_speedup_per_round pairs the "
        "frames of one round; peak_memory_gb covers all batch sizes together",
        "cost model: weights are read once per batched call (the minimum), so weight bytes per generated "
        "frame fall as 1/B; FLOPs and KV-cache bytes per row do not. On a GPU a decode step is bound by "
        "reading the weights until B × FLOPs/peak exceeds that read time: compute_bound_estimates. MLX's CPU "
        "backend instead pays most of the matmul cost per row (its kernels are compute-bound already at "
        "B = 1 on 2 cores), so CPU speedups understate what Metal gets",
    ]
    if args.layers != real_layers:
        notes.insert(0, f"REDUCED backbone: {args.layers} of {real_layers} layers; decoder step, frame and "
                        "aggregate figures are not real-size (flow matching and codec are full size); the "
                        "cost model is computed for the layers built")
    return notes


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    for name in ("layers", "frames", "stage_reps", "chunk_frames", "context", "flow_steps", "rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if (args.gpu_tflops is None) != (args.gpu_bandwidth is None):
        raise SystemExit("--gpu-tflops and --gpu-bandwidth go together")
    batches = parse_batches(args.batch_sizes)
    if args.chunk_frames < 2:
        raise SystemExit("--chunk-frames must be at least 2 (the codec is primed with 2 frames)")
    params = json.loads(Path(args.params).read_text())
    real_layers = params["n_layers"]
    params["n_layers"] = args.layers
    config = ModelConfig.from_params(params)
    log(f"building the model ({args.layers} of {real_layers} backbone layers, {args.dtype}) …")
    start = time.perf_counter()
    model = build_ours(config, DTYPES[args.dtype], None, args.seed)
    setup_s = time.perf_counter() - start
    record = {
        "benchmark": "bench_batch",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "software": software_info(),
        "backend": backend_info(),
        "config": {"params": str(args.params), "layers": args.layers, "layers_real": real_layers,
                   "reduced": args.layers != real_layers, "dtype": args.dtype, "context": args.context,
                   "frames": args.frames, "stage_reps": args.stage_reps, "batch_sizes": batches,
                   "chunk_frames": args.chunk_frames, "flow_steps": args.flow_steps,
                   "cfg_alpha": args.cfg_alpha, "seed": args.seed},
        "setup_s": setup_s,
        "weights_gb": parameter_bytes(model) / 1e9,
    }
    if args.single:
        record["mode"] = "single"
        log(f"one stream, {args.rounds} alternating rounds of {args.frames + 1} frames per loop …")
        record["single"] = measure_single(model, args)
        s = record["single"]
        aggregate = {}
        summary = (f"plain loop {s['plain_loop_ms_per_frame']:.1f} ms/frame, FrameDecoder "
                   f"{s['frame_decoder_ms_per_frame']:.1f} ms/frame (ratio {s['decoder_over_plain']:.3f}), "
                   f"same codes: {s['same_codes']}")
    else:
        record["mode"] = "batch"
        record["notes"] = _notes(args, real_layers)
        results, paired, peak = measure_batches(model, batches, args)
        base = results[0]["aggregate_audio_s_per_s"]
        record["batches"] = results
        record["peak_memory_gb"] = peak
        aggregate = {str(r["batch"]): r["aggregate_audio_s_per_s"] for r in results}
        record["aggregate_audio_s_per_s"] = aggregate
        record["aggregate_speedup"] = {str(r["batch"]): r["aggregate_audio_s_per_s"] / base for r in results}
        record["aggregate_speedup_per_round"] = {str(b): v for b, v in paired.items()}
        cost = cost_model(model, args)
        record["cost_model"] = cost
        gpus = dict(APPLE_GPUS)
        if args.gpu_tflops is not None:
            gpus["given (--gpu-tflops, --gpu-bandwidth)"] = (args.gpu_tflops, args.gpu_bandwidth)
        record["compute_bound_estimates"] = {name: compute_bound_batch(cost, *spec) for name, spec in gpus.items()}
        rows = [f"{'batch':>5}{'frame ms':>11}{'per row':>10}{'audio s/s':>11}{'speedup':>9}{'flow':>9}"
                f"{'backbone':>10}{'codec/fr':>10}"]
        for r in results:
            st = r["stages_alone_ms"]
            rows.append(f"{r['batch']:>5}{r['frame_ms']:>11.0f}{r['frame_ms_per_row']:>10.0f}"
                        f"{r['aggregate_audio_s_per_s']:>11.3f}{record['aggregate_speedup'][str(r['batch'])]:>9.2f}"
                        f"{st['flow']:>9.0f}{st['backbone_step']:>10.0f}{st['codec_per_frame']:>10.0f}")
        rows.append(f"peak memory (every batch size held at once) {peak:.2f} GB")
        rows += [f"{name}: compute-bound from batch {e['compute_bound_from_batch']:.1f}"
                 for name, e in record["compute_bound_estimates"].items()]
        summary = "\n".join(rows)
    record = _round(record)
    if "batches" in record:  # a few hundredths of audio seconds per second: keep 4 significant digits
        record["aggregate_audio_s_per_s"] = {k: float(f"{v:.4g}") for k, v in aggregate.items()}
        for r, v in zip(record["batches"], aggregate.values()):
            r["aggregate_audio_s_per_s"] = float(f"{v:.4g}")
    text = json.dumps(record, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    log(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
