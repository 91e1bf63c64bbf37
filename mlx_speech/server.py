"""``python -m mlx_speech.server``: a local speech server that speaks the OpenAI audio API.

    python -m mlx_speech.server --model mistralai/Voxtral-4B-TTS-2603 --port 8000
    curl http://127.0.0.1:8000/v1/audio/speech -o hi.wav -H 'Content-Type: application/json' \\
        -d '{"input": "Hello!", "voice": "fr_female", "response_format": "wav"}'

Endpoints: ``POST /v1/audio/speech``, ``GET /v1/audio/voices``, ``GET /v1/models``, ``GET /health``.

The model is loaded once, on one worker thread that does every MLX call; requests wait in a
FIFO queue and are spoken one at a time, each with its own caches. A thin layer over
``longform.stream_generate_long``: a client that disconnects sets its job's cancel flag and the
worker stops at the next prefill chunk or frame. No response says 200 before its first audio
exists, so a request that fails early gets a JSON error; one that fails later is visibly cut off.
It is a local service (see ``server_guard``): web pages of other sites, other host names and
slow clients are refused. Needs the ``server`` extra (Starlette and uvicorn).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

try:
    import anyio  # Starlette's own concurrency layer
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
except ImportError as e:  # one hint, where the optional dependency is used
    raise ImportError(f"{e}; the server needs the 'server' extra: pip install 'mlx-speech[server]'") from None

from .server_guard import WILDCARD_HOSTS, HostPolicy, LocalOnly, error_response, timed_h11
from .commands import add_version
from .options import DEFAULT_MAX_BATCH
from .signals import exit_status, graceful_signals
from .speech_request import DEFAULT_MAX_CHARS, RequestError, parse_speech_request
from .speech_response import JobResponse
from .speech_worker import DEFAULT_MAX_QUEUE, SpeechJob, Worker
from .voices import voice_info

__all__ = ["RequestError", "SpeechJob", "Worker", "create_app", "main"]

DEFAULT_MODEL = "mistralai/Voxtral-4B-TTS-2603"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_CONNECTIONS = 64  # open connections; more are answered 503 (uvicorn's limit_concurrency)
DEFAULT_REQUEST_TIMEOUT = 10.0  # seconds to send the request head, and then the body
LISTEN_BACKLOG = 128  # connections the kernel holds before accept (macOS's somaxconn)
MAX_BODY_BYTES = 1 << 20

log = logging.getLogger("mlx_speech.server")


# ---- the application --------------------------------------------------------------------------
async def _read_body(request: Request, timeout: float) -> bytes:
    """The request body, at most MAX_BODY_BYTES (413), arriving within ``timeout`` seconds (408)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(f"the request body is {declared} bytes, over the limit of {MAX_BODY_BYTES}", status=413)
    body = bytearray()
    try:
        with anyio.fail_after(timeout):
            async for part in request.stream():
                body += part
                if len(body) > MAX_BODY_BYTES:
                    raise RequestError(f"the request body is over {MAX_BODY_BYTES} bytes", status=413)
    except TimeoutError:
        raise RequestError(f"the request body did not arrive within {timeout:g} s "
                           f"({len(body)} bytes came)", status=408) from None
    return bytes(body)


def _parse_json(body: bytes):
    try:
        return json.loads(body)
    except RecursionError:
        raise RequestError("the request body is not valid JSON: it is nested too deeply") from None
    except ValueError as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None


def create_app(worker: Worker, model_id: str, *, host: str = DEFAULT_HOST, allow_hosts: tuple[str, ...] = (),
               request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> Starlette:
    """The ASGI app over a started ``Worker``, answering only as the local service on ``host``
    (plus ``allow_hosts``, see ``server_guard.HostPolicy``)."""
    created = int(time.time())

    async def speech(request: Request) -> Response:
        try:
            payload = _parse_json(await _read_body(request, request_timeout))
            req = parse_speech_request(payload, worker.voices, worker.max_chars)
            try:  # tokenizer only: the whole text is checked before the job is queued
                worker.check(req)
            except ValueError as e:
                raise RequestError(str(e), "input") from None
            job = SpeechJob(req, asyncio.get_running_loop())
            worker.submit(job)
        except RequestError as e:  # a body left unread (408, 413) ends the connection
            close = {"connection": "close"} if e.status in (408, 413) else None
            return error_response(str(e), e.param, e.status, headers=close)
        except ClientDisconnect:
            return Response(status_code=499)
        return JobResponse(job, worker)

    async def list_voices(request: Request) -> Response:
        data = []
        for name in worker.voices:
            custom = name in worker.custom_voices
            language, gender = ("unknown", "unknown") if custom else voice_info(name)
            data.append({"id": name, "object": "voice", "name": name, "language": language, "gender": gender,
                         "custom": custom})
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

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("request failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return error_response(f"internal error: {type(exc).__name__}: {exc}", status=500)

    policy = HostPolicy.for_server(host, allow_hosts)
    return Starlette(
        middleware=[Middleware(LocalOnly, policy=policy)],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        routes=[
            Route("/v1/audio/speech", speech, methods=["POST"]),
            Route("/v1/audio/voices", list_voices, methods=["GET"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ])


# ---- command line -----------------------------------------------------------------------------
def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_speech.server",
                                description="OpenAI-compatible speech server for Voxtral-4B-TTS in MLX.")
    add_version(p)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"MLX model folder, original release folder, or Hub repo id (default: {DEFAULT_MODEL})")
    p.add_argument("--voices", metavar="DIR", default=None,
                   help="also speak with the custom voices in this folder (<name>.safetensors, e.g. made by "
                        "python -m mlx_speech.clone); listed by GET /v1/audio/voices with \"custom\": true")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default: {DEFAULT_HOST}, this machine only). 0.0.0.0 (or ::) "
                        "listens on every network interface: anyone who can reach this machine can use the "
                        "server, which has no authentication. Requests must then name the server by an IP "
                        "address, localhost, or a name given with --allow-host")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer to this host name in the Host and Origin headers, e.g. this machine's "
                        "name on the network (repeatable). Other names are refused, which stops web pages "
                        "from reaching the server through a DNS name of their own")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--max-chars", type=_at_least_one, default=DEFAULT_MAX_CHARS,
                   help=f"refuse inputs longer than this (default: {DEFAULT_MAX_CHARS})")
    p.add_argument("--max-queue", type=_at_least_one, default=DEFAULT_MAX_QUEUE,
                   help=f"requests that may wait; more get 503 (default: {DEFAULT_MAX_QUEUE})")
    p.add_argument("--max-batch", type=_at_least_one, default=DEFAULT_MAX_BATCH,
                   help="requests spoken at once through one batched step (continuous batching: a new "
                        "request joins the others at the next frame after its own prefill; 1 speaks them "
                        f"one at a time) (default: {DEFAULT_MAX_BATCH})")
    p.add_argument("--max-connections", type=_at_least_one, default=DEFAULT_MAX_CONNECTIONS,
                   help=f"open connections at once; requests on more get 503 (default: {DEFAULT_MAX_CONNECTIONS})")
    p.add_argument("--request-timeout", type=_seconds, default=DEFAULT_REQUEST_TIMEOUT, metavar="SECONDS",
                   help="a client must send its request head, and then its body, within this time; slower "
                        f"connections are closed (default: {DEFAULT_REQUEST_TIMEOUT:g})")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _exit(status: int) -> None:
    """Flush the logs and leave at once, without the interpreter's teardown: a process that used
    MLX from another thread can abort during it (ml-explore/mlx#3126), turning a clean stop into
    status 134. Nothing is left to clean up: no file is written, the sockets are closed."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _load(worker: Worker, model: str) -> None:
    """Start the worker; on failure, one line and the exit status (2: a bad --model, 130: Ctrl-C)."""
    try:
        log.info("loading %s", model)
        worker.start()
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM or SIGHUP while loading
        print(f"error: interrupted while loading {model}", file=sys.stderr)
        _exit(exit_status(e))
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        _exit(2)
    except Exception as e:
        print(f"error: could not load {model}: {type(e).__name__}: {e}", file=sys.stderr)
        _exit(1)


def _serve(worker: Worker, args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM (0), or until uvicorn cannot start (its status)."""
    model_id = Path(args.model).name if Path(args.model).expanduser().exists() else args.model
    log.info("loaded %s: %d voices, %d Hz", model_id, len(worker.voices), worker.sample_rate)
    if args.host.strip() in WILDCARD_HOSTS:
        log.warning("listening on every network interface (--host %r): anyone who can reach this machine "
                    "can use the server, which has no authentication", args.host)
    app = create_app(worker, model_id, host=args.host, allow_hosts=tuple(args.allow_host),
                     request_timeout=args.request_timeout)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            http=timed_h11(args.request_timeout), ws="none",
                            limit_concurrency=args.max_connections, backlog=LISTEN_BACKLOG,
                            timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # uvicorn stops gracefully, then raises the signal it caught again
        pass
    except SystemExit as e:  # uvicorn could not start (it logged why, e.g. the port is in use)
        return e.code if isinstance(e.code, int) else 1
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m mlx_speech.server``. Once the model is loading it does not
    return: it leaves through ``os._exit`` (see ``_exit``), with 0 after Ctrl-C or SIGTERM."""
    args = setup_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    if args.voices is not None and not Path(args.voices).expanduser().is_dir():
        print(f"error: --voices {args.voices}: no such folder", file=sys.stderr)
        raise SystemExit(2)
    worker = Worker(args.model, max_queue=args.max_queue, max_chars=args.max_chars, max_batch=args.max_batch,
                    voices_dir=None if args.voices is None else str(Path(args.voices).expanduser()))
    status = 0
    with graceful_signals():  # SIGTERM and SIGHUP stop the server like Ctrl-C
        _load(worker, args.model)
        try:
            status = _serve(worker, args)
        except KeyboardInterrupt:  # a stop between loading and serving
            pass
        finally:
            try:
                worker.stop()
            except KeyboardInterrupt:  # a second Ctrl-C: do not wait for the current frame
                pass
    _exit(status)


if __name__ == "__main__":
    main()
