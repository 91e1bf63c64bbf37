"""Voxtral TTS prompt builder over mistral-common's Tekken tokenizer.

The prompt for a preset voice is (spec §4.1)::

    [BOS, BEGIN_AUDIO] + [AUDIO] * N_voice + [NEXT_AUDIO_TEXT] + text + [REPEAT_AUDIO_TEXT, BEGIN_AUDIO]

where ``N_voice = tekken.json["audio"]["voice_num_audio_tokens"][voice]``. The ids come
from mistral-common's ``encode_speech_request`` (the official builder); the special ids
this class exposes are resolved by name from the file, never hard-coded. Text is passed
through unchanged: no normalization (spec T27).
"""

from __future__ import annotations

import os

from mistral_common.protocol.speech.request import SpeechRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

# Attribute -> special-token name in tekken.json (mistral-common's SpecialTokens strings).
_SPECIAL_TOKENS = {
    "bos_id": "<s>",
    "eos_id": "</s>",
    "audio_id": "[AUDIO]",
    "begin_audio_id": "[BEGIN_AUDIO]",
    "next_audio_text_id": "[NEXT_AUDIO_TEXT]",
    "repeat_audio_text_id": "[REPEAT_AUDIO_TEXT]",
}


class Tokenizer:
    """Encodes text and Voxtral speech prompts with a ``tekken.json`` tokenizer.

    Args:
        tokenizer: A path to ``tekken.json``, or an already loaded
            ``mistral_common`` ``MistralTokenizer`` built from one.

    Raises:
        FileNotFoundError: If the path does not exist.
        ValueError: If the file lacks a special token the prompt needs, or has no
            ``audio.voice_num_audio_tokens`` table of preset voices.
    """

    def __init__(self, tokenizer: str | os.PathLike | MistralTokenizer):
        if isinstance(tokenizer, (str, os.PathLike)):
            path = os.fspath(tokenizer)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"No tekken tokenizer file at {path}")
            name = os.path.basename(path)
            # mistral-common recognizes a Tekken file by its name alone.
            if "tekken" not in name or not name.endswith(".json"):
                raise ValueError(
                    f"Tokenizer file name {name!r} is not recognized: mistral-common loads Tekken files "
                    "whose name contains 'tekken' and ends in '.json' (e.g. tekken.json)"
                )
            tokenizer = MistralTokenizer.from_file(path)
        self._mistral = tokenizer
        self._tekken = tokenizer.instruct_tokenizer.tokenizer
        source = self._tekken.file_path or "the tokenizer"

        missing = [name for name in _SPECIAL_TOKENS.values() if not self._tekken.is_special(name)]
        if missing:
            raise ValueError(
                f"{source} lacks the special token(s) {missing} needed for speech prompts; "
                f"required: {list(_SPECIAL_TOKENS.values())}"
            )
        self._ids = {attr: self._tekken.get_special_token(name) for attr, name in _SPECIAL_TOKENS.items()}

        audio = self._tekken.audio
        if audio is None or not audio.voice_num_audio_tokens:
            raise ValueError(f"{source} has no 'audio.voice_num_audio_tokens' section listing preset voices")
        # Plain copy in file order, so callers cannot mutate the tokenizer's config.
        self._voice_num_audio_tokens = dict(audio.voice_num_audio_tokens)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a tokenizer from a ``tekken.json`` file."""
        return cls(path)

    @property
    def mistral_tokenizer(self) -> MistralTokenizer:
        """The wrapped ``mistral_common`` tokenizer."""
        return self._mistral

    @property
    def voices(self) -> list[str]:
        """Preset voice names, in the order of ``tekken.json``."""
        return list(self._voice_num_audio_tokens)

    @property
    def voice_num_audio_tokens(self) -> dict[str, int]:
        """Number of ``[AUDIO]`` placeholders (= voice embedding rows) per preset voice."""
        return dict(self._voice_num_audio_tokens)

    @property
    def bos_id(self) -> int:
        """Id of ``<s>``."""
        return self._ids["bos_id"]

    @property
    def eos_id(self) -> int:
        """Id of ``</s>``."""
        return self._ids["eos_id"]

    @property
    def audio_id(self) -> int:
        """Id of ``[AUDIO]``: the rows replaced by the voice embedding."""
        return self._ids["audio_id"]

    @property
    def begin_audio_id(self) -> int:
        """Id of ``[BEGIN_AUDIO]``."""
        return self._ids["begin_audio_id"]

    @property
    def next_audio_text_id(self) -> int:
        """Id of ``[NEXT_AUDIO_TEXT]``, placed before the text."""
        return self._ids["next_audio_text_id"]

    @property
    def repeat_audio_text_id(self) -> int:
        """Id of ``[REPEAT_AUDIO_TEXT]``, placed after the text."""
        return self._ids["repeat_audio_text_id"]

    @property
    def vocab_size(self) -> int:
        """Total number of ids (special + text), i.e. the embedding table size."""
        return self._tekken.n_words

    def encode(self, text: str) -> list[int]:
        """Encode text to token ids, without BOS/EOS.

        Special-token strings inside ``text`` (e.g. ``"[AUDIO]"``) are encoded as plain
        text, never as special ids.
        """
        self._check_text(text)
        return self._tekken.encode(text, bos=False, eos=False)

    def encode_speech(self, text: str, voice: str) -> list[int]:
        """Build the full speech prompt for ``text`` spoken by preset ``voice``.

        Args:
            text: The text to speak, used verbatim.
            voice: A preset voice name from :attr:`voices`.

        Returns:
            ``[BOS, BEGIN_AUDIO] + [AUDIO] * N_voice + [NEXT_AUDIO_TEXT] + encode(text)
            + [REPEAT_AUDIO_TEXT, BEGIN_AUDIO]``, identical to mistral-common's
            ``encode_speech_request``.

        Raises:
            ValueError: If ``voice`` is unknown or ``text`` is empty.
        """
        self._check_text(text)
        if voice not in self._voice_num_audio_tokens:
            raise ValueError(f"Unknown voice {voice!r}; valid voices: {', '.join(self.voices)}")
        request = SpeechRequest(input=text, voice=voice)
        return list(self._mistral.encode_speech_request(request).tokens)

    @staticmethod
    def _check_text(text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"text is empty or whitespace-only ({text!r}); nothing to speak")
