"""Experience replay (impala/replay.py, --replay_proportion): the ring of env-columns on
the learner's reused batch buffers, the replay schedule, a real Learner with a real
actor against learn_step called by hand, the real program, two data-parallel ranks, and
the flags' one-line errors."""

from __future__ import annotations

import copy
import subprocess

import numpy as np
import pytest
import torch

from impala import checkpoint, learner, replay, unroll
from impala.config import Config
from impala.learner import entropy_cost_at, learn_step, learning_rate_at, state_sizes
from impala.metrics import read_jsonl
from impala.optim import make_optimizer
from impala.receiver import BatchBuffers
from tests import cli
from tests import test_data_parallel as dp
from tests.test_learner import _run_with_actor

T, OBS, A, H = 4, (3,), 2, 5


def _spec(state: bool = True) -> dict:
    return unroll.unroll_spec(T, OBS, np.float32, A, (H, H) if state else ())


def _fill(batch: dict[str, torch.Tensor], ids: list[int]) -> dict[str, torch.Tensor]:
    """Writes column j's id into every field of column j (the time steps too), so a
    sampled column shows whether its fields stayed together."""
    for j, v in enumerate(ids):
        batch["observation"][:, j] = v
        batch["reward"][:, j] = v
        batch["done"][:, j] = v % 2 == 1
        batch["episode_return"][:, j] = 10 * v
        batch["episode_step"][:, j] = v
        batch["action"][:, j] = v
        batch["policy_logits"][:, j] = -v
        batch["core_state_0"][j] = v
        batch["core_state_1"][j] = 100 + v
    return batch


def _ids(batch: dict[str, torch.Tensor]) -> list[int]:
    """The columns' ids, after checking that each column is one whole stored column."""
    ids = [int(v) for v in batch["action"][0]]
    for j, v in enumerate(ids):
        assert (batch["observation"][:, j] == v).all() and (batch["reward"][:, j] == v).all()
        assert (batch["done"][:, j] == (v % 2 == 1)).all()
        assert (batch["episode_return"][:, j] == 10 * v).all() and (batch["episode_step"][:, j] == v).all()
        assert (batch["action"][:, j] == v).all() and (batch["policy_logits"][:, j] == -v).all()
        assert batch["core_state_0"][j].eq(v).all() and batch["core_state_1"][j].eq(100 + v).all()
    return ids


def test_stored_columns_survive_the_reuse_of_the_batch_buffers():
    """The learner's batches live in BatchBuffers sets that go back to the receiver and
    are written again: the buffer must hold copies, of every field."""
    spec = _spec()
    buffers = BatchBuffers(spec, 3)
    buffer = replay.ReplayBuffer(spec, 10)
    first = _fill(buffers.take(), [0, 1, 2])
    buffer.add(first)
    buffers.give_back(first)
    again = buffers.take()
    assert again is first  # the same memory, as the receiver reuses it
    _fill(again, [7, 8, 9])  # overwritten in place: the stored columns must not change
    sample = buffer.sample(3, replay.generator(1, 0))
    assert set(sample) == set(spec)
    assert sorted(_ids(sample)) == [0, 1, 2]
    assert sample["observation"].shape == (T + 1, 3, *OBS) and sample["core_state_0"].shape == (3, H)
    assert all(sample[name].dtype == first[name].dtype for name in spec)


def test_the_ring_keeps_the_newest_columns():
    spec = _spec()
    buffer = replay.ReplayBuffer(spec, 5)
    for start in (0, 3, 6):  # 9 columns into 5 slots: the first add fills 0-2, the third wraps
        buffer.add(_fill(BatchBuffers(spec, 3).take(), [start, start + 1, start + 2]))
    assert len(buffer) == 5
    assert sorted(_ids(buffer.sample(5, replay.generator(1, 0)))) == [4, 5, 6, 7, 8]
    wide = replay.ReplayBuffer(spec, 2)  # a batch wider than the ring: its last columns
    wide.add(_fill(BatchBuffers(spec, 3).take(), [0, 1, 2]))
    assert sorted(_ids(wide.sample(2, replay.generator(1, 0)))) == [1, 2]


def test_samples_are_whole_distinct_stored_columns_uniformly_and_reproducibly():
    spec = _spec()
    buffer, twin = replay.ReplayBuffer(spec, 8), replay.ReplayBuffer(spec, 8)
    for start in (0, 4, 8):
        batch = _fill(BatchBuffers(spec, 4).take(), list(range(start, start + 4)))
        buffer.add(batch)
        twin.add(batch)
    stored = set(range(4, 12))
    g, g_twin, g_other = replay.generator(3, 0), replay.generator(3, 0), replay.generator(3, 1)
    seen, samples, others = [], [], []
    for _ in range(300):
        ids = _ids(buffer.sample(3, g))
        assert len(set(ids)) == 3 and set(ids) <= stored  # no duplicates, only what is stored
        seen += ids
        samples.append(ids)
        assert _ids(twin.sample(3, g_twin)) == ids  # the same seed and rank: the same batches
        others.append(_ids(twin.sample(3, g_other)))
    assert others != samples  # another rank draws another stream
    counts = np.bincount(seen, minlength=12)[4:]
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean(), counts  # ~112 each
    with pytest.raises(ValueError, match="cannot sample 9"):
        buffer.sample(9, g)


def test_a_buffer_without_core_states_and_a_foreign_batch():
    spec = _spec(state=False)
    buffer = replay.ReplayBuffer(spec, 4)
    batch = BatchBuffers(spec, 2).take()
    batch["action"][:] = torch.tensor([3, 4])
    buffer.add(batch)
    assert sorted(buffer.sample(2, replay.generator(1, 0))["action"][0].tolist()) == [3, 4]
    with pytest.raises(ValueError, match="not the replay buffer's"):
        buffer.add(BatchBuffers(_spec(), 2).take())


def test_a_saved_buffer_comes_back_as_it_was(tmp_path):
    """state_dict through the file the learner writes (checkpoint.save_replay, a real
    torch file read with weights_only) into a new buffer: the same columns in the same
    slots, so the same stream draws the same batches and the next add evicts the same
    column; before any add the state is empty and loads as empty."""
    spec = _spec()
    buffer = replay.ReplayBuffer(spec, 5)
    empty = replay.ReplayBuffer(spec, 5)
    empty.load_state_dict(buffer.state_dict(), torch.device("cpu"))
    assert len(empty) == 0
    for start in (0, 3):  # 6 columns into 5 slots: the ring has wrapped once
        buffer.add(_fill(BatchBuffers(spec, 3).take(), [start, start + 1, start + 2]))
    checkpoint.save_replay(tmp_path, 0, {"buffer": buffer.state_dict()})
    restored = replay.ReplayBuffer(spec, 5)
    restored.load_state_dict(checkpoint.load_replay(tmp_path, 0)["buffer"], torch.device("cpu"))
    assert len(restored) == 5
    g, g_restored = replay.generator(2, 0), replay.generator(2, 0)
    for _ in range(20):
        assert _ids(restored.sample(3, g_restored)) == _ids(buffer.sample(3, g))
    for b in (buffer, restored):
        b.add(_fill(BatchBuffers(spec, 1).take(), [9]))  # evicts column 1, the oldest left
    assert sorted(_ids(restored.sample(5, g_restored))) == sorted(_ids(buffer.sample(5, g))) == [2, 3, 4, 5, 9]
    assert checkpoint.load_replay(tmp_path, 1) is None  # another rank's: none written


def test_a_saved_buffer_of_another_run_is_refused_and_changes_nothing():
    spec = _spec()
    buffer = replay.ReplayBuffer(spec, 4)
    buffer.add(_fill(BatchBuffers(spec, 2).take(), [0, 1]))
    state = buffer.state_dict()
    target = replay.ReplayBuffer(spec, 4)
    target.add(_fill(BatchBuffers(spec, 1).take(), [7]))
    cases = [
        (replay.ReplayBuffer(spec, 5), state, "holds 4 columns, not --replay_buffer_size=5"),
        (replay.ReplayBuffer(_spec(state=False), 4), state, "not the replay buffer's"),
        (replay.ReplayBuffer(unroll.unroll_spec(T + 1, OBS, np.float32, A, (H, H)), 4), state, "observation is"),
        (replay.ReplayBuffer(unroll.unroll_spec(T, OBS, np.uint8, A, (H, H)), 4), state, "observation is"),
        (target, {**state, "next": 4}, "position 4 and size 2 do not fit"),
        (target, {**state, "ring": None}, "do not fit"),
    ]
    for other, bad, message in cases:
        with pytest.raises(ValueError, match=message):
            other.load_state_dict(bad, torch.device("cpu"))
    assert len(target) == 1 and _ids(target.sample(1, replay.generator(1, 0))) == [7]


@pytest.mark.parametrize(
    "proportion, due",
    [(0.0, [0] * 6), (1.0, [1] * 6), (0.5, [0, 1, 0, 1, 0, 1]), (2.0, [2] * 6), (0.25, [0, 0, 0, 1, 0, 0])],
)
def test_replays_due_follow_the_proportion(proportion, due):
    assert [replay.replays_due(k, proportion) for k in range(1, 7)] == due
    # Any proportion: k fresh batches are followed by floor(k p) replayed ones in all.
    assert sum(replay.replays_due(k, 0.3) for k in range(1, 1001)) == 300


# -- the learner ---------------------------------------------------------------------

B, UNROLL, FRESH = 2, 5, 6


def _config(tmp_path, **kw) -> Config:
    base = dict(
        level_name="CartPole-v1",
        num_action_repeats=1,
        network="mlp",
        mlp_sizes="8",
        use_lstm=True,  # core states travel through the buffer too
        lstm_size=8,
        unroll_length=UNROLL,
        batch_size=B,
        num_envs_per_actor=B,
        total_environment_frames=FRESH * B * UNROLL,
        logdir=str(tmp_path),
        entropy_cost=0.01,
        learning_rate=0.01,
        replay_buffer_size=5,
    )
    base.update(kw)
    return Config(**base)


def _train_with_actor(
    config: Config, save: bool = False
) -> tuple[learner.Learner, list[dict], torch.nn.Module, torch.optim.Optimizer]:
    """A real Learner trained by a real actor to the frame budget (then closed, with its
    final checkpoint if `save`); returns it, copies of the batches it trained on, and a
    copy of its agent and a fresh optimizer as they were before the first update."""
    server = learner.Learner(config)
    reference = copy.deepcopy(server.agent)
    optimizer = make_optimizer(
        config.optimizer,
        reference.parameters(),
        lr=config.learning_rate,
        decay=config.decay,
        momentum=config.momentum,
        epsilon=config.epsilon,
    )
    batches, source = [], server.feed.source

    def recording(timeout: float):
        batch = source(timeout)
        if batch is not None:
            batches.append({name: t.clone() for name, t in batch.items()})
        return batch

    server.feed.source = recording  # on the CPU the feed takes a batch only when it trains on it
    _run_with_actor(config, server, server.run, save=save)
    return server, batches, reference, optimizer


def _by_hand(runs: list[tuple[Config, list[dict]]], spec: dict, agent: torch.nn.Module, optimizer) -> None:
    """learn_step on each fresh batch in turn, each followed by the replays due, sampled
    from one ReplayBuffer of the same batches with rank 0's stream, at the fresh
    update's learning rate and entropy cost: the learner's updates, by hand. `runs`:
    the batches of each run, with the run's config (its schedule)."""
    seed, capacity = runs[0][0].seed, runs[0][0].replay_buffer_size
    buffer, generator = replay.ReplayBuffer(spec, capacity), replay.generator(seed, 0)
    k = 0
    for config, batches in runs:
        for batch in batches:
            frames, k = k * config.frames_per_step, k + 1
            lr, cost = learning_rate_at(frames, config), entropy_cost_at(frames, config)
            assert learn_step(agent, optimizer, batch, config, lr, entropy_cost=cost)["skipped"] == 0.0
            if config.replay_proportion:
                buffer.add(batch)
                for _ in range(replay.replays_due(k, config.replay_proportion)):
                    learn_step(agent, optimizer, buffer.sample(B, generator), config, lr, entropy_cost=cost)


@pytest.mark.parametrize("proportion, schedules", [(0.0, False), (0.5, False), (1.0, True)])
def test_the_learner_replays_p_batches_per_fresh_one_and_counts_only_fresh_frames(tmp_path, proportion, schedules):
    """(1 + p) updates per fresh batch, frames of fresh batches only, and parameters
    bit-identical to learn_step called by hand: on the fresh batches alone when p = 0
    (the code without replay), else each followed by the replays due, sampled from a
    ReplayBuffer of the same batches with the same generator, at the fresh update's
    learning rate and entropy cost (with schedules, --entropy_cost_decay_frames at half
    the budget, so that it reaches 0 within the run, and the learning rate held until
    a quarter of it)."""
    half = FRESH * B * UNROLL // 2
    config = _config(
        tmp_path,
        replay_proportion=proportion,
        entropy_cost_decay_frames=half * schedules,
        learning_rate_decay_start_frames=half // 2 * schedules,
    )
    server, batches, agent, optimizer = _train_with_actor(config)
    assert len(batches) == FRESH
    assert server.frames == FRESH * config.frames_per_step
    replays = int(FRESH * proportion)
    assert server.param_version == FRESH + replays
    assert (server.replay is None) == (proportion == 0)

    _by_hand([(config, batches)], server.unroll_spec, agent, optimizer)
    for (name, got), want in zip(server.agent.named_parameters(), agent.parameters(), strict=True):
        assert torch.equal(got, want), name

    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[-1]["param_version"] == FRESH + replays
    if proportion:
        assert sum(r["replay_updates"] for r in rows) == replays
        assert any("replay/vtrace/mean_rho" in r for r in rows)
    else:
        assert not any("replay_updates" in r or any(k.startswith("replay/") for k in r) for r in rows)


@pytest.mark.parametrize("saved", [True, False])
def test_a_run_stopped_cleanly_and_resumed_replays_as_one_that_never_stopped(tmp_path, saved):
    """Half the budget, a clean stop (the final checkpoint and, with
    --save_replay_buffer, the replay file), then a new Learner on the same logdir to
    the end: its parameters are bit-identical to learn_step by hand through all the
    fresh batches with one buffer, one stream and one schedule (p = 0.5, so the
    schedule's position shows: 3 replays in all where a restart of k gives 2).
    Without the file the resumed buffer starts empty, as before the flag existed."""
    half = FRESH // 2
    first_half = _config(tmp_path, replay_proportion=0.5, total_environment_frames=half * B * UNROLL)
    config = _config(tmp_path, replay_proportion=0.5, save_replay_buffer=saved)
    first, batches, agent, optimizer = _train_with_actor(first_half, save=True)
    assert first.frames == half * config.frames_per_step and len(first.replay) == config.replay_buffer_size
    saved_state = checkpoint.load_replay(tmp_path, 0)
    assert saved_state["frames"] == first.frames == checkpoint.load(checkpoint.latest(tmp_path))["frames"]
    if not saved:
        checkpoint.replay_path(tmp_path, 0).unlink()  # the first half's run had the flag on
    second, more, _, _ = _train_with_actor(config, save=saved)
    assert len(batches) + len(more) == FRESH and second.frames == FRESH * config.frames_per_step
    assert checkpoint.replay_path(tmp_path, 0).exists() == saved
    _by_hand([(first_half, batches), (config, more)], second.unroll_spec, agent, optimizer)
    same = [torch.equal(got, want) for got, want in zip(second.agent.parameters(), agent.parameters(), strict=True)]
    if saved:
        assert second.param_version == FRESH + 3
        assert all(same)
    else:
        assert second.param_version == FRESH + 2
        assert not all(same)


def test_a_replay_file_that_does_not_go_with_the_checkpoint_is_ignored(tmp_path, caplog):
    """A replay file from an earlier stop (here: a later checkpoint written after it,
    as by a run that then crashed) or an unreadable one: the learner says why and
    starts the buffer empty; the run goes on."""
    config = _config(tmp_path, replay_proportion=1.0, total_environment_frames=2 * B * UNROLL)
    _train_with_actor(config, save=True)
    last = checkpoint.load(checkpoint.latest(tmp_path))
    checkpoint.save(tmp_path, {**last, "frames": last["frames"] + 1}, last["frames"] + 1)
    bigger = _config(tmp_path, replay_proportion=1.0)
    for damage, message in [(None, "is not the restored checkpoint's"), (b"not a torch file", "cannot read")]:
        if damage is not None:
            checkpoint.replay_path(tmp_path, 0).write_bytes(damage)
        caplog.clear()
        with caplog.at_level("INFO", logger="absl"):  # the learner logs through absl's logger
            server = learner.Learner(bigger)
        try:
            assert server.frames == last["frames"] + 1 and len(server.replay) == 0
            assert message in caplog.text and "starts empty" in caplog.text
        finally:
            server.close(save=False)


def test_skipped_batches_are_not_replayed_and_count_toward_the_stop(tmp_path, monkeypatch):
    """Non-finite unrolls (the receiver's value checks turned off to reach the guard,
    as in test_learner.py): each fresh update is skipped, its batch is not stored, no
    replay runs, and the run stops after MAX_NONFINITE_IN_A_ROW."""
    import zmq

    from impala import receiver as receiver_module
    from impala import wire

    monkeypatch.setattr(receiver_module, "check_values", lambda arrays, limits: None)
    config = _config(tmp_path, batch_size=1, num_envs_per_actor=1, reward_clipping="none", replay_proportion=1.0)
    server = learner.Learner(config)
    peer = zmq.Context.instance().socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(server.unroll_address)
    try:
        arrays = unroll.new_unroll(server.unroll_spec, 1)
        arrays["reward"][3] = float("nan")
        for _ in range(learner.MAX_NONFINITE_IN_A_ROW):
            peer.send_multipart(wire.encode("unroll", arrays, task=0))
        with pytest.raises(learner.NonFiniteLossError, match="in a row"):
            server.run()
        assert len(server.replay) == 0 and server.param_version == 0
    finally:
        peer.close()
        server.close(save=False)


# -- the real program ------------------------------------------------------------------


def test_a_training_run_with_replay_finishes_and_reports_its_replays(tmp_path):
    """python -m impala.experiment on CartPole with --replay_proportion=1: real actor
    processes, 20 fresh batches of 16 x 20 steps, each followed by one replayed."""
    result = cli.run(
        "--flagfile=configs/cartpole.cfg",
        f"--logdir={tmp_path}",
        "--total_environment_frames=6400",
        "--replay_proportion=1",
        "--replay_buffer_size=64",
        "--log_interval_s=0.5",
    )
    assert result.returncode == 0, result.stdout[-3000:]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[-1]["frames"] == 6400
    assert all("replay_updates" in r for r in rows)
    assert sum(r["replay_updates"] for r in rows) == 20
    assert rows[-1]["param_version"] == 40
    assert sum(r["skipped_updates"] for r in rows) == 0


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--replay_proportion=-0.5"], "--replay_proportion must be >= 0.0"),
        (["--replay_proportion=nan"], "--replay_proportion must be a finite number"),
        (["--replay_proportion=1", "--batch_size=8", "--replay_buffer_size=7"], "--replay_buffer_size=7 must hold"),
        (["--replay_buffer_size=0"], "--replay_buffer_size must be at least 1"),
    ],
)
def test_bad_replay_flags_are_one_line_errors(flags, expected, tmp_path):
    result = subprocess.run(
        cli.command(f"--logdir={tmp_path}", *flags), cwd=cli.ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert expected in result.stderr


# -- data-parallel ranks --------------------------------------------------------------


def test_two_ranks_replay_their_own_columns_in_lockstep(tmp_path):
    """2 ranks x 2 envs (tests/test_data_parallel.py's setup, real processes over the
    real wire) with --replay_proportion=1: each rank stores only its own actors'
    columns and samples them with its own stream; the update is the one of a single
    learner on rank 0's sample and rank 1's together. Same tolerance as there (the
    ranks' float32 sums add in another order)."""
    logdir = tmp_path / "run"
    config = Config(**dp.FLAGS, logdir=str(logdir), replay_proportion=1.0, replay_buffer_size=3)
    agent, optimizer = dp._agent(config)
    spec = unroll.unroll_spec(dp.T, dp.OBS, np.float32, dp.A, state_sizes(agent))
    unrolls = dp._unrolls(spec, dp.UPDATES * dp.BATCH, np.random.default_rng(11))
    dp.checkpoint.save(
        logdir,
        {
            "model": agent.state_dict(),
            "optimizer": optimizer.state_dict(),
            "frames": 0,
            "param_version": 0,
            "signature": dp.checkpoint.network_signature(config, agent),
            "level_name": config.level_name,
        },
        0,
    )
    buffers = [replay.ReplayBuffer(spec, config.replay_buffer_size) for _ in range(dp.RANKS)]
    generators = [replay.generator(config.seed, rank) for rank in range(dp.RANKS)]
    for k in range(dp.UPDATES):
        lr = learning_rate_at(k * config.frames_per_step, config)
        learn_step(agent, optimizer, dp._combined(unrolls, k), config, lr)
        for rank, buffer in enumerate(buffers):  # rank r's batch k: unrolls 4k + r and 4k + r + 2
            buffer.add(_concatenated([unrolls[4 * k + rank], unrolls[4 * k + rank + 2]]))
        samples = [buffer.sample(dp.BATCH // dp.RANKS, g) for buffer, g in zip(buffers, generators)]
        learn_step(agent, optimizer, _concatenated(samples), config, lr)

    port, master = dp._free_ports(dp.RANKS + 1), dp._free_ports(1)
    ranks = dp._start_ranks(dp._flags(config, port, replay_proportion=1.0, replay_buffer_size=3), master, tmp_path, "r")
    sockets = dp._send(port, unrolls, logdir)
    try:
        assert dp._finish(ranks) == [0, 0], dp._logs(tmp_path, "r")
    finally:
        for s in sockets:
            s.close()
    final = dp.checkpoint.load(dp.checkpoint.latest(logdir))
    assert final["frames"] == dp.UPDATES * config.frames_per_step
    assert final["param_version"] == 2 * dp.UPDATES
    for rank, buffer in enumerate(buffers):  # each rank saved its own columns beside the final checkpoint
        saved = dp.checkpoint.load_replay(logdir, rank)
        assert saved["frames"] == final["frames"] and saved["buffer"]["size"] == len(buffer)
        ring = saved["buffer"]["ring"]
        assert sorted(ring["action"][0].tolist()) == sorted(buffer.state_dict()["ring"]["action"][0].tolist())
    expected = agent.state_dict()
    for name, value in final["model"].items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def _concatenated(parts: list) -> dict[str, torch.Tensor]:
    """Batches or unrolls side by side on the env axis."""
    out = {}
    for name in parts[0]:
        axis = 0 if name.startswith("core_state_") else 1
        out[name] = torch.cat([torch.as_tensor(p[name]) for p in parts], dim=axis)
    return out
