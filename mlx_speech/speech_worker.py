"""The speech server's worker: one thread that does every MLX call, speaking queued jobs.

The web side (``server.py``) hands it ``SpeechJob``s and reads each job's events from its own
event loop; nothing here knows about HTTP. Jobs wait in a bounded FIFO queue (503 when full) and
are admitted, ``--max-batch`` at a time, into the continuous-batching scheduler
(``speech_scheduler.BatchScheduler``), which speaks them together and posts each its chunks.
A job's ``cancel`` flag (a client that left, or the server stopping) makes it leave at the next
prefill chunk or frame.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
from dataclasses import dataclass, field

from .speech_request import DEFAULT_MAX_CHARS, RequestError, SpeechRequest
from .options import DEFAULT_MAX_BATCH

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
                 voices_dir: str | None = None, max_batch: int = DEFAULT_MAX_BATCH):
        self.model_path, self.max_chars, self.voices_dir = model_path, max_chars, voices_dir
        self.max_batch = max_batch
        self.model = None
        self.custom_voices: list[str] = []  # names added from voices_dir
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.counts = {"served": 0, "cancelled": 0, "failed": 0}
        self.busy = False
        self._counts_lock = threading.Lock()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._scheduler = None  # set on the thread once the model is loaded
        self._thread = threading.Thread(target=self._run, name="mlx-worker", daemon=True)

    # -- the model: replaced by tests' stub workers
    def _load(self):
        from . import load

        model = load(self.model_path)
        if self.voices_dir is not None:
            self.custom_voices = add_voice_folder(model, self.voices_dir)
        return model

    def _make_scheduler(self):
        """The model side of the loop: ``add(job)``, ``step()`` → outcomes, ``has_room``, ``idle``,
        ``cancel_all()`` (tests put a stand-in model behind the same interface)."""
        from .speech_scheduler import BatchScheduler

        return BatchScheduler(self.model, self.max_batch, self.max_chars)

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
        if self._scheduler is not None:
            self._scheduler.cancel_all()
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
                self._scheduler = self._make_scheduler()
            except BaseException as e:
                self._load_error = e
                return
            finally:
                self._loaded.set()
            self._loop(self._scheduler)
        finally:
            _release_mlx()

    def _loop(self, scheduler) -> None:
        """Admit queued jobs while there is room (waiting only when nothing is being spoken),
        step the scheduler, count who left; until ``stop`` and everyone has left."""
        stopping = False
        while not (stopping and scheduler.idle):
            while not stopping and scheduler.has_room:
                try:
                    job = self.jobs.get(block=scheduler.idle)
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                else:
                    self._admit(scheduler, job)
            if scheduler.idle:
                continue
            self.busy = True
            try:
                outcomes = scheduler.step()
            except Exception as e:  # report it to every client being spoken to; serve the next ones
                log.exception("generation failed")
                outcomes = scheduler.fail_all(e)
            self.busy = not scheduler.idle
            for _job, outcome in outcomes:
                self.count(outcome)

    def _admit(self, scheduler, job: SpeechJob) -> None:
        if job.cancel.is_set():  # the client left while waiting
            self.count("cancelled")
            return
        try:
            scheduler.add(job)
        except Exception as e:
            log.exception("generation failed")
            job.post("error", e)
            self.count("failed")
