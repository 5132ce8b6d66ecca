"""Tests for impala.dynamic_batching: when batches fire (the original batcher.cc's
rules, and the wait-to-fill rule the actor host uses), which rows go where,
errors, shutdown, and that the batching thread sleeps while it waits."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from impala.dynamic_batching import Batcher, BatcherClosedError, batch_fn, batch_fn_with_options

WAIT_S = 30.0  # generous bound for results that must come; only a hang would reach it


class Recorder:
    """A batched function that records its batch sizes and can be held inside a
    call, so that a test decides exactly what is waiting when a batch fires."""

    def __init__(self):
        self.sizes: list[int] = []
        self.entered = threading.Semaphore(0)
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, x: np.ndarray, y: np.ndarray):
        self.sizes.append(len(x))
        self.entered.release()
        assert self.gate.wait(WAIT_S)
        return x * 2, x + y[:, None]  # [B, 3] each: row j depends only on item j

    def hold_next_call(self, batcher: Batcher, keys: list[int], results: dict | None = None) -> list[threading.Thread]:
        """Starts callers of these items, which make one batch that stays inside the
        function until `gate` is set."""
        self.gate.clear()
        threads = [_caller(batcher, _item(key), results, key) for key in keys]
        assert self.entered.acquire(timeout=WAIT_S)
        return threads


def _caller(batcher: Batcher, item, results: dict | None = None, key=None) -> threading.Thread:
    def run():
        try:
            value = batcher(*item)
        except Exception as e:  # recorded for the test to check
            value = e
        if results is not None:
            results[key] = value

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_queued(batcher: Batcher, count: int) -> None:
    """Waits until `count` items are queued (callers run in their own threads)."""
    deadline = time.monotonic() + WAIT_S
    while len(batcher._queue) < count:
        assert time.monotonic() < deadline, f"{len(batcher._queue)} of {count} callers queued"
        time.sleep(0.001)


def _item(i: int):
    return np.full(3, i, np.float32), np.float32(10 * i)


def _check_row(i: int, row) -> None:
    doubled, summed = row
    np.testing.assert_array_equal(doubled, np.full(3, 2 * i, np.float32))
    np.testing.assert_array_equal(summed, np.full(3, 11 * i, np.float32))


def test_64_concurrent_callers_each_get_their_own_row():
    fn = Recorder()
    batcher = Batcher(fn, minimum_batch_size=16, maximum_batch_size=16, timeout_ms=None)  # only full batches
    results: dict[int, object] = {}
    start = threading.Barrier(64)

    def call(i: int) -> None:
        start.wait()
        results[i] = batcher(*_item(i))

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert sorted(results) == list(range(64))
    for i, row in results.items():
        _check_row(i, row)
    assert fn.sizes == [16, 16, 16, 16]
    batcher.close()


def test_fill_batches_fire_at_the_maximum_and_stay_within_bounds():
    fn = Recorder()
    batcher = Batcher(fn, minimum_batch_size=2, maximum_batch_size=4, timeout_ms=10, fill=True)
    results: dict[int, object] = {}
    held = fn.hold_next_call(batcher, [100, 101], results)  # while it computes, 11 items queue up
    threads = [_caller(batcher, _item(i), results, i) for i in range(11)]
    _wait_queued(batcher, 11)
    fn.gate.set()
    for thread in [*held, *threads]:
        thread.join(WAIT_S)
    # In arrival order: full batches of the maximum, then the 3 left after the timeout.
    assert fn.sizes == [2, 4, 4, 3]
    for i in [100, 101, *range(11)]:
        _check_row(i, results[i])
    batcher.close()


def test_fill_timeout_fires_a_batch_between_minimum_and_maximum():
    fn = Recorder()
    batcher = Batcher(fn, minimum_batch_size=3, maximum_batch_size=8, timeout_ms=20, fill=True)
    first, second = batcher.submit(*_item(1)), batcher.submit(*_item(2))
    # Below the minimum nothing fires, however long it waits.
    with pytest.raises(TimeoutError):
        first.result(timeout=0.2)
    assert fn.sizes == []
    third = batcher.submit(*_item(3))
    for i, request in ((1, first), (2, second), (3, third)):
        _check_row(i, request.result(timeout=WAIT_S))
    assert fn.sizes == [3]  # fewer than the maximum: the timeout fired it
    batcher.close()


def test_a_batch_fires_as_soon_as_the_minimum_is_waiting():
    fn = Recorder()
    # A timeout far beyond WAIT_S: only the minimum can fire these in time.
    batcher = Batcher(fn, minimum_batch_size=3, maximum_batch_size=8, timeout_ms=600_000)
    first, second = batcher.submit(*_item(1)), batcher.submit(*_item(2))
    with pytest.raises(TimeoutError):
        first.result(timeout=0.2)  # below the minimum: waiting for the timeout
    third = batcher.submit(*_item(3))  # the minimum is waiting: it fires, below the maximum
    for i, request in ((1, first), (2, second), (3, third)):
        _check_row(i, request.result(timeout=WAIT_S))
    assert fn.sizes == [3]
    batcher.close()


def test_with_the_original_defaults_a_lone_caller_is_answered_without_the_timeout():
    fn = Recorder()
    batcher = Batcher(fn, timeout_ms=600_000)  # minimum 1, maximum 1024 as the original's defaults
    _check_row(7, batcher.submit(*_item(7)).result(timeout=WAIT_S))
    assert fn.sizes == [1]
    batcher.close()


def test_a_lone_caller_below_the_minimum_returns_after_the_timeout():
    fn = Recorder()
    batcher = Batcher(fn, minimum_batch_size=4, maximum_batch_size=8, timeout_ms=50)
    _check_row(5, batcher.submit(*_item(5)).result(timeout=WAIT_S))
    assert fn.sizes == [1]  # below the minimum: the timeout fired it
    # Without a timeout the original waits for the minimum.
    patient = Batcher(fn, minimum_batch_size=2, maximum_batch_size=8, timeout_ms=None)
    lone = patient.submit(*_item(6))
    with pytest.raises(TimeoutError):
        lone.result(timeout=0.2)
    other = patient.submit(*_item(8))
    _check_row(6, lone.result(timeout=WAIT_S))
    _check_row(8, other.result(timeout=WAIT_S))
    assert fn.sizes == [1, 2]
    batcher.close()
    patient.close()


def test_a_batch_takes_up_to_the_maximum_of_what_waits():
    fn = Recorder()
    batcher = Batcher(fn, minimum_batch_size=1, maximum_batch_size=4, timeout_ms=None)
    results: dict[int, object] = {}
    held = fn.hold_next_call(batcher, [100], results)  # fires alone; meanwhile 11 items queue up
    threads = [_caller(batcher, _item(i), results, i) for i in range(11)]
    _wait_queued(batcher, 11)
    fn.gate.set()
    for thread in [*held, *threads]:
        thread.join(WAIT_S)
    assert fn.sizes == [1, 4, 4, 3]
    for i in [100, *range(11)]:
        _check_row(i, results[i])
    batcher.close()


def _group(keys: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The items of these keys as submit_many takes them: argument by argument, stacked."""
    return np.stack([_item(k)[0] for k in keys]), np.array([_item(k)[1] for k in keys])


def test_submit_many_queues_several_items_as_rows_that_count_towards_the_batch():
    fn = Recorder()
    batcher = Batcher(fn, minimum_batch_size=1, maximum_batch_size=5, timeout_ms=0)
    held = fn.hold_next_call(batcher, [100])  # while it computes, the items below queue up
    keys = [[1, 2, 3], [4], [6, 7, 8, 9, 10]]
    groups = [batcher.submit_many(*_group(keys[0])), batcher.submit_many(*_group(keys[1]))]
    single = batcher.submit(*_item(5))  # a single item joins the groups' rows
    groups.append(batcher.submit_many(*_group(keys[2])))
    fn.gate.set()
    for thread in held:
        thread.join(WAIT_S)
    for group, request in zip(keys, groups):
        doubled, summed = request.result(timeout=WAIT_S)
        assert len(doubled) == len(summed) == len(group)
        for j, k in enumerate(group):
            _check_row(k, (doubled[j], summed[j]))
    _check_row(5, single.result(timeout=WAIT_S))
    # Rows count, not requests: 3 + 1 + 1 rows fill the maximum of 5; a group is never split.
    assert fn.sizes == [1, 5, 5]
    with pytest.raises(ValueError, match="submit_many"):
        batcher.submit_many(*_group(list(range(6))))  # above the maximum
    with pytest.raises(ValueError, match="submit_many"):
        batcher.submit_many(np.zeros((2, 3), np.float32), np.zeros(3, np.float32))  # sizes differ
    batcher.close()


def test_flush_fires_what_is_waiting_below_the_minimum():
    fn = Recorder()
    batcher = Batcher(fn, minimum_batch_size=4, maximum_batch_size=8, timeout_ms=None)
    requests = [batcher.submit(*_item(i)) for i in range(3)]
    with pytest.raises(TimeoutError):
        requests[0].result(timeout=0.1)
    batcher.flush()
    for i, request in enumerate(requests):
        _check_row(i, request.result(timeout=WAIT_S))
    later = [batcher.submit(*_item(i)) for i in range(3, 5)]  # the flush is over: the minimum holds again
    with pytest.raises(TimeoutError):
        later[0].result(timeout=0.1)
    assert fn.sizes == [3]
    batcher.close()


def test_exception_reaches_every_caller_of_the_batch_and_later_batches_still_run():
    def fail_on_negative(x):
        if (x < 0).any():
            raise ValueError("negative input")
        return x + 1

    batcher = Batcher(fail_on_negative, minimum_batch_size=4, maximum_batch_size=4, timeout_ms=None)
    bad = [batcher.submit(np.float32(v)) for v in (1, 2, -3, 4)]  # one batch of 4
    for request in bad:
        with pytest.raises(ValueError, match="negative input"):
            request.result(timeout=WAIT_S)
        assert isinstance(request.exception(), ValueError)
    good = [batcher.submit(np.float32(v)) for v in (5, 6, 7, 8)]
    assert [float(r.result(timeout=WAIT_S)) for r in good] == [6.0, 7.0, 8.0, 9.0]
    batcher.close()


def test_even_system_exit_in_the_function_reaches_its_callers_and_spares_the_thread():
    def exit_on_negative(x):
        if (x < 0).any():
            raise SystemExit("negative input")
        return x + 1

    batcher = Batcher(exit_on_negative, minimum_batch_size=2, maximum_batch_size=2, timeout_ms=None)
    bad = [batcher.submit(np.float32(v)) for v in (1, -2)]
    for request in bad:
        with pytest.raises(SystemExit, match="negative input"):
            request.result(timeout=WAIT_S)
    good = [batcher.submit(np.float32(v)) for v in (3, 4)]
    assert [float(r.result(timeout=WAIT_S)) for r in good] == [4.0, 5.0]
    batcher.close()


def test_outputs_without_a_batch_dimension_are_an_error_for_every_caller():
    batcher = Batcher(lambda x: x.sum(), minimum_batch_size=2, maximum_batch_size=2, timeout_ms=None)
    requests = [batcher.submit(np.ones(3)), batcher.submit(np.ones(3))]
    for request in requests:
        with pytest.raises(ValueError, match="leading batch dimension"):
            request.result(timeout=WAIT_S)
    batcher.close()


def test_close_wakes_every_waiter_and_refuses_new_items():
    fn = Recorder()
    batcher = Batcher(fn, minimum_batch_size=2, maximum_batch_size=2, timeout_ms=None)
    results: dict[int, object] = {}
    in_flight = fn.hold_next_call(batcher, [0, 1], results)  # a batch being computed...
    callers = [_caller(batcher, _item(i), results, i) for i in (2, 3, 4)]  # ...and callers waiting
    _wait_queued(batcher, 3)
    request = batcher.submit(*_item(5))
    batcher.close()
    for thread in [*in_flight, *callers]:  # woken, the first two while their batch computes
        thread.join(WAIT_S)
        assert not thread.is_alive()
    for i in range(5):
        assert isinstance(results[i], BatcherClosedError), results[i]
        assert "closed" in str(results[i])
    with pytest.raises(BatcherClosedError):
        request.result(timeout=WAIT_S)
    with pytest.raises(BatcherClosedError):
        batcher(*_item(6))
    fn.gate.set()  # the function returns; its rows go nowhere and nothing breaks
    batcher._thread.join(WAIT_S)
    assert not batcher._thread.is_alive()


def _thread_cpu_seconds(thread: threading.Thread) -> float:
    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("fill", [False, True])
def test_waiting_does_not_spin(fill):
    minimum = 2 if fill else 3  # two items stay below the original rule's minimum
    batcher = Batcher(lambda x: x, minimum_batch_size=minimum, maximum_batch_size=4, timeout_ms=60_000, fill=fill)
    first = batcher.submit(np.zeros(1))  # waits for more, until the deadline (original rule) or none (fill)
    time.sleep(0.05)
    before = _thread_cpu_seconds(batcher._thread)
    time.sleep(0.5)
    second = batcher.submit(np.zeros(1))  # waits for the (long) deadline
    time.sleep(0.5)
    used = _thread_cpu_seconds(batcher._thread) - before
    assert used < 0.1, f"the waiting batcher thread used {used:.2f}s of CPU in 1s"
    assert not first.done() and not second.done()
    batcher.close()


def test_decorators_torch_tensors_and_single_outputs():
    @batch_fn
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @batch_fn_with_options(minimum_batch_size=1, maximum_batch_size=3, timeout_ms=0)
    def scale(x: torch.Tensor, factor: torch.Tensor):
        return x * factor[:, None], factor

    assert isinstance(double, Batcher) and double.__name__ == "double"
    assert (double.minimum_batch_size, double.maximum_batch_size, double.timeout_ms) == (1, 1024, 100)
    row = double(torch.tensor([1.0, 2.0]))
    assert isinstance(row, torch.Tensor) and row.tolist() == [2.0, 4.0]
    scaled, factor = scale(torch.tensor([1.0, -1.0]), torch.tensor(3.0))
    assert scaled.tolist() == [3.0, -3.0] and factor.item() == 3.0
    double.close()
    scale.close()


@pytest.mark.parametrize("minimum,maximum,timeout", [(0, 4, 1), (5, 4, 1), (1, 4, -1)])
def test_bad_options(minimum, maximum, timeout):
    with pytest.raises(ValueError):
        Batcher(lambda x: x, minimum, maximum, timeout)
