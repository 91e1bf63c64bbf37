"""``python -m mlx_speech.server`` as clients use it: a real server process on a loopback port,
driven with httpx and with the official ``openai`` package."""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO

for _module in ("starlette", "uvicorn", "httpx", "openai"):
    pytest.importorskip(_module, reason=f"{_module} is not installed (pip install -e '.[server,dev]')")

import httpx  # noqa: E402
import openai  # noqa: E402

TEXT = "Hello world, this is a test."
VOICE = "casual_male"
MAX_CHARS = 2000  # the server under test's --max-chars
SPF = 1920  # samples per 80 ms frame at 24 kHz


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, log_path, *args: str, poll: float = 0.2) -> tuple[subprocess.Popen, str]:
    """A server process on ``model`` with ``args``, once it answers /health; and its base URL."""
    port = _free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_speech.server", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning", *args],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            pytest.fail(f"server not healthy after 90 s:\n{log_path.read_text()}")
        time.sleep(poll)


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    """Send ``sig`` and return the exit status (killing the process if it does not stop in 30 s)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the server did not stop within 30 s of signal {sig}")


@pytest.fixture(scope="module")
def server(tiny_mlx, tmp_path_factory):
    """The base URL of a server on the tiny model, started once for this module."""
    proc, url = start_server(tiny_mlx, tmp_path_factory.mktemp("server") / "server.log", "--max-chars", str(MAX_CHARS))
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def long_seed(model):
    """A seed with which the tiny model speaks TEXT for at least 40 frames (it stops at random)."""
    from mlx_speech import generate

    for seed in range(1, 30):
        if generate(model, TEXT, VOICE, seed=seed, max_frames=40).finish_reason == "length":
            return seed
    pytest.fail("no seed in 1..29 makes the tiny model speak 40 frames")


def speak(url: str, **fields) -> httpx.Response:
    body = {"model": "tiny-f32", "input": TEXT, "voice": VOICE, **fields}
    return httpx.post(f"{url}/v1/audio/speech", json=body, timeout=120)


def health(url: str) -> dict:
    r = httpx.get(f"{url}/health", timeout=10)
    assert r.status_code == 200
    return r.json()


def test_health_models_and_voices(server):
    h = health(server)
    assert h["status"] == "ok" and h["model"] == "tiny-f32" and h["failed"] == 0
    models = httpx.get(f"{server}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-f32"] and models["data"][0]["object"] == "model"
    voices = httpx.get(f"{server}/v1/audio/voices").json()["data"]
    assert [(v["id"], v["language"], v["gender"]) for v in voices] == [
        ("casual_male", "English (casual)", "male"), ("neutral_female", "English (neutral)", "female")]
    missing = httpx.get(f"{server}/v1/audio/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Not Found"


def test_wav_has_the_expected_length_and_the_library_audio(server, model):
    r = speak(server, response_format="wav", seed=4, max_frames=6)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    audio, sr = sf.read(io.BytesIO(r.content), dtype="float32")
    assert sr == 24000 and len(audio) == 6 * SPF
    from mlx_speech import generate

    ref = generate(model, TEXT, VOICE, seed=4, max_frames=6)
    np.testing.assert_allclose(audio, np.clip(ref.audio, -1, 1), atol=1 / 32767 + 1e-6)


def test_openai_client_and_every_format(server, client):
    wav = client.audio.speech.create(model="tiny-f32", voice=VOICE, input=TEXT, response_format="wav",
                                     extra_body={"seed": 4, "max_frames": 6}).content
    assert wav == speak(server, response_format="wav", seed=4, max_frames=6).content
    by_id = client.audio.speech.create(model="tiny-f32", voice={"id": VOICE}, input=TEXT, response_format="wav",
                                       extra_body={"seed": 4, "max_frames": 6}).content
    assert by_id == wav
    pcm = client.audio.speech.create(model="tiny-f32", voice=VOICE, input=TEXT, response_format="pcm",
                                     extra_body={"seed": 4, "max_frames": 6}).content
    assert pcm == wav[44:] and len(pcm) == 6 * SPF * 2
    flac = speak(server, response_format="flac", seed=4, max_frames=6)
    assert flac.headers["content-type"] == "audio/flac"
    # libsndfile's FLAC encoder rounds float to 16 bits its own way: at most one step apart.
    flac_samples = sf.read(io.BytesIO(flac.content), dtype="int16")[0].astype(int)
    np.testing.assert_allclose(flac_samples, np.frombuffer(pcm, "<i2"), atol=1)
    from mlx_speech.audio_io import encodable_formats

    if "mp3" in encodable_formats():  # OpenAI's default format, when libsndfile can write it
        mp3 = client.audio.speech.create(model="tiny-f32", voice=VOICE, input=TEXT,
                                         extra_body={"seed": 4, "max_frames": 6})
        info = sf.info(io.BytesIO(mp3.content))
        assert (info.format, info.samplerate) == ("MP3", 24000) and info.frames >= 6 * SPF


def test_streamed_audio_arrives_before_generation_ends(server, client, long_seed):
    before = health(server)
    with client.audio.speech.with_streaming_response.create(
        model="tiny-f32", voice=VOICE, input=TEXT, response_format="wav",
        extra_body={"seed": long_seed, "max_frames": 40},
    ) as response:
        parts = response.iter_bytes()
        received = b""
        while len(received) <= 44:  # the header, then the first audio
            received += next(parts)
        assert health(server)["busy"]  # first audio in hand while the model is still generating
        for part in parts:
            received += part
    audio, _ = sf.read(io.BytesIO(received), dtype="int16")
    assert len(audio) == 40 * SPF
    assert health(server)["served"] == before["served"] + 1


def test_sse_events(server):
    pcm = speak(server, response_format="pcm", seed=4, max_frames=6).content
    events = []
    with httpx.stream("POST", f"{server}/v1/audio/speech", timeout=120,
                      json={"model": "m", "input": TEXT, "voice": VOICE, "stream_format": "sse", "seed": 4,
                            "max_frames": 6}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    assert [e["type"] for e in events] == ["speech.audio.delta"] * (len(events) - 1) + ["speech.audio.done"]
    assert len(events) >= 3  # the audio came in several deltas
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == pcm
    usage = events[-1]["usage"]
    assert usage["output_tokens"] == 6 and usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def _raw_request(url: str, body: dict, headers: str = "") -> socket.socket:
    """A connection that has sent a POST to /v1/audio/speech and reads nothing yet."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST /v1/audio/speech HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n{headers}\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("fmt", ["pcm", "flac"])  # streamed, and sent only once complete
def test_a_client_that_disconnects_cancels_its_generation(server, long_seed, fmt):
    before = health(server)
    sock = _raw_request(server, {"input": TEXT, "voice": VOICE, "response_format": fmt, "seed": long_seed})
    try:
        if fmt == "pcm":
            assert sock.recv(12) == b"HTTP/1.1 200"  # the first audio is on its way; then hang up
        else:  # a flac is sent whole: hang up while the model is speaking, before any answer
            while not health(server)["busy"]:
                time.sleep(0.02)
    finally:
        sock.close()
    deadline = time.monotonic() + 20
    while (h := health(server))["busy"] or h["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, f"generation still running after the client left: {h}"
        time.sleep(0.1)
    assert h["cancelled"] == before["cancelled"] + 1 and h["served"] == before["served"]
    assert speak(server, response_format="pcm", seed=4, max_frames=2).status_code == 200


@pytest.mark.parametrize("headers,status,message", [
    ({"content-type": "text/plain"}, 415, "must be JSON sent with 'Content-Type: application/json'"),
    ({"content-type": "application/x-www-form-urlencoded"}, 415, "Content-Type: application/json"),
    ({"content-type": None}, 415, "the request has no Content-Type"),
    ({"origin": "http://attacker.example"}, 403, "requests from web pages of other sites are refused"),
    ({"origin": "null"}, 403, "Origin 'null'"),
    ({"host": "attacker.example"}, 421, "Host 'attacker.example' is not this server"),
    ({"host": "127.0.0.1.attacker.example:80"}, 421, "is not this server"),
])
def test_cross_site_requests_do_no_work(server, headers, status, message):
    """What a web page can make a browser send (a "simple" text/plain POST, its own Origin, a DNS
    name of its own that resolves to 127.0.0.1) is refused before any work is queued."""
    before = health(server)
    body = json.dumps({"input": TEXT, "voice": VOICE, "response_format": "pcm", "max_frames": 2}).encode()
    sent = {"content-type": "application/json", **headers}
    with httpx.Client() as c:
        request = c.build_request("POST", f"{server}/v1/audio/speech", content=body,
                                  headers={k: v for k, v in sent.items() if v is not None})
        assert ("content-type" in request.headers) == (sent["content-type"] is not None)
        r = c.send(request)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    after = health(server)
    assert (after["served"], after["failed"], after["cancelled"]) == (
        before["served"], before["failed"], before["cancelled"])


@pytest.mark.parametrize("headers", [
    {"origin": "http://localhost:3000"}, {"origin": "http://127.0.0.1:8080"}, {"host": "localhost"},
    {"content-type": "application/json; charset=utf-8"},
])
def test_local_pages_and_names_are_served(server, headers):
    pcm = speak(server, response_format="pcm", seed=4, max_frames=2).content
    body = {"model": "m", "input": TEXT, "voice": VOICE, "response_format": "pcm", "seed": 4, "max_frames": 2}
    r = httpx.post(f"{server}/v1/audio/speech", content=json.dumps(body).encode(),
                   headers={"content-type": "application/json", **headers}, timeout=120)
    assert r.status_code == 200 and r.content == pcm


def test_a_foreign_origin_is_refused_on_every_route(server):
    for path in ("/health", "/v1/models", "/v1/audio/voices"):
        r = httpx.get(f"{server}{path}", headers={"origin": "https://attacker.example"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "fields,param,message",
    [
        ({"instructions": "Speak cheerfully."}, "instructions", "'instructions' is not supported"),
        ({"ref_audio": "aGVsbG8="}, "ref_audio", "a voice is cloned ahead of time (python -m mlx_speech.clone"),
        ({"voice": "alloy"}, "voice", "unknown voice 'alloy'; choose one of: casual_male, neutral_female"),
        ({"voice": {"id": "nobody"}}, "voice", "unknown voice 'nobody'"),
        ({"input": ""}, "input", "input is empty"),
        ({"input": " \n\t"}, "input", "input is empty"),
        ({"input": "a" * (MAX_CHARS + 1)}, "input", f"input is {MAX_CHARS + 1} characters, over this server's limit of {MAX_CHARS}"),
        ({"input": "bad\x00byte"}, "input", "control character U+0000 at position 3"),
        ({"input": 42}, "input", "input must be a string"),
        ({"response_format": "opus"}, "response_format", "response_format 'opus' is not supported; use one of: wav, pcm, flac"),
        ({"response_format": "aac"}, "response_format", "response_format 'aac' is not supported"),
        ({"speed": 1.5}, "speed", "speed 1.5 is not supported"),
        ({"speed": "fast"}, "speed", "speed 'fast' is not supported"),
        ({"stream_format": "chunks"}, "stream_format", "stream_format must be 'audio' or 'sse', got 'chunks'"),
        ({"stream_format": "sse", "response_format": "mp3"}, "response_format", "stream_format 'sse' sends base64 16-bit PCM"),
        ({"seed": -1}, "seed", "seed must be an integer from 0"),
        ({"seed": "abc"}, "seed", "seed must be an integer"),
        ({"cfg_alpha": "high"}, "cfg_alpha", "cfg_alpha must be a finite number from 0.0 to 10.0"),
        ({"flow_steps": 65}, "flow_steps", "flow_steps must be an integer from 1 to 64, got 65"),
        ({"max_frames": 0}, "max_frames", "max_frames must be an integer from 1 to 2048, got 0"),
        ({"language": "en"}, "language", "unknown field 'language'; this server accepts: model, input"),
    ],
)
def test_bad_requests_get_400_naming_the_value(server, fields, param, message):
    r = speak(server, **fields)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,message", [(b'{"input": "Hi",', "not valid JSON"), (b"[1, 2]", "must be a JSON object"),
                                          (b"\xff\xfe", "not valid JSON")])
def test_bad_bodies_get_400(server, body, message):
    r = httpx.post(f"{server}/v1/audio/speech", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"]["message"]


def test_openai_client_sees_the_400_message(client):
    with pytest.raises(openai.BadRequestError, match="'instructions' is not supported"):
        client.audio.speech.create(model="m", voice=VOICE, input=TEXT, instructions="Whisper.")
    with pytest.raises(openai.BadRequestError, match="unknown voice 'alloy'"):
        client.audio.speech.create(model="m", voice="alloy", input=TEXT)
    with pytest.raises(openai.BadRequestError, match="speed 2.0 is not supported"):
        client.audio.speech.create(model="m", voice=VOICE, input=TEXT, speed=2.0)


def test_twenty_concurrent_requests_equal_the_same_requests_served_alone(server):
    requests = [
        dict(input=f"{TEXT} Request {i}.", voice=["casual_male", "neutral_female"][i % 2], seed=100 + i,
             max_frames=4, response_format=["pcm", "wav"][i % 2] if i % 5 else "flac")
        for i in range(20)
    ]
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=20) as pool:
        together = list(pool.map(lambda fields: speak(server, **fields), requests, timeout=180))
    assert time.monotonic() - start < 180
    alone = [speak(server, **fields) for fields in requests]
    for fields, a, b in zip(requests, together, alone):
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        assert a.content == b.content, fields
    assert len({r.content for r in together}) == 20  # different seeds and texts: different speech
    h = health(server)
    assert h["status"] == "ok" and h["failed"] == 0 and not h["busy"] and h["queued"] == 0


def test_queue_limit_gives_503():
    from mlx_speech.server import RequestError, Worker

    worker = Worker("unused", max_queue=1)  # not started: nothing consumes the queue
    worker.submit(object())
    with pytest.raises(RequestError, match="1 requests are already waiting") as info:
        worker.submit(object())
    assert info.value.status == 503


def test_a_bad_model_path_is_one_clear_line():
    r = subprocess.run([sys.executable, "-m", "mlx_speech.server", "--model", "/nonexistent/model"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "/nonexistent/model" in last
