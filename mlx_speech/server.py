"""``python -m mlx_speech.server``: a local speech server that speaks the OpenAI audio API.

    python -m mlx_speech.server --model mistralai/Voxtral-4B-TTS-2603 --port 8000
    curl http://127.0.0.1:8000/v1/audio/speech -o hi.wav \\
        -d '{"input": "Hello!", "voice": "fr_female", "response_format": "wav"}'

Endpoints: ``POST /v1/audio/speech``, ``GET /v1/audio/voices``, ``GET /v1/models``, ``GET /health``.

The model is loaded once, on one worker thread that does every MLX call; requests wait in a
FIFO queue and are spoken one at a time, each with its own caches. A thin layer over
``longform.stream_generate_long``: a client that disconnects sets its job's cancel flag and the
worker stops between two streamed chunks. Needs the ``server`` extra (Starlette and uvicorn).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

try:
    import anyio  # Starlette's own concurrency layer
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as e:  # one hint, where the optional dependency is used
    raise ImportError(f"{e}; the server needs the 'server' extra: pip install 'mlx-speech[server]'") from None

from .audio_io import encode_audio, wav_header
from .longform import plan_pieces, stream_generate_long
from .speech_request import (
    DEFAULT_MAX_CHARS,
    MEDIA_TYPES,
    STREAMED_FORMATS,
    RequestError,
    SpeechRequest,
    parse_speech_request,
)
from .voices import voice_info

DEFAULT_MODEL = "mistralai/Voxtral-4B-TTS-2603"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 32
MAX_BODY_BYTES = 1 << 20

log = logging.getLogger("mlx_speech.server")


def error_response(message: str, param: str | None = None, status: int = 400) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


# ---- the MLX worker ---------------------------------------------------------------------------
@dataclass
class SpeechJob:
    request: SpeechRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def post(self, kind: str, value=None) -> None:
        """Hand an event to the request's event loop (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel.set()


class Worker:
    """One thread for all MLX work: it loads the model, then speaks queued jobs one at a time."""

    def __init__(self, model_path: str, max_queue: int = DEFAULT_MAX_QUEUE, max_chars: int = DEFAULT_MAX_CHARS):
        self.model_path, self.max_chars = model_path, max_chars
        self.model = None
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.counts = {"served": 0, "cancelled": 0, "failed": 0}
        self.busy = False
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mlx-worker", daemon=True)

    def start(self) -> None:
        """Start the thread and wait until the model is loaded (re-raising a load error)."""
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    def stop(self) -> None:
        if self._thread.is_alive():
            try:
                self.jobs.put(None, timeout=1)
            except queue.Full:  # jobs still queued at shutdown: the daemon thread ends with the process
                return
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: SpeechJob) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(f"the server is busy: {self.jobs.maxsize} requests are already waiting; "
                               "retry later", status=503) from None

    def _run(self) -> None:
        from . import load

        try:
            self.model = load(self.model_path)
        except BaseException as e:
            self._load_error = e
            return
        finally:
            self._loaded.set()
        while (job := self.jobs.get()) is not None:
            if job.cancel.is_set():  # the client left while waiting
                self.counts["cancelled"] += 1
                continue
            self.busy = True
            try:
                outcome = self._speak(job)
            except Exception as e:  # report it to the client; the worker serves the next job
                log.exception("generation failed")
                job.post("error", e)
                outcome = "failed"
            finally:
                self.busy = False
            self.counts[outcome] += 1

    def _speak(self, job: SpeechJob) -> str:
        r = job.request
        chunks = stream_generate_long(self.model, r.input, r.voice, max_chars=self.max_chars, **r.options)
        try:
            for chunk in chunks:
                if job.cancel.is_set():
                    return "cancelled"
                job.post("chunk", chunk)
            job.post("end")
            return "served"
        finally:
            chunks.close()
            mx.clear_cache()


# ---- responses --------------------------------------------------------------------------------
async def _chunks(job: SpeechJob):
    """The job's generation responses, as the worker produces them."""
    while True:
        kind, value = await job.events.get()
        if kind == "end":
            return
        if kind == "error":
            raise RuntimeError(f"generation failed: {value}")
        yield value


async def _audio_body(job: SpeechJob, sample_rate: int):
    fmt = job.request.response_format
    if fmt == "wav":
        yield wav_header(sample_rate)  # sizes unknown: the stream ends the file
    if fmt in STREAMED_FORMATS:
        async for chunk in _chunks(job):
            if len(chunk.audio):
                yield encode_audio(chunk.audio, sample_rate, "pcm")
        return
    audio = [chunk.audio async for chunk in _chunks(job)]
    yield await run_in_threadpool(encode_audio, np.concatenate(audio), sample_rate, fmt)


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


async def _sse_body(job: SpeechJob, sample_rate: int):
    last = None
    try:
        async for last in _chunks(job):
            if len(last.audio):
                pcm = encode_audio(last.audio, sample_rate, "pcm")
                yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(pcm).decode()})
    except RuntimeError as e:  # after the 200: the failure becomes an event
        yield _sse({"type": "error", "error": {"message": str(e), "type": "server_error"}})
        return
    tokens_in, tokens_out = (last.prompt_tokens, last.frames) if last is not None else (0, 0)
    usage = {"input_tokens": tokens_in, "output_tokens": tokens_out, "total_tokens": tokens_in + tokens_out}
    yield _sse({"type": "speech.audio.done", "usage": usage})


class _JobResponse(StreamingResponse):
    """A streamed response that cancels its job however it ends (done, disconnect, shutdown).

    It always listens for the client's disconnect while streaming (whatever ASGI spec version
    the server announces), so a client that leaves stops the worker even when no audio is being
    sent, e.g. while an mp3 is still being generated.
    """

    def __init__(self, job: SpeechJob, body, **kwargs):
        super().__init__(body, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        async def stream() -> None:
            await self.stream_response(send)
            tasks.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(stream)
                while (await receive())["type"] != "http.disconnect":
                    pass
                tasks.cancel_scope.cancel()
        except OSError:  # a server that reports sends to a closed connection
            pass
        finally:
            self.job.cancel.set()


# ---- the application --------------------------------------------------------------------------
def create_app(worker: Worker, model_id: str) -> Starlette:
    """The ASGI app over a started ``Worker``."""
    model = worker.model
    voices = model.voices
    sample_rate = model.config.sample_rate
    created = int(time.time())

    async def speech(request: Request) -> Response:
        try:
            body = bytearray()
            async for part in request.stream():
                body += part
                if len(body) > MAX_BODY_BYTES:
                    raise RequestError(f"the request body is over {MAX_BODY_BYTES} bytes", status=413)
            try:
                payload = json.loads(body)
            except ValueError as e:
                raise RequestError(f"the request body is not valid JSON: {e}") from None
            req = parse_speech_request(payload, voices, worker.max_chars)
            try:  # tokenizer only: the whole text is checked before the 200
                plan_pieces(model, req.input, req.voice, max_chars=worker.max_chars,
                            max_frames=req.options["max_frames"])
            except ValueError as e:
                raise RequestError(str(e), "input") from None
            job = SpeechJob(req, asyncio.get_running_loop())
            worker.submit(job)
        except RequestError as e:
            return error_response(str(e), e.param, e.status)
        except ClientDisconnect:
            return Response(status_code=499)
        headers = {"X-Sample-Rate": str(sample_rate), "Cache-Control": "no-cache"}
        if req.stream_format == "sse":
            return _JobResponse(job, _sse_body(job, sample_rate), media_type="text/event-stream", headers=headers)
        return _JobResponse(job, _audio_body(job, sample_rate), media_type=MEDIA_TYPES[req.response_format],
                            headers=headers)

    async def list_voices(request: Request) -> Response:
        data = []
        for name in voices:
            language, gender = voice_info(name)
            data.append({"id": name, "object": "voice", "name": name, "language": language, "gender": gender})
        return JSONResponse({"object": "list", "data": data})

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "mlx-speech"}]})

    async def health(request: Request) -> Response:
        status = {"status": "ok" if worker.alive else "error", "model": model_id, "busy": worker.busy,
                  "queued": worker.jobs.qsize(), **worker.counts}
        return JSONResponse(status, status_code=200 if worker.alive else 503)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(exc.detail, status=exc.status_code)  # 404/405 in OpenAI's error shape

    return Starlette(exception_handlers={HTTPException: http_error}, routes=[
        Route("/v1/audio/speech", speech, methods=["POST"]),
        Route("/v1/audio/voices", list_voices, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ])


# ---- command line -----------------------------------------------------------------------------
def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_speech.server",
                                description="OpenAI-compatible speech server for Voxtral-4B-TTS in MLX.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"MLX model folder, original release folder, or Hub repo id (default: {DEFAULT_MODEL})")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS,
                   help=f"refuse inputs longer than this (default: {DEFAULT_MAX_CHARS})")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"requests that may wait; more get 503 (default: {DEFAULT_MAX_QUEUE})")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m mlx_speech.server``."""
    args = setup_arg_parser().parse_args(argv)
    if args.max_chars < 1 or args.max_queue < 1:
        print(f"error: --max-chars and --max-queue must be at least 1, got {args.max_chars} and {args.max_queue}",
              file=sys.stderr)
        raise SystemExit(2)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    worker = Worker(args.model, max_queue=args.max_queue, max_chars=args.max_chars)
    try:
        worker.start()
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    model_id = Path(args.model).name if Path(args.model).expanduser().exists() else args.model
    log.info("loaded %s: %d voices, %d Hz", model_id, len(worker.model.voices), worker.model.config.sample_rate)
    try:
        uvicorn.run(create_app(worker, model_id), host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        worker.stop()


if __name__ == "__main__":
    main()
