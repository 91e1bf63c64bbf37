"""Speak one sentence into a file.

    python examples/speak.py "Hello from my Mac." hello.wav --voice casual_male
"""

import argparse

import mlx_speech
from mlx_speech.audio_io import write_audio

parser = argparse.ArgumentParser()
parser.add_argument("text")
parser.add_argument("output", help="e.g. hello.wav")
parser.add_argument("--voice", default="neutral_female")
parser.add_argument("--model", default="mistralai/Voxtral-4B-TTS-2603")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

model = mlx_speech.load(args.model)
result = mlx_speech.generate(model, args.text, voice=args.voice, seed=args.seed)
write_audio(args.output, result.audio, result.sample_rate)
print(f"{result.audio_seconds:.2f} s of audio in {result.elapsed:.2f} s "
      f"({result.real_time_factor:.2f}x real time), finished by {result.finish_reason}")
