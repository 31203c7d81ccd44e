"""Micro-batching for the recognition service: concurrent requests share one ``Recognizer.recognize`` call.

Requests decode their upload in a small thread pool and :meth:`MicroBatcher.submit` the decoded image;
one inference thread takes whatever is queued - up to ``max_batch`` images, waiting at most
``max_wait_ms`` after the oldest queued item arrived - and makes ONE ``recognize(images, k=max_k)``
call for the batch, then resolves each request's future with its own top-``k``. Under load the queue
is never empty when the thread comes back, so batches fill without waiting; when idle a lone request
waits at most ``max_wait_ms``.

Built against the :class:`~skulens.serving.recognize.Recognizer` API only (``recognize`` and
``maybe_reload``), so it works with whatever encoder/backend the recognizer runs.

* A request whose future is cancelled while still queued (its client timed out) is dropped, not run.
* A batch that raises is retried one image at a time, so a bad image fails only its own request.
* Hot reload runs on the inference thread between batches (and :meth:`MicroBatcher.exclusive` lets
  other callers, e.g. ``/health``, reload under the same lock), so a reload never overlaps a batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class BatcherClosed(RuntimeError):
    """The service is shutting down; no new work is accepted."""


@dataclass
class _Item:
    image: object
    k: int
    future: Future
    t_enqueued: float = field(default_factory=time.monotonic)


def _trim(res: dict, k: int, batch_size: int) -> dict:
    """One recognize() result cut down to the request's own ``k`` (the batch ran with the largest k)."""
    out = dict(res)
    out["topk"] = list(res.get("topk") or [])[:k]
    out["batch_size"] = batch_size
    return out


def settle(fut: Future, result=None, exc: BaseException | None = None) -> None:
    """Resolve ``fut`` unless it is already resolved or cancelled."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except InvalidStateError:  # already resolved or cancelled: nobody is waiting for it
        pass


class MicroBatcher:
    """Group concurrent recognitions into batches on one inference thread.

    ``get_recognizer``: returns the current recognizer (called once per batch). ``max_batch``: largest
    batch (1 = no batching, one image per call). ``max_wait_ms``: how long the oldest queued request may
    wait for others to join its batch. ``reload``: call ``recognizer.maybe_reload()`` before each batch.
    """

    def __init__(self, get_recognizer: Callable[[], object], max_batch: int = 32, max_wait_ms: float = 5.0,
                 reload: bool = True, name: str = "skulens-infer"):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        self.get_recognizer = get_recognizer
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.reload = reload
        self._name = name
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._run_lock = threading.RLock()  # held while a batch (or a reload) runs
        # statistics (under _cond)
        self._sizes: Counter = Counter()
        self._images = 0
        self._dropped = 0
        self._retried_batches = 0
        self._failed = 0
        self._busy_s = 0.0
        self._wait_s = 0.0  # summed over images: enqueued -> their batch starts
        self._max_queue = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._cond:
            if self._closed:
                raise BatcherClosed("batcher is closed")
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop accepting work, fail what is still queued, and let the thread finish its batch."""
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for it in left:
            settle(it.future, exc=BatcherClosed("the service is shutting down"))
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    # ------------------------------------------------------------------ producers
    def submit(self, image, k: int, future: Future | None = None) -> Future:
        """Queue one decoded image; the returned future resolves to its recognize() result (top ``k``)."""
        fut = future if future is not None else Future()
        with self._cond:
            if self._closed:
                raise BatcherClosed("the service is shutting down")
            if self._thread is None:
                self.start()
            self._queue.append(_Item(image, int(k), fut))
            self._max_queue = max(self._max_queue, len(self._queue))
            self._cond.notify()
        return fut

    @contextmanager
    def exclusive(self):
        """Hold off batches while the body runs (e.g. a reload triggered from another thread)."""
        with self._run_lock:
            yield

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict:
        with self._cond:
            sizes = dict(sorted(self._sizes.items()))
            batches = sum(sizes.values())
            return {
                "max_batch": self.max_batch, "max_wait_ms": round(self.max_wait_s * 1000, 3),
                "batches": batches, "images": self._images,
                "mean_batch": round(self._images / batches, 2) if batches else None,
                "batch_sizes": {str(s): n for s, n in sizes.items()},
                "queued": len(self._queue), "max_queued": self._max_queue,
                "dropped_cancelled": self._dropped, "retried_batches": self._retried_batches,
                "failed": self._failed, "busy_s": round(self._busy_s, 3),
                "mean_queue_wait_ms": round(1000 * self._wait_s / self._images, 2) if self._images else None,
                "mean_batch_ms": round(1000 * self._busy_s / batches, 2) if batches else None,
            }

    # ------------------------------------------------------------------ the inference thread
    def _take(self) -> list[_Item] | None:
        """Block for the next batch: the queued items up to max_batch, once full or the oldest waited enough."""
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                deadline = self._queue[0].t_enqueued + self.max_wait_s
                while len(self._queue) < self.max_batch and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._closed:
                    return None
                batch = []
                while self._queue and len(batch) < self.max_batch:
                    it = self._queue.popleft()
                    if it.future.set_running_or_notify_cancel():
                        batch.append(it)
                    else:
                        self._dropped += 1  # its client gave up while it was queued
                if batch:
                    return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException as e:  # noqa: BLE001 - never leave a request hanging, never kill the thread
                log.exception("inference batch failed")
                for it in batch:
                    settle(it.future, exc=e)

    def _run(self, batch: list[_Item]) -> None:
        waited = time.monotonic() * len(batch) - sum(it.t_enqueued for it in batch)
        with self._run_lock:
            t0 = time.perf_counter()
            rec = self.get_recognizer()
            if self.reload:
                rec.maybe_reload()  # between batches: a swap never overlaps a batch on this thread
            kmax = max(it.k for it in batch)
            retried = failed = 0
            try:
                results = rec.recognize([it.image for it in batch], k=kmax)
                if len(results) != len(batch):
                    raise RuntimeError(f"recognize returned {len(results)} results for {len(batch)} images")
                for it, res in zip(batch, results):
                    settle(it.future, _trim(res, it.k, len(batch)))
            except Exception as e:  # noqa: BLE001
                if len(batch) == 1:
                    failed = 1
                    settle(batch[0].future, exc=e)
                else:  # one bad image must not fail the others: retry each on its own
                    retried = 1
                    log.warning("batch of %d failed (%s: %s); retrying one by one", len(batch), type(e).__name__, e)
                    for it in batch:
                        try:
                            res = rec.recognize([it.image], k=it.k)[0]
                        except Exception as e1:  # noqa: BLE001
                            failed += 1
                            settle(it.future, exc=e1)
                        else:
                            settle(it.future, _trim(res, it.k, 1))
            busy = time.perf_counter() - t0
        with self._cond:
            self._sizes[len(batch)] += 1
            self._images += len(batch)
            self._retried_batches += retried
            self._failed += failed
            self._busy_s += busy
            self._wait_s += waited
