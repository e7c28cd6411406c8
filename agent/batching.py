"""Adaptive batching: a bounded queue per model in front of a Runner, by composition.

Two knobs, from the manifest or the device's override: `max_batch_size` and
`max_queue_delay_ms`. A batch leaves when it is full, when its oldest request
has waited the window, or at once when every engine instance is idle (waiting
then only adds latency: at low load there is nobody to wait for, and under
load the queue fills while the engines work). Results are split back per
request; a failed batch delivers its reason to every request in it.

A model fast enough to run on the event loop (`Runner.runs_inline`) skips the
queue whenever its engine is idle, and a batch of it that did queue runs in the
dispatcher itself, not in a new task, so the engine is idle again at once: on a
small model the queue's future, timer and task switches cost more than the engine.

The queue is bounded: past `max_queue` waiting requests, `submit` raises
Overloaded at once (503 + Retry-After). A request whose deadline passes, or
whose caller goes away (task cancelled: a closed connection), is dropped from
the queue and never reaches the engine.

Per queued request the queue costs a future and a heap entry: one timer serves every
deadline (armed for the earliest; most requests share the default timeout, so it is armed
about once per timeout), and the dispatcher is woken by a future of its own only when it
waits for what just arrived (a first request, or enough items to fill a batch), never per
request it would not act on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import AgentError, DeadlineExceeded, InferenceFailed, Overloaded, ValidationError
from .runner import Runner


@dataclass(slots=True)
class BatchResult:
    outputs: dict[str, np.ndarray]
    queue_s: float
    compute_s: float
    batch_size: int


class _Pending:
    """One queued request. Its deadline entry outlives it on the heap, so `feeds` is dropped once it answers."""

    __slots__ = ("deadline", "enqueued", "feeds", "future", "items", "key", "queued")

    def __init__(self, feeds: dict[str, np.ndarray], items: int, key: tuple[object, ...] | None, deadline: float,
                 future: asyncio.Future[BatchResult]) -> None:
        self.feeds = feeds
        self.items = items
        #: requests merge only with the same key (dtypes and non-batch dims); None never merges
        self.key = key
        self.deadline = deadline
        self.future = future
        self.enqueued = time.monotonic()
        #: in the queue: False once taken into a batch or dropped from it
        self.queued = True


_NO_FEEDS: dict[str, np.ndarray] = {}
#: the loop's timers fire on a millisecond clock: a deadline this close is due (as one timer per request was)
_TIMER_SLACK_S = 0.001


BatchObserver = Callable[[int], None]


class AdaptiveBatcher:
    def __init__(self, runner: Runner, *, max_batch_size: int, max_queue_delay_ms: float, max_queue: int,
                 batchable: bool, max_request_items: int | None = None,
                 on_batch: BatchObserver | None = None) -> None:
        self.runner = runner
        self.model = runner.model
        self.max_batch_size = max(1, max_batch_size) if batchable else 1
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.max_queue = max_queue
        self.batchable = batchable and self.max_batch_size > 1
        self.max_request_items = max_request_items or 8 * self.max_batch_size
        self._on_batch = on_batch
        self._queue: collections.deque[_Pending] = collections.deque()
        #: (deadline, tie-break, request) of every request in _enqueue (and some answered ones, until
        #: compacted): one timer, armed for the earliest, expires them all
        self._deadlines: list[tuple[float, int, _Pending]] = []
        self._order = itertools.count()
        self._waiting = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        #: set while the dispatcher sleeps: resolved once `_need` more items have been queued
        self._waiter: asyncio.Future[None] | None = None
        self._need = 0
        self._slots: asyncio.Semaphore | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._busy = 0
        self._closed = False

    # ------------------------------------------------------------------ public

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def busy_instances(self) -> int:
        return self._busy

    async def submit(self, feeds: dict[str, np.ndarray], deadline: float) -> BatchResult:
        """Queue one validated request and wait for its share of a batch."""
        if self._closed:
            raise InferenceFailed(f"model {self.model!r} is unloaded")
        items = next(iter(feeds.values())).shape[0] if self.batchable else 1
        if items > self.max_batch_size:
            return await self._submit_split(feeds, items, deadline)
        if self._busy == 0 and not self._queue and self.runner.runs_inline:
            return self._run_now(feeds, items)
        return await self._enqueue(feeds, items, deadline)

    async def close(self) -> None:
        """Stop the dispatcher; queued requests fail, running batches finish."""
        self._closed = True
        self._disarm()
        while self._queue:
            p = self._queue.popleft()
            p.queued = False
            if not p.future.done():
                p.future.set_exception(InferenceFailed(f"model {self.model!r} is unloading"))
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    # ------------------------------------------------------------------ submit side

    async def _submit_split(self, feeds: dict[str, np.ndarray], items: int, deadline: float) -> BatchResult:
        if items > self.max_request_items:
            name = next(iter(feeds))
            raise ValidationError(name, f"batch of {items} is over the {self.max_request_items} items a request "
                                        f"may carry (engine batches hold {self.max_batch_size})")
        step = self.max_batch_size
        parts = [{k: v[i:i + step] for k, v in feeds.items()} for i in range(0, items, step)]
        if len(self._queue) + len(parts) > self.max_queue:
            raise self._overloaded(len(parts))
        tasks = [asyncio.ensure_future(self._enqueue(p, next(iter(p.values())).shape[0], deadline)) for p in parts]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        outputs = {k: np.concatenate([r.outputs[k] for r in results]) for k in results[0].outputs}
        return BatchResult(outputs, max(r.queue_s for r in results), sum(r.compute_s for r in results),
                           max(r.batch_size for r in results))

    async def _enqueue(self, feeds: dict[str, np.ndarray], items: int, deadline: float) -> BatchResult:
        if len(self._queue) >= self.max_queue:
            raise self._overloaded(1)
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._start(loop)
        key = tuple([(k, v.dtype.str, v.shape[1:]) for k, v in feeds.items()]) if self.batchable else None
        p = _Pending(feeds, items, key, deadline, loop.create_future())
        self._queue.append(p)
        heapq.heappush(self._deadlines, (deadline, next(self._order), p))
        self._waiting += 1
        if deadline < self._timer_at:
            self._arm(loop, deadline)
        if self._waiter is not None:
            self._need -= items
            if self._need <= 0:
                self._wake()
        try:
            return await p.future
        finally:
            self._waiting -= 1
            p.feeds = _NO_FEEDS  # a batch that took it has merged its feeds already (see _dispatch_forever)
            if p.queued:  # cancelled while queued (the caller went away): it never reaches the engine
                p.queued = False
                with contextlib.suppress(ValueError):
                    self._queue.remove(p)
            if len(self._deadlines) > 2 * self._waiting + 32:
                self._compact()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, math.inf

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        self._disarm()
        self._timer_at = at
        # a delay, not loop.call_at: loop clocks differ from time.monotonic (uvloop)
        self._timer = loop.call_later(max(0.0, at - time.monotonic()), self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer, self._timer_at = None, math.inf
        heap = self._deadlines
        due = time.monotonic() + _TIMER_SLACK_S
        while heap:
            deadline, _, p = heap[0]
            if not p.future.done():
                if deadline > due:
                    break
                self._expire(p)
            heapq.heappop(heap)
        if heap and self._loop is not None:
            self._arm(self._loop, heap[0][0])

    def _compact(self) -> None:
        """Drop answered requests' deadline entries (amortised: the heap stays under ~2x the waiting ones)."""
        live = [e for e in self._deadlines if not e[2].future.done()]
        heapq.heapify(live)
        self._deadlines = live

    def _expire(self, p: _Pending) -> None:
        if not p.future.done():
            p.future.set_exception(DeadlineExceeded(self.model, where="queued" if p.queued else "computing"))
        if p.queued:
            p.queued = False
            with contextlib.suppress(ValueError):
                self._queue.remove(p)

    def _overloaded(self, wanted: int) -> Overloaded:
        per_batch = self.runner.mean_compute_s or 0.01
        batches = math.ceil((len(self._queue) + wanted) / self.max_batch_size) / self.runner.instances
        return Overloaded(self.model, len(self._queue), self.max_queue, max(1.0, math.ceil(batches * per_batch)))

    # ------------------------------------------------------------------ dispatch side

    def _run_now(self, feeds: dict[str, np.ndarray], items: int) -> BatchResult:
        """Idle engine, empty queue, tiny model: run on the spot (a queue and a task switch cost more)."""
        try:
            result = self.runner.run_inline(feeds)
        except Exception as e:
            raise _batch_error(self.model, e, 1) from e
        if self._on_batch is not None:
            self._on_batch(items)
        return BatchResult(result.outputs, 0.0, result.compute_s, items)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the running loop (again, if the data plane moved to a new one)."""
        self._loop = loop
        self._busy = 0
        self._waiter = None
        self._disarm()
        self._compact()
        self._slots = asyncio.Semaphore(self.runner.instances)
        self._worker = loop.create_task(self._dispatch_forever(), name=f"batcher-{self.model}")

    async def _dispatch_forever(self) -> None:
        assert self._slots is not None
        while True:
            await self._slots.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            self._busy += 1
            try:  # now, with no await since _take: a request that answers from here on may drop its feeds
                feeds = batch[0].feeds if len(batch) == 1 else {
                    k: np.concatenate([p.feeds[k] for p in batch]) for k in batch[0].feeds}
            except Exception as e:
                self._fail(batch, e)
                self._busy -= 1
                self._slots.release()
                continue
            if self.runner.runs_inline:  # it never suspends: no task, and the engine is idle again at once
                await self._run(batch, feeds)
                # then let the loop breathe: without this a queue of inline batches runs back to back and
                # health probes, other connections and timers wait for all of them, not for one
                await asyncio.sleep(0)
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch, feeds))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _collect(self) -> list[_Pending]:
        while True:
            while not self._queue:
                await self._sleep(1, None)
            if self.batchable and self._busy > 0 and self.max_queue_delay_s > 0:
                await self._wait_for_companions()
            batch = self._take()
            if batch:
                return batch

    async def _wait_for_companions(self) -> None:
        while self._queue:
            first = self._queue[0]
            remaining = first.enqueued + self.max_queue_delay_s - time.monotonic()
            queued = sum(p.items for p in self._queue)
            if remaining <= 0 or queued >= self.max_batch_size:
                return
            await self._sleep(self.max_batch_size - queued, remaining)

    async def _sleep(self, need: int, timeout_s: float | None) -> None:
        """Until `need` more items are queued (or `timeout_s` passes)."""
        assert self._loop is not None
        waiter = self._waiter = self._loop.create_future()
        self._need = need
        timer = None if timeout_s is None else self._loop.call_later(timeout_s, self._wake)
        try:
            await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _take(self) -> list[_Pending]:
        """Pop the oldest live request and every compatible one behind it, up to max_batch_size items."""
        batch: list[_Pending] = []
        kept: list[_Pending] = []
        total = 0
        now = time.monotonic()
        while self._queue:
            p = self._queue.popleft()
            p.queued = False
            if p.future.done():
                continue
            if p.deadline <= now:
                p.future.set_exception(DeadlineExceeded(self.model, where="queued"))
                continue
            if not batch:
                batch.append(p)
                total = p.items
                if p.key is None:
                    break
            elif p.key == batch[0].key and total + p.items <= self.max_batch_size:
                batch.append(p)
                total += p.items
            else:
                p.queued = True
                kept.append(p)
            if total >= self.max_batch_size:
                break
        self._queue.extendleft(reversed(kept))
        return batch

    async def _run(self, batch: list[_Pending], feeds: dict[str, np.ndarray]) -> None:
        assert self._slots is not None
        started = time.monotonic()
        try:
            result = await self.runner.run(feeds)
            total = sum(p.items for p in batch)
            if self._on_batch is not None:
                self._on_batch(total)
            self._deliver(batch, result.outputs, total, started, result.compute_s)
        except Exception as e:
            self._fail(batch, e)
        finally:
            self._busy -= 1
            self._slots.release()

    def _fail(self, batch: list[_Pending], e: Exception) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(_batch_error(self.model, e, len(batch)))

    def _deliver(self, batch: list[_Pending], outputs: dict[str, np.ndarray], total: int, started: float,
                 compute_s: float) -> None:
        if len(batch) == 1:
            p = batch[0]
            if not p.future.done():
                p.future.set_result(BatchResult(outputs, started - p.enqueued, compute_s, total))
            return
        for name, arr in outputs.items():
            if arr.ndim == 0 or arr.shape[0] != total:
                raise InferenceFailed(f"model {self.model!r}: output {name!r} has leading dimension "
                                      f"{arr.shape[0] if arr.ndim else 'none'} for a batch of {total}")
        offset = 0
        for p in batch:
            part = {k: v[offset:offset + p.items] for k, v in outputs.items()}
            offset += p.items
            if not p.future.done():
                p.future.set_result(BatchResult(part, started - p.enqueued, compute_s, total))


def _batch_error(model: str, e: Exception, size: int) -> AgentError:
    """A fresh error per waiter (exceptions carry tracebacks; sharing one object mixes them)."""
    if isinstance(e, AgentError) and not isinstance(e, InferenceFailed):
        err: AgentError = type(e).__new__(type(e))
        err.__dict__.update(e.__dict__)
        err.args = e.args
        return err
    reason = e.message if isinstance(e, AgentError) else f"{type(e).__name__}: {e}"
    which = f"batch of {size} requests failed" if size > 1 else "inference failed"
    return InferenceFailed(f"model {model!r}: {which}: {reason}")
