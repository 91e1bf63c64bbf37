"""Tests for mlx_speech.tokenizer: Voxtral speech prompts over mistral-common's Tekken."""

import json
from pathlib import Path

import mistral_common
import pytest
from mistral_common.protocol.speech.request import SpeechRequest

from conftest import GOLDEN

from mlx_speech.errors import CheckpointError
from mlx_speech.tokenizer import Tokenizer
from mlx_speech.voices import PRESET_ROWS as VOICE_NUM_AUDIO_TOKENS  # the real presets (spec §4.4)

TINY_TEKKEN = GOLDEN / "tiny-voxtral" / "tekken.json"


CONTROL_TOKENS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
    "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
]
# mistral-common's v7 instruct tokenizer also requires [TRANSCRIBE] once an audio section exists.
AUDIO_TOKENS = {
    24: "[AUDIO]", 25: "[BEGIN_AUDIO]", 26: "[OUTPUT_AUDIO]", 34: "[TRANSCRIBE]",
    35: "[REPEAT_AUDIO_TEXT]", 36: "[NEXT_AUDIO_TEXT]",
}

# Independent ground truth: prompts dumped from mistral_common 1.11.7 with the REAL Voxtral
# tekken.json, tenstorrent/tt-metal models/experimental/voxtral_tts/tests/prompt_fixture.json
# (@a7cecc4379a6f087e0e7a6d508d88c4ac94a8212). Stored here as (text, voice, the text ids
# between [NEXT_AUDIO_TEXT] and [REPEAT_AUDIO_TEXT]); the [AUDIO] runs equal the table above.
TT_FIXTURE = [
    ("Hello.", "ar_male", [22177, 1046]),
    (
        "It took me quite a long time to develop a voice, and now that I have it I am not going to be silent.",
        "neutral_male",
        [2757, 5244, 1639, 8729, 1261, 2730, 2142, 1317, 3098, 1261, 8602, 1044, 1321, 3246, 1455, 1362,
         1736, 1494, 1362, 1855, 1605, 4670, 1317, 1402, 27596, 1046],
    ),
    (
        "Bonjour, je m'appelle Claude. Ça va très bien, merci!",
        "fr_female",
        [48227, 47010, 1044, 2310, 1283, 21868, 2755, 28006, 1046, 31441, 3834, 8638, 5593, 1044, 92503, 1033],
    ),
    (
        "Grüße aus München — die Straße ist schön.",
        "de_male",
        [20560, 1671, 9755, 3558, 28943, 2251, 1828, 27277, 3444, 63844, 1046],
    ),
    (
        "El niño comió 42 manzanas; ¿verdad?",
        "es_female",
        [4168, 56496, 1437, 1788, 1032, 1052, 1050, 1894, 1122, 16008, 1059, 12615, 1465, 40886, 1063],
    ),
    (
        "Ciao! Però... non è così, vero?",
        "it_male",
        [1067, 37477, 1033, 105315, 2880, 2767, 4847, 20063, 1044, 46712, 1063],
    ),
    (
        "Olá, tudo bem? Ação, coração, não.",
        "pt_male",
        [43574, 1502, 1044, 34584, 15556, 1063, 1349, 3335, 1044, 82573, 1044, 5808, 1046],
    ),
    (
        "Numbers 1234567890 and symbols !@#$%^&*() plus   spaces.",
        "neutral_female",
        [45508, 1032, 1049, 1050, 1051, 1052, 1053, 1054, 1055, 1056, 1057, 1048, 1321, 26414, 2662, 1064,
         1035, 1036, 1037, 1094, 1038, 1042, 1690, 2984, 1256, 18971, 1046],
    ),
    (
        "Emoji test \U0001f3a4\U0001f50a and CAPS and MiXeD cAsE.",
        "casual_male",
        [5969, 26303, 2688, 119685, 1142, 1164, 1240, 1159, 1148, 1138, 1321, 65187, 1083, 1321, 13064, 1088,
         1101, 1068, 1272, 4072, 1069, 1046],
    ),
    (
        "\u0928\u092e\u0938\u094d\u0924\u0947, \u0906\u092a \u0915\u0948\u0938\u0947 \u0939\u0948\u0902?",
        "hi_female",
        [2485, 3525, 22475, 1803, 1044, 23167, 83112, 10688, 1063],
    ),
    (
        "\u0645\u0631\u062d\u0628\u0627 \u0643\u064a\u0641 \u062d\u0627\u0644\u0643\u061f",
        "ar_male",
        [4341, 1708, 26986, 24675, 17086, 1559, 6944],
    ),
    ("Tab\tand\nnewline handling.", "nl_male", [16256, 1009, 1421, 1010, 3080, 2839, 21490, 1046]),
]


def _expected_prompt(text_ids, n_audio):
    return [1, 25] + [24] * n_audio + [36] + text_ids + [35, 25]


# --- golden tiny tekken ---

@pytest.fixture(scope="module")
def tiny():
    return Tokenizer.from_file(TINY_TEKKEN)


def test_tiny_reproduces_golden_prompt(tiny):
    cases = json.loads((GOLDEN / "cases.json").read_text())
    text, voice = cases["prompt_text"], cases["e2e_voice"]
    assert tiny.encode(text) == cases["prompt_text_ids"]
    assert tiny.encode_speech(text, voice) == cases["prompt_ids"]


def test_tiny_properties(tiny):
    assert tiny.voices == ["casual_male", "neutral_female"]
    assert tiny.voice_num_audio_tokens == {"casual_male": 7, "neutral_female": 4}
    ids = (tiny.bos_id, tiny.eos_id, tiny.audio_id, tiny.begin_audio_id)
    assert ids == (1, 2, 24, 25)
    assert (tiny.next_audio_text_id, tiny.repeat_audio_text_id) == (36, 35)
    assert tiny.vocab_size == 512


def test_tiny_layout_from_properties(tiny):
    text = "a test"
    expected = (
        [tiny.bos_id, tiny.begin_audio_id] + [tiny.audio_id] * 4 + [tiny.next_audio_text_id]
        + tiny.encode(text) + [tiny.repeat_audio_text_id, tiny.begin_audio_id]
    )
    assert tiny.encode_speech(text, "neutral_female") == expected


def test_missing_special_token_is_named(tmp_path):
    data = json.loads(TINY_TEKKEN.read_text())
    for tok in data["special_tokens"]:
        if tok["token_str"] == "[NEXT_AUDIO_TEXT]":
            tok["token_str"] = f"<SPECIAL_{tok['rank']}>"
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"\[NEXT_AUDIO_TEXT\]"):
        Tokenizer.from_file(path)


def test_missing_audio_section_is_refused(tmp_path):
    data = json.loads(TINY_TEKKEN.read_text())
    del data["audio"]
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="voice_num_audio_tokens"):
        Tokenizer.from_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.from_file(tmp_path / "nope.json")


# --- full-size tekken: packaged Tekken vocabulary + Voxtral specials and voices ---

@pytest.fixture(scope="module")
def full(tmp_path_factory):
    base = json.loads((Path(mistral_common.__file__).parent / "data" / "tekken_240911.json").read_text())
    names = CONTROL_TOKENS + [AUDIO_TOKENS.get(i, f"<SPECIAL_{i}>") for i in range(len(CONTROL_TOKENS), 1000)]
    specials = [{"rank": i, "token_str": name, "is_control": True} for i, name in enumerate(names)]
    tekken = {
        # Same pattern and vocab as the packaged file; Voxtral's sizes; v7 for the audio encoder.
        "config": {
            **base["config"], "default_vocab_size": 131072, "default_num_special_tokens": 1000, "version": "v7",
        },
        "vocab": base["vocab"],
        "special_tokens": specials,
        "audio": {
            "sampling_rate": 24000,
            "frame_rate": 12.5,
            "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
            "chunk_length_s": 30.0,
            "voice_num_audio_tokens": VOICE_NUM_AUDIO_TOKENS,
        },
    }
    path = tmp_path_factory.mktemp("tekken") / "tekken.json"
    path.write_text(json.dumps(tekken))
    return Tokenizer.from_file(path)


def test_full_hello(full):
    assert full.encode("Hello.") == [22177, 1046]
    assert full.encode_speech("Hello.", "ar_male") == _expected_prompt([22177, 1046], 67)


@pytest.mark.parametrize(
    "text, voice, text_ids", TT_FIXTURE, ids=[f"{v}-{i}" for i, (_, v, _) in enumerate(TT_FIXTURE)]
)
def test_full_matches_tt_fixture(full, text, voice, text_ids):
    assert full.encode(text) == text_ids
    assert full.encode_speech(text, voice) == _expected_prompt(text_ids, VOICE_NUM_AUDIO_TOKENS[voice])


def test_full_equals_mistral_common_speech_request(full):
    text = "Grüße aus München."
    official = full.mistral_tokenizer.encode_speech_request(SpeechRequest(input=text, voice="de_female")).tokens
    assert full.encode_speech(text, "de_female") == list(official)


def test_full_properties(full):
    assert full.voices == list(VOICE_NUM_AUDIO_TOKENS)
    assert full.voice_num_audio_tokens == VOICE_NUM_AUDIO_TOKENS
    assert (full.audio_id, full.begin_audio_id) == (24, 25)
    assert (full.repeat_audio_text_id, full.next_audio_text_id) == (35, 36)
    assert (full.bos_id, full.eos_id, full.vocab_size) == (1, 2, 131072)


@pytest.mark.parametrize("voice, n", [("ar_male", 67), ("neutral_female", 218), ("casual_male", 147)])
def test_full_placeholder_counts(full, voice, n):
    ids = full.encode_speech("Hi.", voice)
    assert ids.count(full.audio_id) == n
    assert ids[2 : 2 + n] == [24] * n


def test_text_is_not_normalized(full):
    # No trailing "." is added and special-token strings stay plain text (spec T27).
    assert full.encode("Hello") == [22177]
    ids = full.encode("[AUDIO] </s>")
    assert all(i >= 1000 for i in ids)


def test_unknown_voice_names_it_and_lists_voices(full):
    with pytest.raises(ValueError, match="'klingon_male'") as info:
        full.encode_speech("Hello.", "klingon_male")
    assert "casual_female" in str(info.value) and "hi_female" in str(info.value)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_is_refused(full, text):
    with pytest.raises(ValueError, match="empty") as info:
        full.encode_speech(text, "casual_male")
    assert repr(text) in str(info.value)
    with pytest.raises(ValueError, match="empty"):
        full.encode(text)


def test_voice_table_is_a_copy(full):
    full.voice_num_audio_tokens["casual_male"] = 1
    full.voices.append("x")
    assert full.voice_num_audio_tokens["casual_male"] == 147
    assert "x" not in full.voices


def test_unrecognized_file_name_is_explained(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_bytes(TINY_TEKKEN.read_bytes())
    with pytest.raises(ValueError, match="'vocab.json'.*tekken"):
        Tokenizer.from_file(path)


# --- the prompt builder from a row count (custom voices) ---

def _official(tok, text, voice):
    return list(tok.mistral_tokenizer.encode_speech_request(SpeechRequest(input=text, voice=voice)).tokens)


def test_tiny_every_preset_equals_mistral_common(tiny):
    text = "Hello world, this is a test."
    for voice, n in tiny.voice_num_audio_tokens.items():
        official = _official(tiny, text, voice)
        assert tiny.encode_speech(text, voice) == official
        assert tiny.encode_speech_prompt(text, n) == official


def test_tiny_builder_reproduces_golden_g1_prompt(tiny, cases):
    meta = json.loads((GOLDEN / "cases.json").read_text())
    golden = [int(i) for i in cases["g1_e2e"]["prompt_ids"].tolist()]
    assert golden == meta["prompt_ids"]
    n = golden.count(tiny.audio_id)
    assert tiny.encode_speech_prompt(meta["prompt_text"], n) == golden


@pytest.mark.parametrize("voice", list(VOICE_NUM_AUDIO_TOKENS))
def test_full_every_preset_equals_mistral_common(full, voice):
    text = "Grüße aus München — 42 Äpfel, s'il vous plaît."
    official = _official(full, text, voice)
    assert full.encode_speech(text, voice) == official
    assert full.encode_speech_prompt(text, VOICE_NUM_AUDIO_TOKENS[voice]) == official


@pytest.mark.parametrize("rows", [1, 5, 203, 1024])
def test_builder_layout_for_any_row_count(full, rows):
    ids = full.encode_speech_prompt("Hello.", rows)
    assert ids == _expected_prompt([22177, 1046], rows)
    assert ids.count(full.audio_id) == rows


@pytest.mark.parametrize("rows", [0, -1, 1025, 2.0, "7", True, None])
def test_builder_refuses_bad_row_counts(full, rows):
    with pytest.raises(ValueError, match=r"voice_rows .*1 to 1024") as info:
        full.encode_speech_prompt("Hello.", rows)
    assert "\n" not in str(info.value)


def test_builder_refuses_empty_text(full):
    with pytest.raises(ValueError, match="empty"):
        full.encode_speech_prompt("  ", 5)


# --- damaged tekken.json files: one CheckpointError line naming the file ---

def _damaged(tmp_path, edit):
    data = json.loads(TINY_TEKKEN.read_text())
    data = edit(data)
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(data))
    return path


def _drop(key):
    def edit(d):
        del d[key]
        return d
    return edit


def _bad_vocab_entry(d):
    d["vocab"][5] = {"rank": 5}  # no token_bytes
    return d


def _bad_base64(d):
    d["vocab"][7]["token_bytes"] = "!!not base64!!"
    return d


def _vocab_entry_is_text(d):
    d["vocab"][3] = "abc"
    return d


def _vocab_rank_swapped(d):
    d["vocab"][9]["rank"], d["vocab"][10]["rank"] = 10, 9
    return d


def _without_inst(d):
    d["special_tokens"] = [t for t in d["special_tokens"] if t["token_str"] != "[INST]"]
    return d


def _inst_renamed(d):
    for t in d["special_tokens"]:
        if t["token_str"] == "[INST]":
            t["token_str"] = f"<SPECIAL_{t['rank']}>"
    return d


def _huge_special_count(d):
    d["config"]["default_num_special_tokens"] = 10**9  # would build 10**9 filler tokens
    return d


def _voice_count(value):
    def edit(d):
        d["audio"]["voice_num_audio_tokens"]["casual_male"] = value
        return d
    return edit


DAMAGED = {
    "no-config": (_drop("config"), "'config' is missing"),
    "empty-object": (lambda d: {}, "'config' is missing"),
    "config-a-list": (lambda d: {**d, "config": [1]}, "'config' is a JSON list"),
    "a-list": (lambda d: [d], "top level is a JSON list"),
    "vocab-entry-without-bytes": (_bad_vocab_entry, r"vocab\[5\] is \{'rank': 5\}; each entry needs"),
    "vocab-entry-bad-base64": (_bad_base64, "not a valid tekken tokenizer .*base64"),
    "vocab-entry-a-string": (_vocab_entry_is_text, r"vocab\[3\] is 'abc'"),
    "vocab-rank-out-of-order": (_vocab_rank_swapped, r"vocab\[9\] has rank 10; ranks run"),
    "vocab-not-a-list": (lambda d: {**d, "vocab": 5}, "'vocab' is a JSON int"),
    "without-[INST]": (_without_inst, r"special_tokens\[3\] has rank 4"),
    "[INST]-renamed": (_inst_renamed, r"Unknown control token \[INST\]"),
    "huge-special-count": (_huge_special_count, "default_num_special_tokens is 1000000000"),
    "voice-count-text": (_voice_count("x"), r"voice_num_audio_tokens\['casual_male'\] is 'x'"),
    "voice-count-huge": (_voice_count(10**12), r"voice_num_audio_tokens\['casual_male'\] is 1000000000000"),
    "voice-count-zero": (_voice_count(0), "from 1 to 1024 rows"),
}


@pytest.mark.parametrize("edit, problem", DAMAGED.values(), ids=list(DAMAGED))
def test_damaged_tekken_is_one_checkpoint_error_naming_the_file(tmp_path, edit, problem):
    path = _damaged(tmp_path, edit)
    with pytest.raises(CheckpointError, match=problem) as info:
        Tokenizer.from_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert len(message) < len(str(path)) + 300


@pytest.mark.parametrize("raw", [b'{"config": ', b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000, b""],
                         ids=["truncated", "not-utf8", "deeply-nested", "empty-file"])
def test_unparsable_tekken_is_one_checkpoint_error(tmp_path, raw):
    path = tmp_path / "tekken.json"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match="not valid JSON") as info:
        Tokenizer.from_file(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_oversized_tekken_is_refused_before_reading(tmp_path, monkeypatch):
    import mlx_speech.tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "MAX_TEKKEN_BYTES", 1000)
    with pytest.raises(CheckpointError, match=r"tokenizer file is \d+ bytes; a tekken.json is at most 1000"):
        Tokenizer.from_file(TINY_TEKKEN)
