"""mlx-speech: Voxtral-4B-TTS text-to-speech in pure MLX.

    import mlx_speech
    model = mlx_speech.load("mistralai/Voxtral-4B-TTS-2603")
    result = mlx_speech.generate(model, "Hello!", voice="neutral_female")
"""

from .generation import GenerationResponse, GenerationResult, generate, stream_generate
from .tokenizer import Tokenizer
from .utils import load

__version__ = "0.1.0"

__all__ = [
    "GenerationResponse",
    "GenerationResult",
    "Tokenizer",
    "__version__",
    "generate",
    "load",
    "stream_generate",
]
