"""The speech server's worker: one thread that does every MLX call, speaking queued jobs.

The web side (``server.py``) hands it ``SpeechJob``s and reads each job's events from its own
event loop; nothing here knows about HTTP. A job's ``cancel`` flag (a client that left, or the
server stopping) ends its generation at the next prefill chunk or frame.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
from dataclasses import dataclass, field

import numpy as np

from .speech_request import DEFAULT_MAX_CHARS, RequestError, SpeechRequest

DEFAULT_MAX_QUEUE = 32

log = logging.getLogger("mlx_speech.server")


@dataclass
class SpeechJob:
    request: SpeechRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("chunk"|"end"|"error", value)
    cancel: threading.Event = field(default_factory=threading.Event)

    def post(self, kind: str, value=None) -> None:
        """Hand an event to the request's event loop (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel.set()


def add_voice_folder(model, folder) -> list[str]:
    """Add every ``<name>.safetensors`` voice file of ``folder`` to ``model`` (checked, as
    ``Voice.load`` does); the names added, sorted.

    Raises:
        ValueError: the folder does not exist or holds no voice file, a name clashes with a
            preset, or a file is refused (``CheckpointError`` naming it).
    """
    from pathlib import Path

    from .voice_file import Voice
    from .voices import user_voice_files

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--voices {folder}: no such folder")
    found = user_voice_files(folder)
    if not found:
        raise ValueError(f"--voices {folder}: no voice files (<name>.safetensors) in it")
    for name, path in found.items():
        if name in model.voices:
            raise ValueError(f"--voices {folder}: {path.name} has the name of a preset voice; rename it")
        model.add_voice(name, Voice.load(path, model.config.backbone.dim).embedding)
    return list(found)


def _release_mlx() -> None:
    """Free this thread's MLX streams before it ends: without it, a process that used MLX from a
    thread can abort at exit ("terminate called without an active exception", ml-explore/mlx#3126)."""
    mx = sys.modules.get("mlx.core")
    if mx is not None and hasattr(mx, "clear_streams"):
        mx.clear_streams()


class Worker:
    """One thread for all MLX work: it loads the model, then speaks queued jobs one at a time.

    The application uses only ``voices``, ``sample_rate``, ``max_chars``, ``check``, ``submit``
    and the status attributes; ``_load`` and ``_generate`` are the two places that touch the model.
    """

    def __init__(self, model_path: str, max_queue: int = DEFAULT_MAX_QUEUE, max_chars: int = DEFAULT_MAX_CHARS,
                 voices_dir: str | None = None):
        self.model_path, self.max_chars, self.voices_dir = model_path, max_chars, voices_dir
        self.model = None
        self.custom_voices: list[str] = []  # names added from voices_dir
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.counts = {"served": 0, "cancelled": 0, "failed": 0}
        self.busy = False
        self._counts_lock = threading.Lock()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._current: SpeechJob | None = None
        self._thread = threading.Thread(target=self._run, name="mlx-worker", daemon=True)

    # -- the model: replaced by tests' stub workers
    def _load(self):
        from . import load

        model = load(self.model_path)
        if self.voices_dir is not None:
            self.custom_voices = add_voice_folder(model, self.voices_dir)
        return model

    def _generate(self, request: SpeechRequest, cancel: threading.Event):
        """The job's ``LongGenerationResponse`` chunks; stops when ``cancel`` is set."""
        import mlx.core as mx

        from .longform import stream_generate_long

        try:
            yield from stream_generate_long(self.model, request.input, request.voice, max_chars=self.max_chars,
                                            cancel=cancel, **request.options)
        finally:
            mx.clear_cache()

    def check(self, request: SpeechRequest) -> None:
        """Raise ValueError for text the model cannot take (tokenizer only, no MLX work)."""
        from .longform import plan_pieces

        plan_pieces(self.model, request.input, request.voice, max_chars=self.max_chars,
                    max_frames=request.options["max_frames"])

    @property
    def voices(self) -> list[str]:
        return self.model.voices

    @property
    def sample_rate(self) -> int:
        return self.model.config.sample_rate

    # -- the thread
    def start(self) -> None:
        """Start the thread and wait until the model is loaded (re-raising a load error)."""
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the waiting jobs and the current one (it ends at its next frame); wait for the thread."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                self.count("cancelled")
        if self._current is not None:
            self._current.cancel.set()
        if self._thread.is_alive():
            self.jobs.put(None)
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: SpeechJob) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(f"the server is busy: {self.jobs.maxsize} requests are already waiting; "
                               "retry later", status=503) from None

    def count(self, outcome: str, instead_of: str | None = None) -> None:
        """Count a job's outcome (from any thread); ``instead_of`` moves one already counted."""
        with self._counts_lock:
            self.counts[outcome] += 1
            if instead_of is not None:
                self.counts[instead_of] -= 1

    def _run(self) -> None:
        try:
            try:
                self.model = self._load()
            except BaseException as e:
                self._load_error = e
                return
            finally:
                self._loaded.set()
            while (job := self.jobs.get()) is not None:
                self._serve(job)
        finally:
            _release_mlx()

    def _serve(self, job: SpeechJob) -> None:
        if job.cancel.is_set():  # the client left while waiting
            self.count("cancelled")
            return
        self.busy, self._current = True, job
        try:
            outcome = self._speak(job)
        except Exception as e:  # report it to the client; the worker serves the next job
            log.exception("generation failed")
            job.post("error", e)
            outcome = "failed"
        finally:
            self.busy, self._current = False, None
        self.count(outcome)

    def _speak(self, job: SpeechJob) -> str:
        chunks = self._generate(job.request, job.cancel)
        try:
            for chunk in chunks:
                if job.cancel.is_set():
                    break
                if not np.isfinite(chunk.audio).all():  # never hand the encoders (or a client) NaN
                    raise ValueError(f"the model produced non-finite audio at frame {chunk.frames}; "
                                     "its weights or the voice may be damaged")
                job.post("chunk", chunk)
            if job.cancel.is_set():
                return "cancelled"
            job.post("end")
            return "served"
        finally:
            chunks.close()
