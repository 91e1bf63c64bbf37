"""Continuous batching for the speech server: who joins, who leaves, and each client's chunks.

The server's worker thread owns one ``BatchScheduler``. Requests are spoken through one
``frame_decoder.FrameDecoder`` — at most ``max_batch`` rows, one per request speaking — so a request
that arrives while others speak joins at the next frame boundary after its own prefill, instead
of waiting for them to finish. Its prefill runs one chunk (``prefill_step_size`` positions)
between two decode steps of the running rows, so a long new prompt stalls them for one chunk at
a time. A request whose text has several pieces (long text, ``longform.plan_pieces``) speaks them
one after another as rows of its own, joined by the request's ``longform.PieceJoiner`` with the
crossfades ``stream_generate_long`` applies; a finished or cancelled request leaves at once.

Every request gets exactly the chunks it would get alone (``stream_generate_long`` with its
voice, seed and options): batching never changes what a row says (``tests/test_batch.py``), and
each piece keeps its ``chunk_seed``. Data flows one way: server → worker → this scheduler →
``FrameDecoder`` → model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .batch_generation import PreparedRow, RowStream, prepare_row, respond_all, start_prefill
from .frame_decoder import FrameDecoder
from .longform import DEFAULT_CROSSFADE_MS, PieceJoiner, chunk_seed, plan_pieces
from .options import DEFAULT_MAX_BATCH
from .prompt_cache import ChunkedPrefill
from .voice_select import select_voice


@dataclass
class _Request:
    """A job in the scheduler: its planned pieces, the piece being spoken and how far it is."""

    job: object  # speech_worker.SpeechJob
    planned: list[tuple[str, int]]
    joiner: PieceJoiner
    voice: object  # SelectedVoice
    piece: int = 0
    row: PreparedRow | None = None
    prefill: ChunkedPrefill | None = None  # while the piece is being prefilled
    stream: RowStream | None = None  # once it decodes
    key: tuple = field(default=())


class BatchScheduler:
    """The server's requests through one batched decode loop (see the module docstring).

    ``add`` a job when ``has_room``; call ``step`` repeatedly: each call advances one prefill
    chunk and one frame of every decoding row, posts each job's chunks to it (``job.post``), and
    returns the outcomes of the jobs that left ("served", "cancelled" or "failed").
    """

    def __init__(self, model, max_batch: int = DEFAULT_MAX_BATCH, max_chars: int | None = None,
                 crossfade_ms: float = DEFAULT_CROSSFADE_MS):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.max_batch, self.max_chars = model, max_batch, max_chars
        self._overlap = int(round(crossfade_ms * model.config.sample_rate / 1000))
        self._decoder = FrameDecoder(model)
        self._requests: list[_Request] = []  # in arrival order
        self._serial = 0

    @property
    def has_room(self) -> bool:
        return len(self._requests) < self.max_batch

    @property
    def idle(self) -> bool:
        return not self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def add(self, job) -> None:
        """Plan a job's text (tokenizer only) and queue its first piece's prefill.

        Raises:
            ValueError: the text or an option is refused (the server checked it before; this
                is the library's own check).
        """
        r = job.request
        voice = select_voice(self.model, r.voice)
        planned = plan_pieces(self.model, r.input, voice, max_chars=self.max_chars,
                              max_frames=r.options.get("max_frames"))
        joiner = PieceJoiner(planned, self.model.config.sample_rate, self._overlap, time.perf_counter())
        request = _Request(job, planned, joiner, voice)
        self._start_piece(request)
        self._requests.append(request)

    def _start_piece(self, request: _Request) -> None:
        o = request.job.request.options
        text, _ = request.planned[request.piece]
        request.row = prepare_row(self.model, text, request.voice, seed=chunk_seed(o.get("seed"), request.piece),
                                  max_frames=o.get("max_frames"), cfg_alpha=o["cfg_alpha"],
                                  flow_steps=o["flow_steps"])
        request.prefill = start_prefill(self.model, request.row, cancel=request.job.cancel)
        request.stream = None
        self._serial += 1
        request.key = (self._serial, request.piece)

    def fail_all(self, error: BaseException) -> list[tuple[object, str]]:
        """Every job leaves with ``error`` (a step raised: the batch's state is unknown); the
        next jobs start from a fresh decoder."""
        outcomes = []
        for request in self._requests:
            request.job.post("error", error)
            outcomes.append((request.job, "failed"))
        self._requests = []
        self._decoder = FrameDecoder(self.model)
        return outcomes

    def cancel_all(self) -> None:
        """Set every job's cancel flag (the server is stopping); they leave at the next step."""
        for request in self._requests:
            request.job.cancel.set()

    def step(self) -> list[tuple[object, str]]:
        """One round: drop cancelled jobs, one prefill chunk, one frame for every decoding row."""
        outcomes = [(r.job, "cancelled") for r in self._requests if r.job.cancel.is_set()]
        for request in [r for r in self._requests if r.job.cancel.is_set()]:
            self._leave(request)
        self._advance_prefill()
        if len(self._decoder):
            outcomes += self._decode()
        return outcomes

    def _leave(self, request: _Request) -> None:
        self._decoder.remove(request.key)
        self._requests.remove(request)

    def _advance_prefill(self) -> None:
        """The oldest prefilling piece runs one chunk; with nothing decoding, it runs to the end
        (there is no one to stall). A finished prefill joins the decoder at its next step."""
        waiting = next((r for r in self._requests if r.prefill is not None), None)
        if waiting is None:
            return
        run = waiting.prefill
        while not run.advance():
            if len(self._decoder) or waiting.job.cancel.is_set():
                return
        row = waiting.row
        self._decoder.add(waiting.key, run.cache, run.hidden, frame_cap=row.frame_cap, seed=row.seed,
                          noise=row.noise, cfg_alpha=row.cfg_alpha, flow_steps=row.flow_steps)
        waiting.prefill, waiting.stream = None, RowStream(self.model, row, waiting.joiner.start)

    def _decode(self) -> list[tuple[object, str]]:
        by_key = {r.key: r for r in self._requests if r.stream is not None}
        due, reasons = [], []
        for frame in self._decoder.step():
            request = by_key[frame.key]
            if frame.codes is not None:
                request.stream.push(frame.codes)
            if frame.finish_reason is not None or request.stream.due:
                due.append(request)
                reasons.append(frame.finish_reason)
        outcomes = []
        for request, response in zip(due, respond_all([r.stream for r in due], reasons)):
            if not np.isfinite(response.audio).all():  # never hand the encoders (or a client) NaN
                request.job.post("error", ValueError(
                    f"the model produced non-finite audio at frame {response.frames}; its weights or the "
                    "voice may be damaged"))
                self._leave(request)
                outcomes.append((request.job, "failed"))
                continue
            out = request.joiner.feed(request.piece, response)
            if out is not None:
                request.job.post("chunk", out)
            if response.finish_reason is None:
                continue
            if request.piece + 1 < len(request.planned):
                request.piece += 1
                self._start_piece(request)  # the next piece prefills; the request keeps its slot
            else:
                request.job.post("end")
                self._requests.remove(request)
                outcomes.append((request.job, "served"))
        return outcomes
