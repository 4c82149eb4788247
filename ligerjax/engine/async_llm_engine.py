"""Streaming generation on asyncio: ``async for output in engine.generate(...)``.

One background task drives :meth:`LLMEngine.step` while any request is live, running each
step in a worker thread so the event loop stays free, and hands every ``RequestOutput`` to
the queue of the stream that asked for it. Engine calls (add, abort, step) are serialised
by one lock, so a request added mid-step joins at the next step. A consumer that stops
listening (cancelled, or breaks out of its loop) aborts its request; a request refused at
``add_request`` raises in its own caller only; an error inside a step ends the streams live
at that moment with that error and the loop carries on with later requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from ligerjax.engine.llm_engine import EngineStats, LLMEngine, PromptLike
from ligerjax.outputs import RequestOutput
from ligerjax.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_Item = RequestOutput | Exception | None  # an output, the step's error, or None: aborted


class AsyncLLMEngine:
    """An :class:`LLMEngine` served to many concurrent asyncio consumers."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue[_Item]] = {}
        self._lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None

    async def generate(
        self,
        prompt: PromptLike,
        sampling_params: SamplingParams | None,
        request_id: str,
        *,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output each time it grows; the last one has ``finished``.

        Raises ``ValueError`` (naming the value) for a request the engine refuses.
        """
        lock, wake = self._start()
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        async with lock:
            if request_id in self._queues:
                raise ValueError(f"generate: request id {request_id!r} is already streaming")
            self.engine.add_request(request_id, prompt, sampling_params, priority=priority)
            self._queues[request_id] = queue
        wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if item is None:  # aborted through abort()
                    return
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                await self._abort_quietly(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a live request; its stream ends quietly. ``ValueError`` for an unknown id."""
        lock, _ = self._start()
        async with lock:
            self.engine.abort_request(request_id)
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(None)

    async def stats(self) -> EngineStats:
        lock, _ = self._start()
        async with lock:
            return self.engine.stats()

    async def shutdown(self) -> None:
        """Stop the background loop (live streams are left waiting; abort them first)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None

    # -- the background loop -----------------------------------------------------------------

    def _start(self) -> tuple[asyncio.Lock, asyncio.Event]:
        if self._lock is None or self._wake is None:
            self._lock, self._wake = asyncio.Lock(), asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        return self._lock, self._wake

    async def _run(self) -> None:
        assert self._lock is not None and self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                async with self._lock:
                    if not self.engine.has_unfinished_requests():
                        break
                    try:
                        outputs = await asyncio.to_thread(self.engine.step)
                    except Exception as e:  # handed to the streams, not lost
                        log.exception("engine step failed")
                        self._fail_live_requests(e)
                        continue
                for output in outputs:
                    queue = self._queues.get(output.request_id)
                    if queue is not None:
                        queue.put_nowait(output)
                await asyncio.sleep(0)  # let consumers and new requests in between steps

    def _fail_live_requests(self, error: Exception) -> None:
        for request_id in self.engine.live_request_ids():
            self.engine.abort_request(request_id)
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(error)

    async def _abort_quietly(self, request_id: str) -> None:
        lock, _ = self._start()
        async with lock:
            with contextlib.suppress(ValueError):  # it may have finished meanwhile
                self.engine.abort_request(request_id)
