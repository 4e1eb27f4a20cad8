"""The scheduler in its own thread, so that HTTP never blocks a step and a step never waits for HTTP.

Requests reach the thread through a queue; it submits them between steps and cancels those whose client asked
(a stop string, a disconnect). After every step each active request gets the tokens its row committed, in one
call into the asyncio loop that serves it; when the row retires, its statistics. A slow client only fills its own
queue.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field

from ..scheduler import BatchScheduler, Request
from ..state import GenerationStats


@dataclass
class TokenStream:
    """One request's tokens, from the engine thread to the asyncio loop: `put` (the HF streamer protocol, which the
    scheduler's rows call per committed token) collects them, `flush` hands them over once per step."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    pending: list[int] = field(default_factory=list)

    def put(self, tokens) -> None:
        self.pending.extend(tokens.tolist())

    def end(self) -> None:
        pass  # the loop sends the statistics with the result

    def flush(self) -> None:
        if self.pending:
            tokens, self.pending = self.pending, []
            self.loop.call_soon_threadsafe(self.events.put_nowait, ("tokens", tokens))

    def finish(self, stats: GenerationStats) -> None:
        self.flush()
        self.loop.call_soon_threadsafe(self.events.put_nowait, ("done", stats))


class EngineLoop:
    """Runs `scheduler` in a daemon thread until `stop()`. `submit` and `cancel` are safe from any thread."""

    def __init__(self, scheduler: BatchScheduler, max_queue: int) -> None:
        self.scheduler, self.max_queue = scheduler, max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[object, TokenStream] = {}
        self._stopping = threading.Event()
        self._queued = 0  # requests submitted and not yet finished
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="lookahead-engine", daemon=True)
        self.error: BaseException | None = None

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def running_rows(self) -> int:
        return self.scheduler.active

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(("wake", None))
        self.thread.join()

    def submit(self, request: Request, stream: TokenStream) -> bool:
        """Queue `request` (its tag unique); False when the queue is full."""
        with self._lock:
            if self._queued >= self.max_queue:
                return False
            self._queued += 1
        request.streamer = stream
        self._inbox.put(("submit", (request, stream)))
        return True

    def cancel(self, tag) -> None:
        self._inbox.put(("cancel", tag))

    def _take(self, block: bool) -> None:
        """Apply what arrived: submissions and cancellations (waiting for one when `block`)."""
        try:
            message = self._inbox.get(block=block)
        except queue.Empty:
            return
        while True:
            kind, payload = message
            if kind == "submit":
                request, stream = payload
                self._streams[request.tag] = stream
                try:
                    self.scheduler.submit(request)
                except ValueError as err:  # checked before, so only a race with the engine's limits gets here
                    self._finish(request.tag, None, err)
            elif kind == "cancel":
                result = self.scheduler.cancel(payload)
                if result is not None:  # it was still waiting
                    self._finish(result.tag, result.stats)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _finish(self, tag, stats: GenerationStats | None, error: Exception | None = None) -> None:
        stream = self._streams.pop(tag, None)
        with self._lock:
            self._queued -= 1
        if stream is not None:
            if error is not None:
                stream.loop.call_soon_threadsafe(stream.events.put_nowait, ("error", error))
            else:
                stream.finish(stats)

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._take(block=self.scheduler.idle)
                if self.scheduler.idle:
                    continue
                finished = self.scheduler.step()
                for stream in self._streams.values():
                    stream.flush()
                for result in finished:
                    self._finish(result.tag, result.stats)
        except BaseException as err:  # the engine is broken: every waiting request learns it
            self.error = err
            for tag in list(self._streams):
                self._finish(tag, None, RuntimeError(f"the engine stopped: {err}"))
