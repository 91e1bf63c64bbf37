"""How many frames a text needs: the data behind ``options.frame_cap`` (the runaway cap).

    python benchmarks/measure_frame_cap.py

When the model misses its END frame it babbles until ``max_frames``; other ports cap a request
at ``70 + ceil(10.4 x text tokens)`` frames. This script derives our own cap from the tokenizer
and published speaking rates, and prints a table comparing both caps with the frames a normal
and the slowest plausible reading of each sample need.

Method
------
1. Tokens: every sample is tokenized with the full Tekken vocabulary that ships inside
   mistral-common (``mistral_common/data/tekken_240911.json``: the vocabulary, pattern and sizes
   of Voxtral's ``tekken.json``, as ``tests/test_tokenizer.py`` checks). Only the text's tokens
   count (not the voice rows or special tokens), as in ``frame_cap``.
2. Syllables: counted as vowel groups of the sample *as it is spoken* (numbers, dates and
   abbreviations written out; Arabic and Hindi in a plain romanization with long vowels
   doubled). Vowel groups over-count silent vowels (French, English final e) and under-count
   a few hiatuses; the over-count dominates, which only makes the cap more generous.
3. Rates (syllables per second, read speech):
   en 6.19, fr 7.18, de 5.97, it 6.99, es 7.82 — Pellegrino, Coupé & Marsico (2011), "A
   cross-language perspective on speech information rate", Language 87(3);
   pt 5.9 — middle of 4.8–6.6 across Brazilian dialects, Meireles & Gambarini (2012), Speech
   Prosody; nl 5.05 — articulation rate in the Netherlands (4.23 in Flanders), Verhoeven, De
   Pauw & Kloots (2004), Language and Speech 47(3); ar 5.5 — Wilson & Netsell (2009), Missouri
   State University (3 speakers); hi 5.0 — no figure found, assumed below all but Dutch.
   Coupé et al. (2019), Science Advances 5(9), measured read speech in 17 languages at roughly
   4 to 9 syllables per second.
4. Slowest plausible reading: 3.0 syllables per second *including pauses*, in every language:
   about half the normal rates above, and below the slowest rates measured with pauses included
   in those sources (4.00 syll/s in Flemish conversation, Verhoeven 2004; 3.4 for the slowest
   American-English speaker, Wilson & Netsell 2009). Plus 1 s of lead-in and trailing silence.
5. The cap must give at least twice the frames of that slowest reading for every sample:
   ``a = 2 x 12.5 x 1 s`` covers twice the silence, ``b`` the largest 2 x frames-per-token of
   the slowest reading over all samples; both are rounded up. Frames are 80 ms (12.5 Hz).
"""

from __future__ import annotations

import json
import math
import re
import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent)]  # run from anywhere without installing

import mistral_common  # noqa: E402
from mistral_common.tokens.tokenizers.tekken import Tekkenizer  # noqa: E402

from mlx_speech.options import DEFAULT_MAX_FRAMES, FRAME_CAP_BASE, FRAME_CAP_PER_TOKEN, frame_cap  # noqa: E402

FRAME_RATE = 12.5  # frames per second
SLOW_RATE = 3.0  # syllables per second, pauses included: the slowest plausible reading
SILENCE_S = 1.0  # lead-in plus trailing silence of one utterance
MARGIN = 2.0
NORMAL_RATE = {"en": 6.19, "fr": 7.18, "de": 5.97, "it": 6.99, "es": 7.82, "pt": 5.9, "nl": 5.05, "ar": 5.5,
               "hi": 5.0}

# (language, text, the text as spoken when that differs: digits and abbreviations written out,
# Arabic and Hindi romanized). Short and long sentences, numbers, dates, abbreviations.
SAMPLES = [
    ("en", "Hello.", None),
    ("en", "It took me quite a long time to develop a voice, and now that I have it I am not going to be "
           "silent.", None),
    ("en", "The meeting is at 10:45 on March 3rd, 2026, in room 1204.",
     "The meeting is at ten forty-five on March third, twenty twenty-six, in room twelve oh four."),
    ("en", "Dr. Smith arrived at 5 p.m. with the U.S. delegation (approx. 120 people).",
     "Doctor Smith arrived at five pee em with the you ess delegation, approximately one hundred twenty "
     "people."),
    ("en", "The FBI, CIA and NSA met at the UN.",
     "The ef bee eye, see eye ay and en ess ay met at the you en."),
    ("en", "When the storm finally passed, the villagers walked down to the harbour to count the boats, and "
           "to their surprise not a single one had been lost, although the old pier was gone.", None),
    ("fr", "Bonjour, je m'appelle Claude. Ça va très bien, merci!", None),
    ("fr", "Après une longue promenade dans la forêt, nous nous sommes arrêtés dans un petit café pour "
           "nous réchauffer.", None),
    ("fr", "Le train part à 14 h 35 du quai 7, le 21/03/2025.",
     "Le train part à quatorze heures trente-cinq du quai sept, le vingt et un mars deux mille vingt-cinq."),
    ("fr", "M. Dupont habite au 12, bd Saint-Michel depuis 1990.",
     "Monsieur Dupont habite au douze, boulevard Saint-Michel depuis mille neuf cent quatre-vingt-dix."),
    ("de", "Grüße aus München — die Straße ist schön.", None),
    ("de", "Am 3. Oktober 1990 kamen 16,5 Millionen Menschen, z. B. aus der GmbH.",
     "Am dritten Oktober neunzehnhundertneunzig kamen sechzehn Komma fünf Millionen Menschen, zum Beispiel "
     "aus der Ge Em Be Ha."),
    ("de", "Nachdem wir den ganzen Nachmittag im Garten gearbeitet hatten, setzten wir uns auf die Terrasse "
           "und tranken einen kühlen Apfelsaft.", None),
    ("es", "El niño comió 42 manzanas; ¿verdad?", "El niño comió cuarenta y dos manzanas; ¿verdad?"),
    ("es", "Cuando llegamos a la estación, el último tren ya había salido y tuvimos que esperar hasta la "
           "mañana siguiente.", None),
    ("es", "El vuelo sale a las 7:15 del 12/08 desde la terminal 4.",
     "El vuelo sale a las siete y cuarto del doce de agosto desde la terminal cuatro."),
    ("pt", "Olá, tudo bem? Eu moro em São Paulo há 15 anos.", "Olá, tudo bem? Eu moro em São Paulo há quinze anos."),
    ("pt", "Depois do almoço fomos caminhar pela praia e conversamos sobre os planos para as férias de verão.",
     None),
    ("pt", "A Sra. Silva pagou R$ 1.250,00 pelo conserto do carro.",
     "A senhora Silva pagou mil duzentos e cinquenta reais pelo conserto do carro."),
    ("it", "Buongiorno, vorrei un caffè e due cornetti, per favore.", None),
    ("it", "Dopo una lunga giornata di lavoro, mi piace camminare lungo il fiume e guardare il tramonto.",
     None),
    ("it", "Il treno delle 18:40 per Roma parte dal binario 9.",
     "Il treno delle diciotto e quaranta per Roma parte dal binario nove."),
    ("nl", "Goedemorgen, hoe gaat het met je vandaag?", None),
    ("nl", "Gisteren zijn we met de fiets langs de rivier naar het volgende dorp gereden om vrienden te "
           "bezoeken.", None),
    ("nl", "Op 5 mei 1945 werd Nederland bevrijd.",
     "Op vijf mei negentienhonderdvijfenveertig werd Nederland bevrijd."),
    ("ar", "مرحبا، كيف حالك اليوم؟", "marhaban, kayfa haaluka al-yawm"),
    ("ar", "ولدت في القاهرة عام 1990.", "wulidtu fil qaahira aam alf wa tisuumia wa tisiin"),
    ("ar", "اللغة العربية من أكثر اللغات انتشارا في العالم، ويتحدث بها أكثر من أربعمائة مليون شخص.",
     "al-lugha al-arabiyya min akthar al-lughaat intishaaran fil aalam, wa yatahaddathu bihaa akthar min "
     "arbaumiat milyoon shakhs"),
    ("ar", "ذهبت إلى السوق صباحا واشتريت خبزا وحليبا وبعض الفاكهة الطازجة.",
     "dhahabtu ilaa as-suuq sabaahan wa-shtaraytu khubzan wa haliiban wa bad al-faakiha at-taazija"),
    ("ar", "هل يمكنك أن تساعدني في ترجمة هذه الرسالة إلى اللغة الإنجليزية قبل الغد؟",
     "hal yumkinuka an tusaaidanii fii tarjamat haadhihi ar-risaala ilaa al-lugha al-injiliiziyya qabla "
     "al-ghad"),
    ("hi", "नमस्ते, आप कैसे हैं?", "namaste, aap kaise hain"),
    ("hi", "मेरा जन्म 1995 में दिल्ली में हुआ था।", "meraa janm unnees sau pachaanave men dillee men huaa thaa"),
    ("hi", "भारत एक विशाल देश है जिसमें अनेक भाषाएँ बोली जाती हैं।",
     "bhaarat ek vishaal desh hai jisme anek bhaashaayen bolee jaatee hain"),
    ("hi", "कल शाम हम सब दोस्त मिलकर पुरानी दिल्ली के बाज़ार में घूमने गए थे।",
     "kal shaam ham sab dost milkar puraanee dillee ke baazaar men ghoomne gaye the"),
]

_VOWEL_GROUP = re.compile(r"[aeiouyàáâãäåæèéêëìíîïòóôõöøùúûüýÿœ]+", re.IGNORECASE)


def syllables(spoken: str) -> int:
    """Vowel groups of a spoken form (see the module docstring for the bias)."""
    return len(_VOWEL_GROUP.findall(spoken))


def tekken() -> Tekkenizer:
    """The full Tekken vocabulary packaged with mistral-common (Voxtral's sizes)."""
    source = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    data = json.loads(source.read_text())
    data["config"].update(default_vocab_size=131072, default_num_special_tokens=1000)  # Voxtral's
    path = Path(tempfile.mkdtemp()) / "tekken.json"  # mistral-common recognizes the name
    path.write_text(json.dumps(data))
    return Tekkenizer.from_file(str(path))


def other_ports_cap(tokens: int) -> int:
    return 70 + math.ceil(10.4 * tokens)


def main() -> None:
    tok = tekken()
    rows = []
    for lang, text, spoken in SAMPLES:
        n = len(tok.encode(text, bos=False, eos=False))
        syl = syllables(spoken or text)
        normal = FRAME_RATE * (syl / NORMAL_RATE[lang] + SILENCE_S)
        slow = FRAME_RATE * (syl / SLOW_RATE + SILENCE_S)
        rows.append((lang, text, n, syl, normal, slow))

    a_needed = MARGIN * FRAME_RATE * SILENCE_S
    b_needed = max(MARGIN * FRAME_RATE * syl / SLOW_RATE / n for _, _, n, syl, _, _ in rows)
    print(f"{'lang':4} {'sample':34} {'tok':>4} {'syl':>4} {'syl/tok':>7} {'normal':>6} {'slow':>5} "
          f"{'ours':>5} {'x slow':>6} {'70+10.4n':>8} {'x slow':>6}")
    for lang, text, n, syl, normal, slow in rows:
        ours, theirs = frame_cap(n), other_ports_cap(n)
        short = text if len(text) <= 34 else text[:31] + "..."
        print(f"{lang:4} {short:34} {n:4d} {syl:4d} {syl / n:7.2f} {normal:6.0f} {slow:5.0f} "
              f"{ours:5d} {ours / slow:6.2f} {theirs:8d} {theirs / slow:6.2f}")
    worst_ours = min(frame_cap(n) / slow for _, _, n, _, _, slow in rows)
    worst_theirs = min(other_ports_cap(n) / slow for _, _, n, _, _, slow in rows)
    print(f"\nframes (80 ms): normal = reading at the language's published rate, slow = {SLOW_RATE} syll/s with "
          f"pauses; both + {SILENCE_S} s of silence")
    print(f"needed for a {MARGIN}x margin over the slowest reading: a >= {a_needed:.1f}, b >= {b_needed:.2f} "
          f"frames per token")
    print(f"ours: min({DEFAULT_MAX_FRAMES}, {FRAME_CAP_BASE} + ceil({FRAME_CAP_PER_TOKEN} x tokens)); "
          f"smallest margin over the slowest reading {worst_ours:.2f}x "
          f"({'meets' if worst_ours >= MARGIN else 'MISSES'} {MARGIN}x)")
    print(f"other ports: 70 + ceil(10.4 x tokens); smallest margin {worst_theirs:.2f}x")
    per_token = [MARGIN * FRAME_RATE * syl / SLOW_RATE / n for _, _, n, syl, _, _ in rows]
    print(f"2x slow frames per token over the samples: median {sorted(per_token)[len(per_token) // 2]:.2f}, "
          f"max {max(per_token):.2f}")


if __name__ == "__main__":
    main()
