"""Continuous batching in the server: requests spoken together, each exactly as if alone.

In process, the worker's scheduler over the tiny model (requests joining while others speak, long
texts of several pieces, a cancelled request); then a real server with --max-batch 4 answering
8 concurrent requests, each equal to the same request served alone.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mlx_speech.longform import generate_long
from mlx_speech.speech_request import parse_speech_request
from mlx_speech.speech_scheduler import BatchScheduler

TEXT = "Hello world, this is a test."
LONG = " ".join(f"Sentence number {i} is spoken here." for i in range(14))  # several pieces


class Job:
    """What the scheduler needs of a server job: the request, a cancel flag, and ``post``."""

    def __init__(self, payload: dict, voices: list[str]):
        self.request = parse_speech_request(payload, voices, 4096)
        self.cancel = threading.Event()
        self.events: list[tuple[str, object]] = []

    def post(self, kind, value=None):
        self.events.append((kind, value))

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate([v.audio for k, v in self.events if k == "chunk"])


PAYLOADS = [
    {"input": TEXT, "voice": "casual_male", "seed": 4, "max_frames": 9},
    {"input": "Short one.", "voice": "neutral_female", "seed": 7, "max_frames": 5},
    {"input": LONG, "voice": "casual_male", "seed": 3, "max_frames": 4},
    {"input": TEXT + " Again.", "voice": "neutral_female", "seed": 1, "cfg_alpha": 2.0, "flow_steps": 4},
    {"input": "Another short text to say.", "voice": "casual_male", "seed": 11},
]


def alone(model, job: Job) -> np.ndarray:
    r = job.request
    return generate_long(model, r.input, r.voice, max_chars=4096, **r.options).audio


def test_jobs_joining_while_others_speak_each_get_their_solo_audio(model):
    scheduler = BatchScheduler(model, max_batch=3, max_chars=4096)
    jobs = [Job(p, model.voices) for p in PAYLOADS]
    waiting, widest, steps = list(jobs), 0, 0
    while waiting or not scheduler.idle:
        if waiting and scheduler.has_room and steps % 2 == 0:  # arrivals spread over frames
            scheduler.add(waiting.pop(0))
        outcomes = scheduler.step()
        assert all(outcome == "served" for _, outcome in outcomes)
        widest = max(widest, len(scheduler._decoder))
        steps += 1
    assert widest == 3  # rows really shared the decode loop
    for job in jobs:
        assert job.events[-1] == ("end", None)
        np.testing.assert_array_equal(job.audio, alone(model, job))
    long_pieces = {v.piece for k, v in jobs[2].events if k == "chunk"}
    assert len(long_pieces) > 1  # the long text was spoken piece after piece


def test_a_cancelled_job_leaves_and_the_others_are_unchanged(model):
    scheduler = BatchScheduler(model, max_batch=4, max_chars=4096)
    jobs = [Job(p, model.voices) for p in PAYLOADS[:3]]
    for job in jobs:
        scheduler.add(job)
    outcomes = []
    for step in range(1000):
        if step == 3:
            jobs[1].cancel.set()
        outcomes += scheduler.step()
        if scheduler.idle:
            break
    assert sorted((jobs.index(j), o) for j, o in outcomes) == [(0, "served"), (1, "cancelled"), (2, "served")]
    for i in (0, 2):
        np.testing.assert_array_equal(jobs[i].audio, alone(model, jobs[i]))
    assert ("end", None) not in jobs[1].events


# ---- a real server ---------------------------------------------------------------------------------
for _module in ("starlette", "uvicorn", "httpx"):
    pytest.importorskip(_module, reason=f"{_module} is not installed (pip install -e '.[server,dev]')")

import httpx  # noqa: E402
from test_server import start_server, stop_server  # noqa: E402


def test_eight_concurrent_requests_with_max_batch_4_each_equal_it_served_alone(tiny_mlx, tmp_path):
    bodies = [dict(PAYLOADS[i % len(PAYLOADS)], seed=20 + i, response_format=fmt)
              for i, fmt in enumerate(["wav", "pcm", "flac", "wav", "pcm", "wav", "flac", "pcm"])]
    proc, url = start_server(tiny_mlx, tmp_path / "server.log", "--max-batch", "4")
    try:
        def post(body):
            r = httpx.post(f"{url}/v1/audio/speech", json=body, timeout=300)
            assert r.status_code == 200, r.text
            return r.content

        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(post, bodies))
        one_by_one = [post(body) for body in bodies]
        assert together == one_by_one
        health = httpx.get(f"{url}/health").json()
        assert health["served"] == 16 and health["failed"] == 0
    finally:
        assert stop_server(proc) == 0


def test_a_client_leaving_mid_batch_leaves_the_others_unchanged(tiny_mlx, tmp_path):
    proc, url = start_server(tiny_mlx, tmp_path / "server.log", "--max-batch", "4")
    keep = [dict(PAYLOADS[0], response_format="pcm"), dict(PAYLOADS[2], response_format="pcm")]
    leaving = dict(PAYLOADS[4], response_format="pcm", max_frames=200)

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            async def full(body):
                r = await client.post("/v1/audio/speech", json=body)
                return r.content

            async def leave(body):
                async with client.stream("POST", "/v1/audio/speech", json=body) as r:
                    async for _ in r.aiter_bytes():
                        return  # the first chunk came: hang up

            return await asyncio.gather(full(keep[0]), leave(leaving), full(keep[1]))

    try:
        first, _, second = asyncio.run(run())
        alone = [httpx.post(f"{url}/v1/audio/speech", json=b, timeout=300).content for b in keep]
        assert [first, second] == alone
    finally:
        assert stop_server(proc) == 0
