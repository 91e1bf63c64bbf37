"""The OpenAI ``/v1/audio/speech`` request: checked field by field, before any audio is made.

Kept apart from the server so that the checks need neither Starlette nor MLX. Every refusal
names the field and the value, and says what would be accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .audio_io import encodable_formats
from .generation import DEFAULT_CFG_ALPHA, DEFAULT_FLOW_STEPS, DEFAULT_MAX_FRAMES, DEFAULT_VOICE
from .longform import check_text

DEFAULT_MAX_CHARS = 4096  # the OpenAI limit for `input`
# OpenAI's default is mp3; it is encoded once the utterance is complete. wav and pcm stream.
DEFAULT_FORMAT = "mp3" if "mp3" in encodable_formats() else "wav"
STREAMED_FORMATS = ("wav", "pcm")
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg"}
FIELDS = ("model", "input", "voice", "response_format", "speed", "stream_format", "instructions",
          "seed", "cfg_alpha", "flow_steps", "max_frames")
CLONING_FIELDS = ("ref_audio", "ref_text", "reference_audio", "speaker_wav")


class RequestError(Exception):
    """A request the server refuses: becomes an OpenAI-style error body with this status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status



@dataclass
class SpeechRequest:
    input: str
    voice: str
    response_format: str
    stream_format: str
    options: dict = field(default_factory=dict)  # keyword arguments of stream_generate_long


def _number(payload: dict, name: str, lo: float, hi: float, integer: bool = False):
    value = payload.get(name)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise RequestError(f"{name} must be {what} from {lo} to {hi}, got {value!r}", name)
    return value


def parse_speech_request(payload, voices: list[str], max_chars: int) -> SpeechRequest:
    """Check an ``/v1/audio/speech`` body; every refusal names the field and the value."""
    if not isinstance(payload, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(payload).__name__}")
    for name in CLONING_FIELDS:
        if name in payload:
            raise RequestError(
                f"{name!r} is not supported: cloning a voice from reference audio is not possible with "
                f"the open Voxtral weights (the codec encoder was not released); use a preset voice: "
                f"{', '.join(voices)}", name)
    if payload.get("instructions") not in (None, ""):
        raise RequestError("'instructions' is not supported: Voxtral cannot be steered by instructions; "
                           "choose a preset voice for the style instead", "instructions")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}; this server accepts: {', '.join(FIELDS)}", unknown[0])
    if payload.get("model") is not None and not isinstance(payload["model"], str):
        raise RequestError(f"model must be a string, got {payload['model']!r}", "model")

    text = payload.get("input")
    if not isinstance(text, str):
        raise RequestError(f"input must be a string of text to speak, got {text!r}", "input")
    if not text.strip():
        raise RequestError("input is empty; give some text to speak", "input")
    if len(text) > max_chars:
        raise RequestError(f"input is {len(text)} characters, over this server's limit of {max_chars} "
                           "(--max-chars)", "input")
    try:
        check_text(text, None)  # control characters
    except ValueError as e:
        raise RequestError(f"input: {e}", "input") from None

    voice = payload.get("voice", DEFAULT_VOICE)
    if isinstance(voice, dict) and set(voice) == {"id"}:
        voice = voice["id"]
    if not isinstance(voice, str) or voice not in voices:
        raise RequestError(f"unknown voice {voice!r}; choose one of: {', '.join(voices)}", "voice")

    stream_format = payload.get("stream_format", "audio")
    if stream_format not in ("audio", "sse"):
        raise RequestError(f"stream_format must be 'audio' or 'sse', got {stream_format!r}", "stream_format")
    fmt = payload.get("response_format")
    if fmt is None:
        fmt = "pcm" if stream_format == "sse" else DEFAULT_FORMAT
    if fmt not in MEDIA_TYPES or fmt not in encodable_formats():
        supported = ", ".join(f for f in MEDIA_TYPES if f in encodable_formats())
        raise RequestError(f"response_format {fmt!r} is not supported; use one of: {supported}", "response_format")
    if stream_format == "sse" and fmt != "pcm":
        raise RequestError(f"stream_format 'sse' sends base64 16-bit PCM: use response_format 'pcm' "
                           f"(or leave it out), not {fmt!r}", "response_format")

    speed = payload.get("speed")
    if speed is not None and (isinstance(speed, bool) or not isinstance(speed, (int, float)) or speed != 1):
        raise RequestError(f"speed {speed!r} is not supported: this server speaks at the model's own pace "
                           "(speed 1.0) and does not time-stretch audio", "speed")

    options = {
        "seed": _number(payload, "seed", 0, 2**64 - 1, integer=True),
        "cfg_alpha": _number(payload, "cfg_alpha", 0.0, 10.0),
        "flow_steps": _number(payload, "flow_steps", 1, 64, integer=True),
        "max_frames": _number(payload, "max_frames", 1, DEFAULT_MAX_FRAMES, integer=True),
    }
    defaults = {"cfg_alpha": DEFAULT_CFG_ALPHA, "flow_steps": DEFAULT_FLOW_STEPS, "max_frames": DEFAULT_MAX_FRAMES}
    options = {k: v if v is not None else defaults.get(k) for k, v in options.items()}
    return SpeechRequest(text, voice, fmt, stream_format, options)
