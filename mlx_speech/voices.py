"""What the 20 preset voices of the release are (spec §4.4): language and gender by name.

The voice embeddings themselves live in the model folder (``voices/<name>.safetensors``);
this table only describes them for listings (CLI ``--list-voices``, README).
"""

from __future__ import annotations

_LANGUAGES = {
    "ar": "Arabic", "de": "German", "es": "Spanish", "fr": "French", "hi": "Hindi",
    "it": "Italian", "nl": "Dutch", "pt": "Portuguese",
}
_ENGLISH_STYLES = ("casual", "cheerful", "neutral")


def voice_info(name: str) -> tuple[str, str]:
    """(language, gender) of a preset from its name, e.g. ``fr_male`` → ("French", "male").

    Names outside the release's scheme give ("unknown", "unknown").
    """
    prefix, _, gender = name.rpartition("_")
    if gender not in ("male", "female"):
        return "unknown", "unknown"
    if prefix in _ENGLISH_STYLES:
        return f"English ({prefix})", gender
    return _LANGUAGES.get(prefix, "unknown"), gender
