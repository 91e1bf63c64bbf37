"""Time and MLX peak memory of long text without spaces, against its length (review defect S3).

    python benchmarks/measure_long_input.py                      # the golden tiny model
    python benchmarks/measure_long_input.py --unbounded 1024     # and the old one-prompt path

Text with no spaces (emoji, CJK without punctuation) used to become one prompt prefilled in one
backbone call, so time and memory grew with the square of its length (the review measured 33 s
and 2.2 GiB for 2048 emoji on the tiny model). ``split_text`` now cuts such runs between
characters and ``prefill`` feeds the backbone ``prefill_step_size`` positions at a time, so both
should grow at most linearly: this prints, per input, the pieces, prompt tokens, wall seconds,
seconds per 1000 characters and MLX peak memory of ``stream_generate_long`` with a small
``max_frames`` (the frames are not what is measured). ``--unbounded N`` also runs inputs up to N
characters the old way (one piece, one prefill call) for comparison. Prints a table and, with
``--json``, a JSON record. Figures depend on the machine and its load; assert nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent)]  # run from anywhere without installing

import mlx.core as mx  # noqa: E402

from mlx_speech import load  # noqa: E402
from mlx_speech.longform import plan_pieces, stream_generate_long  # noqa: E402

GOLDEN = _HERE.parent.parent / "shared" / "golden" / "tiny-voxtral"
VOICE = "casual_male"
KINDS = {
    "emoji": lambda n: "\U0001F600" * n,  # the review's input: 4 UTF-8 bytes each
    "cjk": lambda n: "".join(chr(0x4E00 + i * 7919 % 20000) for i in range(n)),  # no punctuation
}


def measure(model, text: str, max_frames: int, **options) -> dict:
    """One ``stream_generate_long`` run: pieces, prompt tokens, wall seconds, MLX peak memory."""
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    last = None
    for last in stream_generate_long(model, text, VOICE, seed=0, max_frames=max_frames, max_chars=None,
                                     **options):
        pass
    seconds = time.perf_counter() - start
    return {"pieces": last.pieces, "prompt_tokens": last.prompt_tokens, "seconds": seconds,
            "peak_mib": mx.get_peak_memory() / 2**20}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python benchmarks/measure_long_input.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a converted model folder (default: the golden tiny checkpoint, converted)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--kinds", nargs="+", choices=sorted(KINDS), default=sorted(KINDS))
    p.add_argument("--max-frames", type=int, default=2)
    p.add_argument("--unbounded", type=int, default=0, metavar="N",
                   help="also run inputs of up to N characters as one prompt in one prefill call")
    p.add_argument("--json", help="write the record here too")
    args = p.parse_args(argv)

    if args.model is None:
        from mlx_speech.convert import convert

        args.model = str(convert(hf_path=str(GOLDEN), mlx_path=str(Path(tempfile.mkdtemp()) / "tiny-f32"),
                                 dtype="float32", verbose=False))
    model = load(args.model)
    measure(model, KINDS["cjk"](64), args.max_frames)  # warm-up: compile the frame, fill the voice cache

    modes = {"bounded": {}}
    if args.unbounded:
        modes["unbounded"] = {"chunk_chars": 10**9, "first_chunk_chars": None, "prefill_step_size": 10**9}
    rows = []
    for kind in args.kinds:
        for n in args.lengths:
            text = KINDS[kind](n)
            for mode, options in modes.items():
                if mode == "unbounded" and n > args.unbounded:
                    continue
                if mode == "unbounded":  # the context check still applies; say so instead of failing
                    plan_pieces(model, text, VOICE, max_chars=None, max_frames=args.max_frames,
                                chunk_chars=options["chunk_chars"], first_chunk_chars=None)
                row = {"kind": kind, "chars": n, "mode": mode, **measure(model, text, args.max_frames, **options)}
                row["seconds_per_1000_chars"] = row["seconds"] / n * 1000
                rows.append(row)
                print(f"{kind:>5} {n:5d} chars {mode:>9}: {row['pieces']:3d} pieces {row['prompt_tokens']:6d} tokens "
                      f"{row['seconds']:7.2f} s ({row['seconds_per_1000_chars']:5.2f} s/1000 chars) "
                      f"peak {row['peak_mib']:7.1f} MiB", file=sys.stderr, flush=True)
    record = {"model": args.model, "voice": VOICE, "max_frames": args.max_frames, "rows": rows}
    print(json.dumps(record, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
