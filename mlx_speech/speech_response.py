"""The speech server's response to an accepted job: no 200 before the first audio exists.

See ``JobResponse``. The body parts are exactly what the worker's chunks encode to, so a streamed
wav equals the one-shot encoding of the same request.
"""

from __future__ import annotations

import base64
import json
import logging

import anyio
import numpy as np
from starlette.concurrency import run_in_threadpool

from .audio_io import encode_audio, wav_header
from .server_guard import error_response
from .speech_request import MEDIA_TYPES, STREAMED_FORMATS
from .speech_worker import SpeechJob, Worker

log = logging.getLogger("mlx_speech.server")


class GenerationFailed(Exception):
    """The worker's generation raised: the message names the original error."""

    def __init__(self, error: BaseException):
        super().__init__(f"generation failed: {type(error).__name__}: {error}")


async def _chunks(job: SpeechJob, pending: tuple | None = None):
    """The job's generation responses as the worker produces them, from the event ``pending``
    (already taken from the queue) on."""
    while True:
        kind, value = pending if pending is not None else await job.events.get()
        pending = None
        if kind == "end":
            return
        if kind == "error":
            raise GenerationFailed(value)
        yield value


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


class JobResponse:
    """The response to an accepted job: the status line waits for the first audio.

    Non-streamed formats (flac, mp3) are produced completely, streamed ones (wav, pcm, sse) wait
    for their first chunk (prefill and the first frame), so a failure until then is a JSON 500.
    A failure after streaming began is an SSE ``error`` event, or for raw audio an end without the
    final chunk: the client sees an incomplete body, never a short one that claims to be whole.
    The client's disconnect is watched throughout and cancels the job, however the response ends.
    """

    def __init__(self, job: SpeechJob, worker: Worker):
        self.job, self.worker = job, worker
        self.sample_rate = worker.sample_rate
        request = job.request
        media = "text/event-stream; charset=utf-8" if request.stream_format == "sse" else MEDIA_TYPES[
            request.response_format]
        self.headers = [(b"content-type", media.encode()), (b"x-sample-rate", str(self.sample_rate).encode()),
                        (b"cache-control", b"no-cache")]

    async def __call__(self, scope, receive, send) -> None:
        async def respond() -> None:
            await self._respond(scope, receive, send)
            tasks.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(respond)
                while (await receive())["type"] != "http.disconnect":
                    pass
                tasks.cancel_scope.cancel()
        except OSError:  # a server that reports sends to a closed connection
            pass
        finally:
            self.job.cancel.set()

    async def _respond(self, scope, receive, send) -> None:
        first = await self.job.events.get()  # prefill and the first frame are done, or failed
        chunks = _chunks(self.job, first)
        if self.job.request.stream_format == "sse":
            await self._stream(scope, receive, send, self._sse_body(chunks), sse=True)
        elif self.job.request.response_format in STREAMED_FORMATS:
            await self._stream(scope, receive, send, self._audio_body(chunks), sse=False)
        else:
            await self._whole(scope, receive, send, chunks)

    async def _fail(self, scope, receive, send, error: Exception) -> None:
        await error_response(str(error), status=500)(scope, receive, send)

    async def _whole(self, scope, receive, send, chunks) -> None:
        fmt = self.job.request.response_format
        try:
            audio = [chunk.audio async for chunk in chunks]
        except GenerationFailed as e:
            await self._fail(scope, receive, send, e)
            return
        try:
            samples = np.concatenate(audio) if audio else np.zeros(0, np.float32)
            data = await run_in_threadpool(encode_audio, samples, self.sample_rate, fmt)
        except Exception as e:
            log.exception("encoding %s failed", fmt)
            self.worker.count("failed", instead_of="served")
            await self._fail(scope, receive, send, RuntimeError(f"encoding {fmt} failed: {type(e).__name__}: {e}"))
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*self.headers, (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data, "more_body": False})

    async def _stream(self, scope, receive, send, parts, sse: bool) -> None:
        """Send ``parts`` once the first exists; a failure after that ends the body without its
        final chunk (raw audio) or with an ``error`` event (SSE)."""
        try:
            part = await anext(parts, None)
        except GenerationFailed as e:
            await self._fail(scope, receive, send, e)
            return
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        sent = 0
        try:
            while part is not None:
                await send({"type": "http.response.body", "body": part, "more_body": True})
                sent += len(part)
                part = await anext(parts, None)
        except GenerationFailed as e:
            if not sse:  # after the 200: the client must see an incomplete body
                log.error("response cut off after %d bytes: %s", sent, e)
                return
            log.error("event stream ended by an error: %s", e)
            event = {"type": "error", "error": {"message": str(e), "type": "server_error"}}
            await send({"type": "http.response.body", "body": _sse(event), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _audio_body(self, chunks):
        """The wav header (sizes unknown: the stream ends the file) with the first audio, then
        16-bit PCM per chunk."""
        head = wav_header(self.sample_rate) if self.job.request.response_format == "wav" else b""
        async for chunk in chunks:
            if len(chunk.audio):
                yield head + encode_audio(chunk.audio, self.sample_rate, "pcm")
                head = b""
        if head:
            yield head

    async def _sse_body(self, chunks):
        last = None
        async for last in chunks:
            if len(last.audio):
                pcm = encode_audio(last.audio, self.sample_rate, "pcm")
                yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(pcm).decode()})
        tokens_in, tokens_out = (last.prompt_tokens, last.frames) if last is not None else (0, 0)
        usage = {"input_tokens": tokens_in, "output_tokens": tokens_out, "total_tokens": tokens_in + tokens_out}
        yield _sse({"type": "speech.audio.done", "usage": usage})
