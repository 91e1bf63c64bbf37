"""The server as a local service that never aborts, hangs or lies.

In-process, against ``create_app`` over the real ``Worker`` thread with a stand-in model whose
generation raises at a chosen chunk: what a client sees when generation fails before or after
the first audio, hostile bodies, and a fuzz of every field. Against real server processes: slow
clients (raw sockets), the connection limit, and stops by SIGINT and SIGTERM (status 0 every
time), Ctrl-C while loading (130), usage errors (2).
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REPO

for _module in ("starlette", "uvicorn", "httpx"):
    pytest.importorskip(_module, reason=f"{_module} is not installed (pip install -e '.[server,dev]')")

import httpx  # noqa: E402
from test_server import start_server, stop_server  # noqa: E402

from mlx_speech.audio_io import encodable_formats, encode_audio, wav_header  # noqa: E402
from mlx_speech.server import Worker, create_app  # noqa: E402
from mlx_speech.server_guard import HostPolicy, host_name  # noqa: E402

SR, SPF = 24000, 1920
CHUNKS = 3  # chunks the stand-in model speaks
VOICE = "casual_male"
FORMATS = ["wav", "pcm", "flac"] + (["mp3"] if "mp3" in encodable_formats() else [])


# ---- in process: a stand-in model behind the real worker and app ------------------------------
def chunk_audio(i: int) -> np.ndarray:
    return (np.sin(np.arange(SPF) * 0.05 * (i + 1)) * 0.4).astype(np.float32)


class StubScheduler:
    """The scheduler's interface (``speech_scheduler.BatchScheduler``) over the stand-in model:
    each step hands every job its next chunk from ``StubWorker._generate``."""

    def __init__(self, worker: "StubWorker"):
        self.worker, self.active = worker, []

    has_room = property(lambda self: len(self.active) < self.worker.max_batch)
    idle = property(lambda self: not self.active)

    def add(self, job) -> None:
        self.active.append((job, self.worker._generate(job.request, job.cancel)))

    def step(self):
        outcomes = []
        for job, chunks in list(self.active):
            if job.cancel.is_set():
                outcome = "cancelled"
            else:
                try:
                    job.post("chunk", next(chunks))
                    continue
                except StopIteration:
                    job.post("end")
                    outcome = "served"
                except RuntimeError as e:
                    job.post("error", e)
                    outcome = "failed"
            self.active.remove((job, chunks))
            outcomes.append((job, outcome))
        return outcomes

    def fail_all(self, error):
        raise AssertionError("the stand-in scheduler never raises from step")

    def cancel_all(self) -> None:
        for job, _ in self.active:
            job.cancel.set()


class StubWorker(Worker):
    """The real worker thread, queue and counts over a stand-in model: CHUNKS chunks of known
    audio, raising RuntimeError at chunk ``fail_at`` (None: never)."""

    def __init__(self, fail_at: int | None = None):
        super().__init__("stub-model", max_queue=4, max_chars=100, max_batch=1)
        self.fail_at = fail_at

    def _load(self):
        return SimpleNamespace(voices=[VOICE, "neutral_female"], config=SimpleNamespace(sample_rate=SR))

    def _make_scheduler(self):
        return StubScheduler(self)

    def check(self, request) -> None:
        pass

    def _generate(self, request, cancel):
        for i in range(CHUNKS):
            if i == self.fail_at:
                raise RuntimeError(f"boom at chunk {i}")
            yield SimpleNamespace(audio=chunk_audio(i), frames=i + 1, prompt_tokens=7)


class Reply:
    """What an ASGI app sent: status, headers, body, and whether the body was completed."""

    def __init__(self, messages: list[dict]):
        start = messages[0]
        assert start["type"] == "http.response.start"
        self.status = start["status"]
        self.headers = {k.decode(): v.decode() for k, v in start["headers"]}
        bodies = messages[1:]
        self.body = b"".join(m.get("body", b"") for m in bodies)
        self.complete = bool(bodies) and not bodies[-1].get("more_body", False)
        assert all(m.get("more_body", False) for m in bodies[:-1])

    def json(self):
        return json.loads(self.body.decode("ascii"))  # error bodies are ASCII, whatever they hold


async def call(app, body: bytes = b"", method: str = "POST", path: str = "/v1/audio/speech",
               headers: dict | None = None) -> Reply:
    """Drive ``app`` as uvicorn does: the whole body at once, then ``http.disconnect`` once the
    response is complete (never, if it is cut off)."""
    fields = {"host": "127.0.0.1:8000", "content-type": "application/json", **(headers or {})}
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
             "headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in fields.items() if v is not None]}
    sent, done, requested = [], asyncio.Event(), False

    async def receive():
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    await asyncio.wait_for(app(scope, receive, send), 30)
    return Reply(sent)


def speech_body(**fields) -> bytes:
    return json.dumps({"input": "Hello.", "voice": VOICE, **fields}).encode()


def serve(worker: Worker, *bodies: bytes, **kwargs) -> list[Reply]:
    """Each body POSTed in turn to an app over the started ``worker``."""
    worker.start()
    try:
        async def run():
            app = create_app(worker, "stub")
            return [await call(app, body, **kwargs) for body in bodies]

        return asyncio.run(run())
    finally:
        worker.stop()


def expected_pcm(chunks: int) -> bytes:
    """The one-shot encoding of the first ``chunks`` chunks."""
    return encode_audio(np.concatenate([chunk_audio(i) for i in range(chunks)]), SR, "pcm")


def sse_events(body: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("fmt", FORMATS + ["sse"])
def test_the_stand_in_model_is_served_whole(fmt):
    """The baseline the failure tests below differ from: every format complete, equal to the
    one-shot encoding of all chunks."""
    worker = StubWorker()
    fields = {"stream_format": "sse"} if fmt == "sse" else {"response_format": fmt}
    (r,) = serve(worker, speech_body(**fields))
    assert r.status == 200 and r.complete
    if fmt == "sse":
        events = sse_events(r.body)
        assert [e["type"] for e in events] == ["speech.audio.delta"] * CHUNKS + ["speech.audio.done"]
        assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == expected_pcm(CHUNKS)
    else:
        all_audio = np.concatenate([chunk_audio(i) for i in range(CHUNKS)])
        expected = {"wav": wav_header(SR) + expected_pcm(CHUNKS), "pcm": expected_pcm(CHUNKS)}.get(fmt)
        assert r.body == (expected if expected is not None else encode_audio(all_audio, SR, fmt))
    assert worker.counts == {"served": 1, "cancelled": 0, "failed": 0}


@pytest.mark.parametrize("fmt", FORMATS + ["sse"])
def test_a_failure_before_the_first_audio_is_a_json_500(fmt):
    worker = StubWorker(fail_at=0)
    fields = {"stream_format": "sse"} if fmt == "sse" else {"response_format": fmt}
    (r,) = serve(worker, speech_body(**fields))
    assert r.status == 500 and r.complete and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["type"] == "server_error" and error["message"] == "generation failed: RuntimeError: boom at chunk 0"
    assert worker.counts["failed"] == 1 and worker.counts["served"] == 0


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f not in ("wav", "pcm")])
def test_a_whole_file_format_is_never_sent_partly(fmt):
    """flac and mp3 are produced completely before the status line: a late failure is a 500 too."""
    (r,) = serve(StubWorker(fail_at=CHUNKS - 1), speech_body(response_format=fmt))
    assert r.status == 500 and "boom at chunk 2" in r.json()["error"]["message"]


@pytest.mark.parametrize("fmt", ["wav", "pcm"])
def test_raw_audio_that_fails_midway_ends_without_its_final_chunk(fmt):
    worker = StubWorker(fail_at=2)
    (r,) = serve(worker, speech_body(response_format=fmt))
    assert r.status == 200 and not r.complete  # the server closes the connection: an incomplete body
    assert r.body == (wav_header(SR) if fmt == "wav" else b"") + expected_pcm(2)
    assert worker.counts["failed"] == 1


def test_sse_that_fails_midway_ends_with_an_error_event():
    (r,) = serve(StubWorker(fail_at=2), speech_body(stream_format="sse"))
    assert r.status == 200 and r.complete
    events = sse_events(r.body)
    assert [e["type"] for e in events] == ["speech.audio.delta"] * 2 + ["error"]
    assert events[-1]["error"]["message"] == "generation failed: RuntimeError: boom at chunk 2"


def test_a_cut_off_stream_is_an_error_for_an_http_client():
    """Through uvicorn and h11: the client reads an incomplete chunked body, never a short
    complete one; the JSON 500 of an early failure arrives intact."""
    import uvicorn

    from mlx_speech.server_guard import timed_h11

    worker = StubWorker(fail_at=2)
    worker.start()
    server = uvicorn.Server(uvicorn.Config(create_app(worker, "stub"), host="127.0.0.1", port=0,
                                           log_level="critical", http=timed_h11(5), ws="none"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/v1/audio/speech"
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.post(url, content=speech_body(response_format="pcm"),
                       headers={"content-type": "application/json"}, timeout=20)
        worker.fail_at = 0
        r = httpx.post(url, content=speech_body(response_format="pcm"),
                       headers={"content-type": "application/json"}, timeout=20)
        assert r.status_code == 500 and r.json()["error"]["message"].endswith("boom at chunk 0")
    finally:
        server.should_exit = True
        thread.join(10)
        worker.stop()


# ---- in process: hostile bodies and a fuzz of the request parser ------------------------------
def test_a_deeply_nested_body_is_a_400():
    deep, deep_input = serve(StubWorker(), b"[" * 100_000 + b"]" * 100_000,
                             b'{"input": ' + b"[" * 900 + b"]" * 900 + b"}")
    assert deep.status == 400 and "nested too deeply" in deep.json()["error"]["message"]
    assert deep_input.status == 400 and "input must be a string" in deep_input.json()["error"]["message"]


def test_a_field_named_by_a_lone_surrogate_is_a_400_that_encodes():
    (r,) = serve(StubWorker(), b'{"input": "hi", "\\ud800": 1}')
    assert r.status == 400
    error = r.json()["error"]
    assert error["param"] == "\ud800" and "unknown field '\\ud800'" in error["message"]


def test_an_integer_too_large_for_a_float_is_a_400():
    (r,) = serve(StubWorker(), speech_body(cfg_alpha=10**400))
    assert r.status == 400 and r.json()["error"]["param"] == "cfg_alpha"


def _random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth < 3 and r < 0.12:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    if depth < 3 and r < 0.24:
        return {rng.choice(["id", "x", "\ud800"]): _random_value(rng, depth + 1)}
    return rng.choice([
        None, True, False, 0, 1, -1, 2, 7, 64, 65, 2048, 2049, 2**63, 2**64, 10**30, 10**400,
        0.5, 1.0, 1.2, -0.0, 1e308, float("nan"), float("inf"), float("-inf"),
        "", " ", "x", "Hello.", "\ud800", "\x00", "\x7f", "a" * 101, "é" * 50, VOICE, "alloy",
        "wav", "pcm", "flac", "mp3", "opus", "sse", "audio",
    ])


def test_fuzzed_requests_get_a_json_answer_never_a_500():
    """Random JSON values in every field (and unknown ones), random bodies and content types:
    each answer is 200, 400, 413 or 415 with the OpenAI error shape, never a 500."""
    rng = random.Random(1234)
    fields = ["model", "input", "voice", "response_format", "speed", "stream_format", "instructions", "seed",
              "cfg_alpha", "flow_steps", "max_frames", "ref_audio", "language", "\ud800", "x" * 200]
    bodies, types = [], []
    for i in range(300):
        payload = {"input": "Hello.", "voice": VOICE, "response_format": "pcm", "max_frames": 2}
        for name in rng.sample(fields, rng.randrange(1, 4)):
            if rng.random() < 0.2:
                payload.pop(name, None)
            else:
                payload[name] = _random_value(rng)
        body = json.dumps(payload if i % 10 else _random_value(rng)).encode()
        if i % 17 == 0:  # damaged bytes
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) + body[: rng.randrange(len(body))]
        bodies.append(body)
        types.append(rng.choice(["application/json"] * 8 + ["application/JSON; charset=utf-8", "text/plain", None]))
    bodies.append(b"{" * 2_000_000)  # over the body limit
    types.append("application/json")

    worker = StubWorker()
    worker.start()
    try:
        async def run():
            app = create_app(worker, "stub")
            return [await call(app, body, headers={"content-type": t}) for body, t in zip(bodies, types)]

        replies = asyncio.run(run())
    finally:
        worker.stop()
    statuses = [r.status for r in replies]
    assert set(statuses) <= {200, 400, 413, 415}, sorted(set(statuses))
    assert {200, 400, 413, 415} <= set(statuses)  # the fuzz reached every outcome
    for r in replies:
        if r.status != 200:
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error" and error["message"]
    assert worker.counts["failed"] == 0


# ---- in process: which Host and Origin headers are this machine's -----------------------------
@pytest.mark.parametrize("header,name", [
    ("127.0.0.1:8000", "127.0.0.1"), ("LocalHost", "localhost"), ("[::1]:80", "[::1]"), ("[::1]", "[::1]"),
    ("localhost:", "localhost"), ("::1", None), ("[::1", None), ("localhost:80:80", None), ("host:８０", None),
    ("", None), ("[::1]x", None),
])
def test_host_name_parsing(header, name):
    assert host_name(header) == name


def test_host_policy():
    local = HostPolicy.for_server("127.0.0.1", ["studio.local"])
    for host in ("127.0.0.1:8000", "localhost", "[::1]:8000", "studio.local:8000", "STUDIO.local"):
        assert local.accepts_host(host), host
    for host in ("attacker.example", "127.0.0.1.attacker.example", "192.168.1.5:8000", "localhost.", "[::1"):
        assert not local.accepts_host(host), host
    assert local.accepts_origin("http://localhost:3000") and local.accepts_origin("https://studio.local")
    for origin in ("null", "http://attacker.example", "file://", "ftp://localhost", "http://[::1"):
        assert not local.accepts_origin(origin), origin

    everywhere = HostPolicy.for_server("0.0.0.0")
    for host in ("192.168.1.5:8000", "[fe80::1]:8000", "10.0.0.1", "localhost:8000"):
        assert everywhere.accepts_host(host), host  # an address cannot be a rebound DNS name
    assert not everywhere.accepts_host("attacker.example:8000") and not everywhere.accepts_host("0.0.0.0.example")
    assert not everywhere.accepts_origin("http://192.168.1.7")  # another machine's pages
    assert HostPolicy.for_server("::1").accepts_host("[::1]:8000")


def test_two_host_headers_are_refused():
    worker = StubWorker()
    worker.start()
    try:
        app = create_app(worker, "stub")
        r = asyncio.run(call(app, method="GET", path="/health", headers={"host": "127.0.0.1", "Host": "evil.example"}))
    finally:
        worker.stop()
    assert r.status == 400 and "more than one host header" in r.json()["error"]["message"]


# ---- real server processes ---------------------------------------------------------------------
REQUEST_TIMEOUT = 2  # the guarded server's --request-timeout
MAX_CONNECTIONS = 8


@pytest.fixture(scope="module")
def guarded(tiny_mlx, tmp_path_factory):
    """(process, url) of a server with short request deadlines and few connections."""
    proc, url = start_server(tiny_mlx, tmp_path_factory.mktemp("guarded") / "server.log",
                             "--request-timeout", str(REQUEST_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS))
    try:
        yield proc, url
    finally:
        stop_server(proc)


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def test_slow_clients_are_dropped(guarded):
    """A connection that sends nothing, one that sends half its headers, one that trickles its
    headers a byte at a time, and one whose body never comes: each ends within the deadline
    (the body with a 408), where uvicorn alone holds all four forever."""
    _, url = guarded
    address = _address(url)
    start = time.monotonic()
    idle, half, trickle, body = (socket.create_connection(address, timeout=5) for _ in range(4))
    half.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
    body.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n{\"input\": \"")
    headers = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000
    received = {sock: b"" for sock in (idle, half, trickle, body)}
    closed: dict[socket.socket, float] = {}
    sent = 0
    while len(closed) < 4 and time.monotonic() - start < 30:  # bounded: a held socket fails the test
        readable, _, _ = select.select([s for s in received if s not in closed], [], [], 0.1)
        for sock in readable:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            received[sock] += data
            if not data:
                closed[sock] = time.monotonic() - start
        if trickle not in closed and sent < len(headers):
            try:
                trickle.sendall(headers[sent : sent + 1])
                sent += 1
            except OSError:
                closed[trickle] = time.monotonic() - start
    for sock in received:
        sock.close()
    assert len(closed) == 4, f"connections still open after 30 s: {len(closed)} of 4 closed"
    assert received[idle] == received[half] == received[trickle] == b""
    head, _, payload = received[body].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
    assert f"did not arrive within {REQUEST_TIMEOUT} s".encode() in payload
    print(f"\nclosed after (s): idle {closed[idle]:.2f}, half headers {closed[half]:.2f}, "
          f"trickled headers {closed[trickle]:.2f} ({sent} bytes), slow body {closed[body]:.2f}")
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"


def test_connections_over_the_limit_get_503(guarded):
    _, url = guarded
    idle = [socket.create_connection(_address(url), timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        deadline = time.monotonic() + 10  # the server accepts them in its own time
        while (status := httpx.get(f"{url}/health", timeout=10).status_code) != 503:
            assert time.monotonic() < deadline, f"still {status} with {MAX_CONNECTIONS} other connections open"
            time.sleep(0.05)
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the server did not recover after the connections closed"
        time.sleep(0.05)


def _speak_once(url: str) -> None:
    r = httpx.post(f"{url}/v1/audio/speech", timeout=60,
                   json={"input": "Hi there.", "voice": VOICE, "response_format": "pcm", "max_frames": 2, "seed": 1})
    assert r.status_code == 200 and len(r.content) == 2 * SPF * 2


def test_sigterm_stops_the_server_with_status_0(guarded):
    proc, url = guarded
    _speak_once(url)
    assert stop_server(proc, signal.SIGTERM) == 0


def test_ten_ctrl_c_stops_in_a_row_all_exit_0(tiny_mlx, tmp_path):
    """MLX used from a thread can abort at interpreter exit (ml-explore/mlx#3126): status 134
    in about half of these stops before the fix."""
    statuses, logs, start = [], [], time.monotonic()
    for i in range(10):
        log_path = tmp_path / f"server{i}.log"
        proc, url = start_server(tiny_mlx, log_path, poll=0.05)
        try:
            _speak_once(url)
        finally:
            statuses.append(stop_server(proc, signal.SIGINT))
        logs.append(log_path.read_text())
    print(f"\n10 start/serve/Ctrl-C cycles in {time.monotonic() - start:.1f} s: {statuses}")
    assert statuses == [0] * 10, [log for log, s in zip(logs, statuses) if s][:1]
    noisy = [log for log in logs if "terminate called" in log or "Traceback" in log]
    assert not noisy, noisy[0]


def test_ctrl_c_while_loading_is_one_line_and_status_130(tiny_mlx):
    for attempt in range(3):  # the window is the model load (~1 s): retried if the stop came late
        proc = subprocess.Popen([sys.executable, "-m", "mlx_speech.server", "--model", str(tiny_mlx),
                                 "--port", "0", "--log-level", "info"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines = iter(proc.stderr.readline, "")
        assert any("loading" in line for line in lines), "the server never said it was loading"
        proc.send_signal(signal.SIGINT)
        try:
            rest = proc.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the server did not stop on Ctrl-C while loading")
        if "loaded" in rest:
            assert proc.returncode == 0
            continue
        assert proc.returncode == 130 and "Traceback" not in rest
        said = [line for line in rest.strip().splitlines() if not line.startswith("INFO:")]  # the loader's progress
        assert said == [f"error: interrupted while loading {tiny_mlx}"]
        return
    pytest.fail("the model loaded before Ctrl-C arrived, three times")


@pytest.mark.parametrize("args,flag", [(["--max-chars", "0"], "--max-chars"),
                                       (["--request-timeout", "nan"], "--request-timeout")])
def test_usage_errors_exit_2_before_loading(args, flag):
    r = subprocess.run([sys.executable, "-m", "mlx_speech.server", "--model", "/nonexistent", *args],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"python -m mlx_speech.server: "
                                                                                f"error: argument {flag}")
