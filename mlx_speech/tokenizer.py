"""Voxtral TTS prompt builder over mistral-common's Tekken tokenizer.

The prompt for a preset voice is (spec §4.1)::

    [BOS, BEGIN_AUDIO] + [AUDIO] * N_voice + [NEXT_AUDIO_TEXT] + text + [REPEAT_AUDIO_TEXT, BEGIN_AUDIO]

where ``N_voice`` is the voice's row count: ``tekken.json["audio"]["voice_num_audio_tokens"]
[voice]`` for a preset, ``Voice.rows`` for a custom voice (``encode_speech_prompt``). The
sequence is the one mistral-common's ``encode_speech_request`` (the official builder) makes,
which the tests check for every preset; the special ids are resolved by name from the file,
never hard-coded. Text is passed through unchanged: no normalization (spec T27).

A ``tekken.json`` is untrusted input: a damaged or hostile one is refused with one
``CheckpointError`` line naming the file, never a traceback from inside mistral-common.
"""

from __future__ import annotations

import json
import os

from mistral_common.exceptions import MistralCommonException
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from .errors import file_error, quoted
from .options import check_int

# Attribute -> special-token name in tekken.json (mistral-common's SpecialTokens strings).
_SPECIAL_TOKENS = {
    "bos_id": "<s>",
    "eos_id": "</s>",
    "audio_id": "[AUDIO]",
    "begin_audio_id": "[BEGIN_AUDIO]",
    "next_audio_text_id": "[NEXT_AUDIO_TEXT]",
    "repeat_audio_text_id": "[REPEAT_AUDIO_TEXT]",
}

# Bounds checked before mistral-common reads a file: it builds one Python object per special-token
# slot and per vocabulary rank, so an absurd count in a hostile file would take minutes and
# gigabytes (10**7 special tokens: 32 s). The release has 14.9 MB, 1000 specials, 131072 ids.
MAX_TEKKEN_BYTES = 64 << 20
MAX_SPECIAL_TOKENS = 1 << 16
MAX_VOCAB_SIZE = 1 << 22

# What mistral-common raises for a malformed file (a missing key, a wrong type, a failed assert,
# an unknown control token, bad base64 or regex), all turned into one CheckpointError line.
_LOAD_ERRORS = (
    AssertionError, AttributeError, IndexError, KeyError, TypeError, ValueError, RecursionError,
    MistralCommonException,
)


def _max_voice_rows() -> int:
    # Imported here: voice_file imports MLX, and the tokenizer alone does not need it.
    from .voice_file import MAX_VOICE_ROWS

    return MAX_VOICE_ROWS


def _precheck_tekken(path: str) -> None:
    """Refuse, naming ``path``, a file too large, not JSON, or whose sizes are out of bounds."""
    size = os.path.getsize(path)
    if size > MAX_TEKKEN_BYTES:
        raise file_error(path, f"tokenizer file is {size} bytes; a tekken.json is at most {MAX_TEKKEN_BYTES}")
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise file_error(path, f"not valid JSON ({quoted(str(e))})") from None
    if not isinstance(data, dict):
        raise file_error(path, f"top level is a JSON {type(data).__name__}; a tekken.json is an object "
                               "with 'config', 'vocab' and 'special_tokens'")
    config = data.get("config")
    if not isinstance(config, dict):
        found = "missing" if config is None else f"a JSON {type(config).__name__}"
        raise file_error(path, f"'config' is {found}; an object with 'pattern', 'version' and sizes is needed")
    for key, bound in (("default_num_special_tokens", MAX_SPECIAL_TOKENS), ("default_vocab_size", MAX_VOCAB_SIZE)):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
            raise file_error(path, f"config.{key} is {quoted(value)}; an integer from 1 to {bound} is needed")
    for key in ("vocab", "special_tokens"):
        if key in data and not isinstance(data[key], list):
            raise file_error(path, f"'{key}' is a JSON {type(data[key]).__name__}; a list of entries is needed")
    if len(data.get("special_tokens", ())) > MAX_SPECIAL_TOKENS:
        raise file_error(path, f"'special_tokens' has {len(data['special_tokens'])} entries; at most {MAX_SPECIAL_TOKENS}")
    # Entries by position, so the message names the first bad one (mistral-common's asserts
    # print the whole list, or nothing). Only the vocabulary ranks it uses: the release ships
    # 150000 entries and cuts them to default_vocab_size − default_num_special_tokens.
    used = config["default_vocab_size"] - config["default_num_special_tokens"]
    for key, text_field, n in (("vocab", "token_bytes", used), ("special_tokens", "token_str", None)):
        for i, entry in enumerate(data.get(key, [])[:n]):
            if not isinstance(entry, dict) or not isinstance(entry.get(text_field), str):
                raise file_error(path, f"{key}[{i}] is {quoted(entry)}; each entry needs 'rank' and {text_field!r}")
            if entry.get("rank") != i or isinstance(entry.get("rank"), bool):
                raise file_error(path, f"{key}[{i}] has rank {quoted(entry.get('rank'))}; ranks run 0, 1, 2, … in order")


class Tokenizer:
    """Encodes text and Voxtral speech prompts with a ``tekken.json`` tokenizer.

    Args:
        tokenizer: A path to ``tekken.json``, or an already loaded
            ``mistral_common`` ``MistralTokenizer`` built from one.

    Raises:
        FileNotFoundError: If the path does not exist.
        CheckpointError: If the file is not a loadable tekken.json (too large, not JSON, a
            malformed section or entry, a name mistral-common does not recognize), lacks a
            special token the prompt needs, or has no valid ``audio.voice_num_audio_tokens``
            table of preset voices: one line naming the file.
    """

    def __init__(self, tokenizer: str | os.PathLike | MistralTokenizer):
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = self._load(os.fspath(tokenizer))
        self._mistral = tokenizer
        self._tekken = tokenizer.instruct_tokenizer.tokenizer
        source = getattr(self._tekken, "file_path", None) or "the tokenizer"

        missing = [name for name in _SPECIAL_TOKENS.values() if not self._tekken.is_special(name)]
        if missing:
            raise file_error(
                source,
                f"lacks the special token(s) {missing} needed for speech prompts; "
                f"required: {list(_SPECIAL_TOKENS.values())}",
            )
        self._ids = {attr: self._tekken.get_special_token(name) for attr, name in _SPECIAL_TOKENS.items()}

        audio = getattr(self._tekken, "audio", None)
        counts = getattr(audio, "voice_num_audio_tokens", None)
        if not counts or not isinstance(counts, dict):
            raise file_error(source, "has no 'audio.voice_num_audio_tokens' section listing preset voices")
        limit = _max_voice_rows()
        for name, n in counts.items():
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
                raise file_error(
                    source, f"audio.voice_num_audio_tokens[{quoted(name)}] is {quoted(n)}; "
                            f"a voice has from 1 to {limit} rows"
                )
        # Plain copy in file order, so callers cannot mutate the tokenizer's config.
        self._voice_num_audio_tokens = dict(counts)

    @staticmethod
    def _load(path: str) -> MistralTokenizer:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No tekken tokenizer file at {path}")
        name = os.path.basename(path)
        # mistral-common recognizes a Tekken file by its name alone.
        if "tekken" not in name or not name.endswith(".json"):
            raise file_error(
                path,
                f"tokenizer file name {name!r} is not recognized: mistral-common loads Tekken files "
                "whose name contains 'tekken' and ends in '.json' (e.g. tekken.json)",
            )
        _precheck_tekken(path)
        try:
            return MistralTokenizer.from_file(path)
        except _LOAD_ERRORS as e:
            if isinstance(e, KeyError) and e.args:
                detail = f"missing key {quoted(e.args[0])}"
            else:
                kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
                detail = f"{kind}: {quoted(str(e))}" if str(e) else f"{kind} in mistral-common"
            raise file_error(path, f"not a valid tekken tokenizer ({detail})") from None

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
            ``encode_speech_prompt(text, voice_num_audio_tokens[voice])``, identical to
            mistral-common's ``encode_speech_request``.

        Raises:
            ValueError: If ``voice`` is unknown or ``text`` is empty.
        """
        self._check_text(text)
        if voice not in self._voice_num_audio_tokens:
            raise ValueError(f"Unknown voice {voice!r}; valid voices: {', '.join(self.voices)}")
        return self.encode_speech_prompt(text, self._voice_num_audio_tokens[voice])

    def encode_speech_prompt(self, text: str, voice_rows: int) -> list[int]:
        """Build the speech prompt for ``text`` spoken by a voice of ``voice_rows`` rows.

        The one builder for presets and custom voices (a ``Voice`` passes ``voice.rows``: its
        frames plus the END row), so the prompt always has exactly one ``[AUDIO]`` slot per row.

        Returns:
            ``[BOS, BEGIN_AUDIO] + [AUDIO] * voice_rows + [NEXT_AUDIO_TEXT] + encode(text)
            + [REPEAT_AUDIO_TEXT, BEGIN_AUDIO]``.

        Raises:
            ValueError: If ``voice_rows`` is not an integer from 1 to ``MAX_VOICE_ROWS``, or
                ``text`` is empty.
        """
        rows = check_int(voice_rows, "voice_rows", 1, _max_voice_rows())
        self._check_text(text)
        ids = self._ids
        return (
            [ids["bos_id"], ids["begin_audio_id"]]
            + [ids["audio_id"]] * rows
            + [ids["next_audio_text_id"]]
            + self._tekken.encode(text, bos=False, eos=False)
            + [ids["repeat_audio_text_id"], ids["begin_audio_id"]]
        )

    @staticmethod
    def _check_text(text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"text is empty or whitespace-only ({text!r}); nothing to speak")
