"""The learner's receiving room without sockets: batch assembly, the actor book
(counts, episodes, liveness) and the receiver's checks; and the parameter server's
answers."""

from __future__ import annotations

import logging as std_logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from impala import unroll, wire
from impala.metrics import Stopwatch
from impala.param_server import ParamServer
from impala.receiver import (
    ACTOR_SILENT_S,
    MAX_ABS_RETURN,
    MAX_ABS_VALUE,
    ActorBook,
    BatchAssembler,
    Episode,
    Limits,
    UnrollReceiver,
)
from impala.unroll import new_unroll, unroll_spec, validate

T = 5
OBS = (4, 84, 84)
A = 6
H = 8


def _spec(T=T, state_sizes=(H, H)):
    return unroll_spec(T, OBS, np.uint8, A, state_sizes)


# ---------------------------------------------------------------------------
# Batch assembly (moved here from unroll.Batcher).


def _marked(spec, num_envs, first_id):
    """An unroll whose env column j carries the id first_id + j in every array
    (plus 1000 * t at step t where the dtype allows, to catch time/env mix-ups)."""
    u = new_unroll(spec, num_envs)
    for name in spec:
        a = u[name]
        for j in range(num_envs):
            _column(a, spec[name][2], j)[...] = _mark(a.dtype, first_id + j, a.shape[0], spec[name][2], a.ndim)
    return u


def _column(a, time_major, j):
    return a[:, j] if time_major else a[j]


def _mark(dtype, env_id, steps, time_major, ndim):
    if dtype == np.bool_:
        return np.bool_(env_id % 2 == 1)
    if dtype == np.uint8:
        return np.uint8(env_id % 256)
    if not time_major:
        return env_id
    return (env_id + 1000 * np.arange(steps)).reshape((-1,) + (1,) * (ndim - 2))


def _env_ids(batch, spec):
    """The env ids of a batch's columns, checked to agree across all arrays."""
    ids = batch["reward"][0].astype(int).tolist()
    for name, (_, _, time_major) in spec.items():
        a = batch[name]
        for j, env_id in enumerate(ids):
            expected = _mark(a.dtype, env_id, a.shape[0], time_major, a.ndim)
            assert (_column(a, time_major, j) == expected).all(), (name, j)
    return ids


def test_batcher_splits_unrolls_into_exact_batches_in_order():
    spec = _spec(T=2)
    batcher = BatchAssembler(spec, batch_size=4)
    batches, next_id = [], 0
    counts = []
    for _ in range(4):  # 4 unrolls of 3 envs: 12 envs -> 3 batches of 4
        out = batcher.add(_marked(spec, 3, next_id))
        counts.append(len(out))
        batches += out
        next_id += 3
    assert counts == [0, 1, 1, 1]
    assert len(batches) == 3
    seen = []
    for batch in batches:
        assert validate(batch, spec) == 4
        seen += _env_ids(batch, spec)
    assert seen == list(range(12))  # each env exactly once, in arrival order
    assert batcher._pending_envs == 0 and batcher._pending == []  # nothing left, nothing dropped


def test_batcher_keeps_leftovers_and_handles_big_unrolls():
    spec = _spec(T=1)
    batcher = BatchAssembler(spec, batch_size=4)
    assert batcher.add(_marked(spec, 3, 0)) == []
    big = batcher.add(_marked(spec, 10, 3))  # 13 envs waiting -> 3 batches, 1 left
    assert len(big) == 3
    assert [_env_ids(b, spec) for b in big] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert batcher._pending_envs == 1
    last = batcher.add(_marked(spec, 3, 13))
    assert [_env_ids(b, spec) for b in last] == [[12, 13, 14, 15]]
    assert batcher._pending_envs == 0


def test_batches_do_not_alias_the_received_unrolls():
    spec = _spec(T=1)
    batcher = BatchAssembler(spec, batch_size=2)
    first = _marked(spec, 1, 0)
    (batch,) = batcher.add(first) + batcher.add(_marked(spec, 1, 1))
    first["reward"][...] = -1.0  # the receive buffer may be reused afterwards
    assert _env_ids(batch, spec) == [0, 1]


# ---------------------------------------------------------------------------
# The actor book.


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _episodes_unroll(spec, ends: dict[tuple[int, int], tuple[float, int]]) -> dict:
    """An unroll of 2 envs whose episodes end at (t, env) with (return, agent steps)."""
    u = new_unroll(spec, 2)
    for (t, env), (ret, steps) in ends.items():
        u["done"][t, env] = True
        u["episode_return"][t, env] = ret
        u["episode_step"][t, env] = steps
    return u


def test_book_counts_episodes_in_frames_actions_and_lags():
    spec = _spec(T=3, state_sizes=())
    book = ActorBook(num_actions=A, num_action_repeats=4, clock=Clock())
    u = _episodes_unroll(spec, {(0, 0): (9.0, 9), (2, 1): (5.0, 7), (3, 0): (-1.0, 2)})
    u["action"][:, 0] = [5, 1, 1, 2]  # step 0 repeats the previous unroll's last step
    u["action"][:, 1] = [5, 3, 3, 3]
    book.record(0, b"peer", "lvl", u, lag=2)
    book.record(1, b"other", "lvl", new_unroll(spec, 2), lag=None)
    report = book.take_report()
    # Step 0's episode end belongs to the previous unroll, so it is not counted twice.
    assert sorted(report.episodes) == [Episode("lvl", -1.0, 8), Episode("lvl", 5.0, 28)]
    assert report.lags == [2]
    assert report.action_counts.tolist() == [6, 2, 1, 3, 0, 0]  # six 0s: the second unroll
    empty = book.take_report()
    assert empty.episodes == [] and empty.lags == [] and empty.action_counts.sum() == 0


def test_book_decides_liveness_where_unrolls_arrive(caplog):
    spec = _spec(T=1, state_sizes=())
    clock = Clock()
    book = ActorBook(num_actions=A, num_action_repeats=1, clock=clock)
    arrays = new_unroll(spec, 1)
    caplog.set_level(std_logging.INFO, logger="absl")  # absl's own level may have been raised by earlier tests
    book.record(3, b"first", "lvl", arrays, None)
    clock.now += 10.0
    assert book.take_report().unroll_rates == {3: pytest.approx(0.1)}
    clock.now += ACTOR_SILENT_S + 1
    assert book.take_report().unroll_rates == {}  # gone
    assert "Actor 3 silent" in caplog.text
    book.record(3, b"first", "lvl", arrays, None)
    assert "Actor 3 is back" in caplog.text
    caplog.clear()
    book.record(3, b"restarted", "lvl", arrays, None)  # a new connection: a restarted actor
    assert "Actor 3 is back" in caplog.text and "restarted" in caplog.text
    caplog.clear()
    book.record(3, b"restarted", "lvl", arrays, None)
    assert "Actor 3" not in caplog.text  # nothing new to say
    clock.now += 1.0
    assert set(book.take_report().unroll_rates) == {3}


# ---------------------------------------------------------------------------
# The receiver.


def _receiver(spec, batch_size=2, version=7, limits=None):
    book = ActorBook(num_actions=A, num_action_repeats=1)
    watch = Stopwatch()
    receiver = UnrollReceiver(
        spec,
        batch_size,
        A,
        book,
        watch,
        default_level="CartPole-v1",
        run_id="run",
        param_version=lambda: version,
        max_queued_batches=4,
        limits=limits,
    )
    return receiver, book, watch


def _message(arrays, **meta) -> wire.Message:
    return wire.decode(wire.encode("unroll", arrays, task=1, param_version=5, meta=meta))


def test_actor_time_reports_are_summed_and_foreign_values_ignored():
    """The 'seconds' an actor sends with an unroll feed the learner's time/actor_*
    metrics; unknown parts and values that are not plausible seconds are dropped."""
    spec = _spec(T=2, state_sizes=())
    receiver, _, watch = _receiver(spec)
    arrays = new_unroll(spec, 2)
    for seconds in (
        {"env": 0.25, "inference": 0.5},
        {"env": 0.25, "send": "slow", "params": -1.0},
        {"inference": float("nan"), "act": float("inf"), "evil": 3.0},
        "not a map",
    ):
        receiver.receive(b"peer", _message(arrays, level="CartPole-v1", seconds=seconds))
    times = watch.take()
    assert {k: v for k, v in times.items() if k.startswith("actor_")} == {"actor_env": 0.5, "actor_inference": 0.5}


def test_receiver_queues_batches_and_books_lags_of_this_run_only():
    spec = _spec(T=2, state_sizes=())
    receiver, book, _ = _receiver(spec, batch_size=3)
    receiver.receive(b"p", _message(new_unroll(spec, 2), run="run", level="CartPole-v1"))
    assert receiver.next_batch(timeout=0) is None
    receiver.receive(b"p", _message(new_unroll(spec, 2), run="an earlier learner"))
    batch = receiver.next_batch(timeout=0)
    assert batch["reward"].shape == (3, 3)
    assert book.take_report().lags == [7 - 5]


@pytest.mark.parametrize("action", [-1, A])
def test_receiver_refuses_actions_out_of_range(action):
    spec = _spec(T=2, state_sizes=())
    receiver, book, _ = _receiver(spec)
    arrays = new_unroll(spec, 2)
    arrays["action"][1, 1] = action
    with pytest.raises(unroll.UnrollError, match="actions outside"):
        receiver.receive(b"p", _message(arrays))
    assert not book.known(1) and receiver.next_batch(timeout=0) is None


def test_receiver_drops_an_unroll_wider_than_the_limit_whole():
    spec = _spec(T=2, state_sizes=())
    receiver, book, _ = _receiver(spec, limits=Limits(A, ("CartPole-v1",), max_envs=4, max_actors=8))
    with pytest.raises(unroll.UnrollError, match="5 environments"):
        receiver.receive(b"p", _message(new_unroll(spec, 5)))
    assert not book.known(1) and receiver.next_batch(timeout=0) is None
    receiver.receive(b"p", _message(new_unroll(spec, 4)))
    assert receiver.next_batch(timeout=0)["reward"].shape == (3, 2)


# Property: corrupt one value of a valid unroll (or one field of its header); the
# receiver either accepts it (the value is valid, by the rules written out again
# here) and queues its batch, or refuses it with UnrollError and books nothing.
VOCABULARY, LEVELS, MAX_ACTORS, VERSION = 11, ("lvl_a", "lvl_b"), 8, 7
PROPERTY_SPEC = unroll_spec(2, (3,), np.float32, A, (H, H), instruction_length=4)
BOUNDS = {
    "reward": MAX_ABS_VALUE,
    "policy_logits": MAX_ABS_VALUE,
    "core_state_0": MAX_ABS_VALUE,
    "core_state_1": MAX_ABS_VALUE,
    "episode_return": MAX_ABS_RETURN,
    "observation": np.inf,
}


def _valid_value(name: str, value) -> bool:
    if name in BOUNDS:
        return bool(np.isfinite(value) and abs(value) <= BOUNDS[name])
    return {
        "action": 0 <= value < A,
        "episode_step": value >= 0,
        "instruction": 0 <= value < VOCABULARY,
        "done": value in (0, 1),
    }[name]


def _receive(arrays, **header) -> tuple[bool, UnrollReceiver, ActorBook]:
    receiver, book, _ = _receiver(
        PROPERTY_SPEC,
        batch_size=2,
        version=VERSION,
        limits=Limits(A, LEVELS, max_envs=2, max_actors=MAX_ACTORS, vocabulary=VOCABULARY),
    )
    header = {"task": 1, "param_version": 3, "meta": {"level": "lvl_b", "run": "run"}, **header}
    message = wire.decode(wire.encode("unroll", arrays, **header))
    try:
        receiver.receive(b"p", message)
        accepted = True
    except unroll.UnrollError:
        accepted = False
    batch = receiver.next_batch(timeout=0)
    assert (batch is not None) == accepted and book.known(header["task"]) == accepted
    return accepted, receiver, book


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_one_corrupted_value_is_accepted_only_when_valid(data):
    arrays = new_unroll(PROPERTY_SPEC, 2)
    name = data.draw(st.sampled_from(sorted(PROPERTY_SPEC)))
    array = arrays[name]
    index = data.draw(st.tuples(*[st.integers(0, n - 1) for n in array.shape]))
    if array.dtype == np.bool_:  # any byte: numpy reads any byte as a bool
        value = data.draw(st.integers(0, 255))
        array.view(np.uint8)[index] = value
    elif array.dtype.kind == "f":
        value = data.draw(st.floats(width=32) | st.sampled_from([1e6, 1.0001e6, 1e9, 1.0001e9, -1e6, -1.0001e9]))
        array[index] = value
        value = float(array[index])
    else:
        info = np.iinfo(array.dtype)
        value = data.draw(st.integers(info.min, info.max) | st.integers(-2, VOCABULARY + 1))
        array[index] = value
    accepted, _, _ = _receive(arrays)
    assert accepted == _valid_value(name, value), (name, index, value)


@settings(max_examples=100, deadline=None)
@given(field=st.sampled_from(["task", "param_version", "level", "seconds"]), data=st.data())
def test_one_corrupted_header_field_is_accepted_only_when_valid(field, data):
    arrays = new_unroll(PROPERTY_SPEC, 2)
    if field == "level":
        level = data.draw(
            st.text(max_size=300) | st.sampled_from(LEVELS) | st.integers(-(2**63), 2**64 - 1) | st.none()
        )
        accepted, _, _ = _receive(arrays, meta={"level": level, "run": "run"})
        assert accepted == (level in LEVELS)
    elif field == "seconds":
        seconds = data.draw(
            st.dictionaries(
                st.sampled_from(["env", "act", "evil"]),
                st.floats() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=3),
            )
        )
        accepted, receiver, _ = _receive(arrays, meta={"level": "lvl_a", "run": "run", "seconds": seconds})
        assert accepted  # a time report only feeds metrics: implausible values are ignored, not fatal
        for part, total in receiver.watch.take().items():
            assert not part.startswith("actor_") or 0 <= total <= ACTOR_SILENT_S + 60
    else:
        value = data.draw(st.integers(0, 2**64 - 1))
        accepted, _, _ = _receive(arrays, **{field: value})
        assert accepted == (value < MAX_ACTORS if field == "task" else value <= VERSION)


# ---------------------------------------------------------------------------
# The parameter server.


def test_param_server_answers_by_version_and_run():
    server = ParamServer(run_id="now")
    server.publish({"w": torch.ones(3)}, 4)

    def ask(version, run="now"):
        return wire.decode(server.reply(wire.decode(wire.encode("get_params", meta={"version": version, "run": run}))))

    fresh = ask(3)
    assert fresh.kind == "params" and fresh.param_version == 4 and fresh.arrays["w"].tolist() == [1, 1, 1]
    assert ask(4).kind == "params_unchanged"
    assert ask(9, run="before a restart").kind == "params"  # versions of another run do not compare
    with pytest.raises(wire.WireError):
        server.reply(wire.decode(wire.encode("get_params", meta={"version": "4"})))


def test_param_server_sends_a_peer_full_parameters_at_most_once_per_interval():
    clock = type("Clock", (), {"now": 0.0, "__call__": lambda self: self.now})()
    server = ParamServer(run_id="now", min_interval_s=0.05, clock=clock)
    server.publish({"w": torch.ones(3)}, 4)

    def ask(peer):
        return wire.decode(
            server.reply(wire.decode(wire.encode("get_params", meta={"version": -1, "run": None})), peer)
        ).kind

    assert ask(b"a") == "params"
    assert ask(b"a") == "params_unchanged"  # asked again at once
    assert ask(b"b") == "params"  # another peer is not held back
    clock.now = 0.06
    assert ask(b"a") == "params"
