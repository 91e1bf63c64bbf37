"""Convert the original Voxtral-4B-TTS release to an MLX model folder.

Thin entry point; the logic lives in ``mlx_speech/convert.py`` (also ``python -m mlx_speech.convert``).
"""

from mlx_speech.convert import main

if __name__ == "__main__":
    main()
