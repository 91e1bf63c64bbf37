"""The OpenAI ``/v1/audio/speech`` request: checked field by field, before any audio is made.

Kept apart from the server so that the checks need neither Starlette nor MLX. The generation
options are checked by ``mlx_speech.options``, the one check the library and the command line
use too; every refusal here names the JSON field and the value, and says what is accepted.
Any JSON value in any field gives a ``RequestError``, never another exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .audio_io import encodable_formats
from .errors import quoted
from .options import (
    DEFAULT_CFG_ALPHA,
    DEFAULT_FLOW_STEPS,
    DEFAULT_MAX_FRAMES,
    DEFAULT_VOICE,
    check_int,
    check_options,
    check_text,
)

DEFAULT_MAX_CHARS = 4096  # the OpenAI limit for `input`
# OpenAI's default is mp3; it is encoded once the utterance is complete. wav and pcm stream.
DEFAULT_FORMAT = "mp3" if "mp3" in encodable_formats() else "wav"
STREAMED_FORMATS = ("wav", "pcm")
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg"}
FIELDS = ("model", "input", "voice", "response_format", "speed", "stream_format", "instructions",
          "seed", "cfg_alpha", "flow_steps", "max_frames")
CLONING_FIELDS = ("ref_audio", "ref_text", "reference_audio", "speaker_wav")
OPTION_FIELDS = ("seed", "cfg_alpha", "flow_steps")  # checked by options.check_options
MAX_PARAM_CHARS = 80  # an unknown field's name is echoed as `param`: bounded like any quoted value


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


def shown(value) -> str:
    """A client's value quoted for a message: bounded, and safe for any JSON value."""
    try:
        return quoted(value)
    except RecursionError:  # nested deeper than repr can follow
        return f"a deeply nested {type(value).__name__}"


def _option(payload: dict, name: str, check) -> None:
    """Run ``check`` on a field, turning its refusal into a RequestError naming the field."""
    try:
        check(payload[name])
    except ValueError as e:  # options.check_* refuse every JSON value they cannot take this way
        raise RequestError(str(e), name) from None


def _check_fields(payload: dict, voices: list[str]) -> None:
    for name in CLONING_FIELDS:
        if name in payload:
            raise RequestError(
                f"{name!r} is not supported: a voice is cloned ahead of time (python -m mlx_speech.clone, "
                f"about a minute or more), then served with --voices DIR; use one of: {', '.join(voices)}", name)
    if payload.get("instructions") not in (None, ""):
        raise RequestError("'instructions' is not supported: Voxtral cannot be steered by instructions; "
                           "choose a preset voice for the style instead", "instructions")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown field {shown(unknown[0])}; this server accepts: {', '.join(FIELDS)}",
                           unknown[0][:MAX_PARAM_CHARS])
    if payload.get("model") is not None and not isinstance(payload["model"], str):
        raise RequestError(f"model must be a string, got {shown(payload['model'])}", "model")


def _check_input(payload: dict, max_chars: int) -> str:
    text = payload.get("input")
    if not isinstance(text, str):
        raise RequestError(f"input must be a string of text to speak, got {shown(text)}", "input")
    if not text.strip():
        raise RequestError("input is empty; give some text to speak", "input")
    if len(text) > max_chars:
        raise RequestError(f"input is {len(text)} characters, over this server's limit of {max_chars} "
                           "(--max-chars)", "input")
    try:
        check_text(text, None)  # control characters
    except ValueError as e:
        raise RequestError(f"input: {e}", "input") from None
    return text


def _check_formats(payload: dict) -> tuple[str, str]:
    stream_format = payload.get("stream_format", "audio")
    if not isinstance(stream_format, str) or stream_format not in ("audio", "sse"):
        raise RequestError(f"stream_format must be 'audio' or 'sse', got {shown(stream_format)}", "stream_format")
    fmt = payload.get("response_format")
    if fmt is None:
        fmt = "pcm" if stream_format == "sse" else DEFAULT_FORMAT
    if not isinstance(fmt, str) or fmt not in MEDIA_TYPES or fmt not in encodable_formats():
        supported = ", ".join(f for f in MEDIA_TYPES if f in encodable_formats())
        raise RequestError(f"response_format {shown(fmt)} is not supported; use one of: {supported}",
                           "response_format")
    if stream_format == "sse" and fmt != "pcm":
        raise RequestError(f"stream_format 'sse' sends base64 16-bit PCM: use response_format 'pcm' "
                           f"(or leave it out), not {fmt!r}", "response_format")
    return fmt, stream_format


def parse_speech_request(payload, voices: list[str], max_chars: int) -> SpeechRequest:
    """Check an ``/v1/audio/speech`` body; every refusal names the field and the value."""
    if not isinstance(payload, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(payload).__name__}")
    _check_fields(payload, voices)
    text = _check_input(payload, max_chars)

    voice = payload.get("voice", DEFAULT_VOICE)
    if isinstance(voice, dict) and set(voice) == {"id"}:
        voice = voice["id"]
    if not isinstance(voice, str) or voice not in voices:
        raise RequestError(f"unknown voice {shown(voice)}; choose one of: {', '.join(voices)}", "voice")

    fmt, stream_format = _check_formats(payload)
    speed = payload.get("speed")
    if speed is not None and (isinstance(speed, bool) or not isinstance(speed, (int, float)) or speed != 1):
        raise RequestError(f"speed {shown(speed)} is not supported: this server speaks at the model's own "
                           "pace (speed 1.0) and does not time-stretch audio", "speed")

    options = {"seed": None, "cfg_alpha": DEFAULT_CFG_ALPHA, "flow_steps": DEFAULT_FLOW_STEPS,
               "max_frames": DEFAULT_MAX_FRAMES}
    for name in OPTION_FIELDS:
        if payload.get(name) is not None:
            _option(payload, name, lambda value, name=name: check_options(**{name: value}))
            options[name] = payload[name]
    if payload.get("max_frames") is not None:  # this server's cap: one request is at most 163.8 s
        _option(payload, "max_frames", lambda value: check_int(value, "max_frames", 1, DEFAULT_MAX_FRAMES))
        options["max_frames"] = payload["max_frames"]
    return SpeechRequest(text, voice, fmt, stream_format, options)
