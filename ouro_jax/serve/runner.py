"""One thread that drives a backend (`backend.StaticBatchBackend` or the engine): the asyncio side sends it
adds and aborts through a queue and gets each request's `TokenEvent`s on an asyncio queue."""

from __future__ import annotations

import asyncio
import queue
import threading
import traceback
from collections.abc import Sequence

from ouro_jax.inference.engine import SamplingParams


class Runner:
    """`await submit(prompt, params, outbox)` -> request id; `abort(id)`; `close()` stops the thread once
    the in-flight requests are done."""

    def __init__(self, backend):
        self.backend = backend
        self._inbox: queue.Queue = queue.Queue()
        self._outboxes: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="serve-runner", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished or aborted."""
        return len(self._outboxes)

    async def submit(self, prompt: Sequence[int], params: SamplingParams, outbox: asyncio.Queue) -> int:
        """Add a request on the runner thread; its events go to `outbox` (the TokenEvents, the last one with
        a finish_reason, or an exception if its batch failed). Returns its id; the backend's ValueError
        is raised here."""
        loop = asyncio.get_running_loop()
        added = loop.create_future()
        self._inbox.put(("add", (list(prompt), params, loop, outbox, added)))
        return await added

    def abort(self, request_id: int) -> None:
        self._inbox.put(("abort", request_id))

    def close(self, timeout: float | None = None) -> None:
        """Finish the in-flight requests, then stop the thread."""
        self._closing.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            if not self.backend.has_work():
                if self._closing.is_set() and self._inbox.empty():
                    return
                try:
                    self._handle(*self._inbox.get(timeout=0.5))
                except queue.Empty:
                    continue
            while not self._inbox.empty():
                self._handle(*self._inbox.get_nowait())
            if self.backend.has_work():
                try:
                    events = self.backend.step()
                except Exception as err:  # a failed batch fails its requests, the server keeps serving
                    traceback.print_exc()
                    self._fail_all(err)
                else:
                    self._dispatch(events)

    def _fail_all(self, err: Exception) -> None:
        """Hand `err` to every in-flight request (their handlers answer 500) and abort them."""
        for request_id, (loop, outbox) in list(self._outboxes.items()):
            loop.call_soon_threadsafe(outbox.put_nowait, err)
            self.backend.abort(request_id)
        self._outboxes.clear()

    def _handle(self, kind: str, arg) -> None:
        if kind == "add":
            prompt, params, loop, events, added = arg
            try:
                request_id = self.backend.add_request(prompt, params)
            except ValueError as err:
                loop.call_soon_threadsafe(_settle, added, None, err)
                return
            self._outboxes[request_id] = (loop, events)
            loop.call_soon_threadsafe(_settle, added, request_id, None)
        elif kind == "abort":
            if self._outboxes.pop(arg, None) is not None:
                self.backend.abort(arg)

    def _dispatch(self, events) -> None:
        for event in events:
            target = self._outboxes.get(event.request_id)
            if target is None:
                continue
            loop, outbox = target
            loop.call_soon_threadsafe(outbox.put_nowait, event)
            if event.finish_reason is not None:
                del self._outboxes[event.request_id]


def _settle(future: asyncio.Future, result, error) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(result)
