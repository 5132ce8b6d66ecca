"""Dynamic batching: many callers, one batched call.

A `Batcher` wraps a function whose positional arguments are arrays (numpy or
torch) with a leading batch dimension [B, ...] and which returns such an array
or a tuple of them. Callers pass ONE item (the arrays without the batch
dimension) and block until their own row of the batched result comes back:

    @batch_fn_with_options(minimum_batch_size=1, maximum_batch_size=16, timeout_ms=2)
    def policy(observation, reward):          # [B, *obs], [B]
        return logits, actions                # [B, A], [B]

    logits_row, action = policy(observation, reward)   # from any thread: [A], []

A caller with several items at hand can queue them together, as arrays with a
leading dimension k, with `submit_many` (one request for k rows; its result is
their k rows, [k, ...]); the sizes below count rows, however they arrived.

Names, knobs and defaults (1, 1024, 100 ms) follow the original scalable_agent's
dynamic_batching.py, and so do the rules of when a batch fires, read from its
batcher.cc. One background thread decides (nothing polls); once it is free for the
next batch (the batch is "requested"), it fires:
  - as soon as at least `minimum_batch_size` rows are waiting, taking up to
    `maximum_batch_size` of them;
  - below the minimum, at the end of a `timeout_ms` period counted from the
    request (periods follow each other while nothing waits): whatever is
    waiting, down to one row. `timeout_ms=None`: never; it waits for the minimum.
So with the defaults a lone caller is answered at once, and rows that arrive
while a batch computes go into the next one.

`fill=True` selects impala's other rule, which the actor host uses (its throughput
was measured with it, docs/dynamic_batching.md): a batch waits to fill up. It fires as soon
as `maximum_batch_size` rows wait, or once at least `minimum_batch_size` wait and
the oldest has waited `timeout_ms` since its call (None: only full batches fire);
fewer than the minimum never fire on their own.

With either rule, `flush()` fires what is waiting now, whatever its size.
Items are batched in arrival order, one batch computes at a time, and whatever
arrived meanwhile is batched next. An exception raised by the function is raised
in every caller of that batch (later batches still run); `close()` fails every
waiting and in-flight caller with `BatcherClosedError`.
"""

from __future__ import annotations

import collections
import functools
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from absl import logging

__all__ = ["Batcher", "BatcherClosedError", "Request", "batch_fn", "batch_fn_with_options"]


class BatcherClosedError(RuntimeError):
    """The batcher was closed before (or while) computing this caller's item."""


class Request:
    """One caller's item: its arguments, then its row of the result or an error.

    `result()` blocks until then; a callback given to `Batcher.submit` runs
    instead in the thread that completes the request (the batcher's thread, or
    the one calling `close()`), so it must be short and must not block."""

    __slots__ = ("args", "rows", "arrived", "_done", "_value", "_error", "_error_traceback", "_callback")

    def __init__(self, args: tuple, callback: Callable[[Request], None] | None, rows: int | None = None):
        self.args = args
        self.rows = rows  # None: one item; k: k items, as arrays [k, ...] (Batcher.submit_many)
        self.arrived = time.monotonic()
        self._done = threading.Lock()
        self._done.acquire()  # released once, when the result or error is set
        self._value: Any = None
        self._error: BaseException | None = None
        self._error_traceback = None
        self._callback = callback

    def done(self) -> bool:
        return not self._done.locked()

    def result(self, timeout: float | None = None) -> Any:
        """This caller's row (a tuple of rows if the function returns a tuple)."""
        if not self._done.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError("no result yet")
        self._done.release()
        if self._error is not None:
            # The same exception goes to every caller of a batch: restart its
            # traceback at the batched function, not at another caller's raise.
            raise self._error.with_traceback(self._error_traceback)
        return self._value

    def exception(self) -> BaseException | None:
        """The error of a completed request, or None (call after `done()`)."""
        return self._error

    def _complete(self, value: Any = None, error: BaseException | None = None) -> None:
        # Called once per request (the Batcher guarantees it), with its row or its error.
        self._value, self._error = value, error
        if error is not None:
            self._error_traceback = error.__traceback__
        self._done.release()
        if self._callback is not None:
            try:
                self._callback(self)
            except Exception:  # must not kill the batching thread, which serves everyone
                logging.exception("A dynamic batching callback failed.")


class Batcher:
    """Batches calls of `fn` from many threads; see the module docstring."""

    def __init__(
        self,
        fn: Callable[..., Any],
        minimum_batch_size: int = 1,
        maximum_batch_size: int = 1024,
        timeout_ms: float | None = 100,
        *,
        fill: bool = False,
    ):
        if not 1 <= minimum_batch_size <= maximum_batch_size:
            raise ValueError(
                f"need 1 <= minimum_batch_size ({minimum_batch_size}) <= maximum_batch_size ({maximum_batch_size})"
            )
        if timeout_ms is not None and timeout_ms < 0:
            raise ValueError(f"timeout_ms must be >= 0 or None, got {timeout_ms}")
        self.fn = fn
        self.minimum_batch_size = minimum_batch_size
        self.maximum_batch_size = maximum_batch_size
        self.timeout_ms = timeout_ms
        self.fill = fill  # impala's wait-to-fill rule instead of the original's (module docstring)
        self._timeout_s = None if timeout_ms is None else timeout_ms / 1000.0
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[Request] = collections.deque()
        self._queued_rows = 0  # rows of the requests in _queue
        self._in_flight: list[Request] = []
        self._flushing = 0  # items that fire without waiting for the minimum or the timeout
        self._closed = False
        self._thread: threading.Thread | None = None
        functools.update_wrapper(self, fn, updated=())

    @property
    def closed(self) -> bool:
        return self._closed

    def __call__(self, *item: Any) -> Any:
        """Computes `fn` on this item as one row of a batch; blocks for the row."""
        return self.submit(*item).result()

    def submit(self, *item: Any, callback: Callable[[Request], None] | None = None) -> Request:
        """Queues one item without blocking; the request completes later."""
        return self._enqueue(Request(item, callback), 1)

    def submit_many(self, *items: Any, callback: Callable[[Request], None] | None = None) -> Request:
        """Queues k items at once without blocking: argument by argument, arrays
        whose leading dimension k (1 <= k <= maximum_batch_size) runs over the
        items. They go into one batch, in order; the request's result is their k
        rows of the output ([k, ...], or a tuple of those)."""
        rows = len(items[0]) if items else 0
        if not 1 <= rows <= self.maximum_batch_size or any(len(column) != rows for column in items):
            raise ValueError(
                f"submit_many needs arrays of one leading size in [1, {self.maximum_batch_size}], "
                f"got sizes {[len(column) for column in items]}"
            )
        return self._enqueue(Request(items, callback, rows), rows)

    def _enqueue(self, request: Request, rows: int) -> Request:
        with self._cond:
            if self._closed:
                raise BatcherClosedError(f"batcher of {self._name()} is closed")
            if self._thread is None:  # started lazily, so decorating at import costs nothing
                self._thread = threading.Thread(target=self._loop, name=f"batcher-{self._name()}", daemon=True)
                self._thread.start()
            self._queue.append(request)
            before, self._queued_rows = self._queued_rows, self._queued_rows + rows
            # Wake the batching thread only when its decision can change: at the minimum,
            # at the maximum, and (original rule, with a timeout) at the first row, whose
            # period end it then sleeps until; otherwise it sleeps without a deadline.
            first = not before and not self.fill and self._timeout_s is not None
            if first or any(
                before < size <= self._queued_rows for size in (self.minimum_batch_size, self.maximum_batch_size)
            ):
                self._cond.notify()
        return request

    def flush(self) -> None:
        """Fires the items waiting now at once, in batches of at most the maximum,
        even below the minimum: for a caller that knows no more items will come
        until these are answered."""
        with self._cond:
            self._flushing = self._queued_rows
            if self._flushing:
                self._cond.notify()

    def close(self) -> None:
        """Fails every waiting and in-flight request with BatcherClosedError and
        refuses new ones. A batch being computed finishes; its rows are dropped."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            failed = list(self._queue) + self._in_flight
            self._queue.clear()
            self._queued_rows = 0
            self._in_flight = []
            self._cond.notify_all()
        error = BatcherClosedError(f"batcher of {self._name()} was closed")
        for request in failed:
            request._complete(error=error)

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _name(self) -> str:
        return getattr(self.fn, "__name__", type(self.fn).__name__)

    def _next_batch(self) -> list[Request] | None:
        """Waits until a batch should fire; None once closed."""
        with self._cond:
            requested = time.monotonic()  # the original's timeout periods count from here
            while not self._closed:
                waiting = self._queued_rows
                if waiting >= self.maximum_batch_size or (self._flushing and waiting):
                    break
                if not self.fill and waiting >= self.minimum_batch_size:
                    break
                deadline = self._deadline(requested) if waiting else None
                if deadline is None:
                    self._cond.wait()
                elif deadline <= time.monotonic():
                    break
                else:
                    self._cond.wait(deadline - time.monotonic())
            else:
                return None
            batch, size = [], 0
            while self._queue and size + _rows(self._queue[0]) <= self.maximum_batch_size:
                size += _rows(self._queue[0])
                batch.append(self._queue.popleft())
            self._queued_rows -= size
            self._flushing = max(0, self._flushing - size)
            self._in_flight = batch
            return batch

    def _deadline(self, requested: float) -> float | None:
        """When the rows waiting now fire by the timeout (some are waiting); None: not by it."""
        if self._timeout_s is None:
            return None
        oldest = self._queue[0].arrived
        if self.fill:  # at least the minimum, once the oldest has waited the timeout
            return oldest + self._timeout_s if self._queued_rows >= self.minimum_batch_size else None
        # The original (batcher.cc) waits in periods of timeout_ms from the request and,
        # at the end of a period, fires whatever waits: the first period end after the
        # oldest row arrived.
        if self._timeout_s == 0:
            return oldest
        periods = max(1, math.ceil((oldest - requested) / self._timeout_s))
        return requested + periods * self._timeout_s

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                rows = _split(self.fn(*_stack(batch)), batch)
                error = None
            except BaseException as e:  # goes to every caller of this batch (SystemExit too: the thread serves on)
                rows, error = None, e
            with self._cond:
                if self._in_flight is not batch:  # closed meanwhile: callers already failed
                    continue
                self._in_flight = []
            for j, request in enumerate(batch):
                request._complete(None if rows is None else rows[j], error)


def _rows(request: Request) -> int:
    return 1 if request.rows is None else request.rows


def _stack(batch: list[Request]) -> list[Any]:
    """Per argument position: the items stacked along a new leading axis (the
    arrays of submit_many's requests joined along theirs)."""
    first = batch[0].args
    for request in batch:
        if len(request.args) != len(first):
            raise TypeError(f"callers passed {len(first)} and {len(request.args)} arguments")
    if len(batch) == 1 and batch[0].rows is not None:  # already batched: the caller's own arrays
        return list(first)
    single = all(request.rows is None for request in batch)
    stacked = []
    for k, value in enumerate(first):
        if single:
            column = [request.args[k] for request in batch]
        else:  # a mix: single items become one-row arrays
            column = [request.args[k] if request.rows is not None else _one_row(request.args[k]) for request in batch]
        if isinstance(value, torch.Tensor):
            stacked.append(torch.stack(column) if single else torch.cat(column))
        else:
            stacked.append(np.stack(column) if single else np.concatenate(column))
    return stacked


def _one_row(value: Any) -> Any:
    return value[None] if isinstance(value, torch.Tensor) else np.asarray(value)[None]


def _split(output: Any, batch: list[Request]) -> list[Any]:
    """Each request's part of the function's output: row j for an item, rows
    [j, j + k) for submit_many's k items (tuples of those for a tuple output)."""
    size = sum(_rows(request) for request in batch)
    parts = output if isinstance(output, tuple) else (output,)
    for part in parts:
        length = part.shape[0] if getattr(part, "ndim", 0) > 0 else None
        if length != size:
            raise ValueError(
                f"the batched function returned shape {tuple(getattr(part, 'shape', ()))} "
                f"for a batch of {size}; outputs need a leading batch dimension"
            )
    results, j = [], 0
    for request in batch:
        rows = j if request.rows is None else slice(j, j + request.rows)
        results.append(tuple(part[rows] for part in parts) if isinstance(output, tuple) else output[rows])
        j += _rows(request)
    return results


def batch_fn_with_options(
    minimum_batch_size: int = 1, maximum_batch_size: int = 1024, timeout_ms: float | None = 100, *, fill: bool = False
) -> Callable[[Callable[..., Any]], Batcher]:
    """Decorator: turns a batched function into a per-item `Batcher`."""

    def decorate(fn: Callable[..., Any]) -> Batcher:
        return Batcher(fn, minimum_batch_size, maximum_batch_size, timeout_ms, fill=fill)

    return decorate


def batch_fn(fn: Callable[..., Any]) -> Batcher:
    """Decorator with the default options (1, 1024, 100 ms)."""
    return batch_fn_with_options()(fn)
