"""Stream speech to the speakers while it is generated.

    python examples/stream_play.py "Streaming speech, without a gap." --voice neutral_male

The player times the chunks as they arrive and starts once it can play to the end without a gap:
at the second chunk when generation is faster than real time. When it is slower, it waits for the
end, unless it is told how long the speech will be: ``AudioPlayer(..., expected_seconds=...)``
(an underestimate can then leave a gap near the end).
"""

import argparse

import mlx_speech
from mlx_speech.player import AudioPlayer

parser = argparse.ArgumentParser()
parser.add_argument("text")
parser.add_argument("--voice", default="neutral_female")
parser.add_argument("--model", default="mistralai/Voxtral-4B-TTS-2603")
args = parser.parse_args()

model = mlx_speech.load(args.model)
with AudioPlayer(model.config.sample_rate) as player:
    for chunk in mlx_speech.stream_generate(model, args.text, voice=args.voice):
        player.queue(chunk.audio)
        print(f"\r{chunk.audio_seconds:6.2f} s, {chunk.real_time_factor:.2f}x real time", end="")
print(f"\nunderruns: {player.underruns}")
