"""The learner's update step and schedule, its sockets under bad input, non-finite
updates, a failing server thread, and checkpoints."""

from __future__ import annotations

import logging as std_logging
import os
import threading
import time

import numpy as np
import pytest
import torch
import zmq

from impala import checkpoint, learner, unroll, wire
from impala import receiver as receiver_module
from impala.actor import run_actor
from impala.config import Config, ConfigError
from impala.metrics import read_jsonl
from impala.nets import Agent
from impala.receiver import ActorBook

T, B, A, OBS = 4, 3, 2, 3


def _config(tmp_path, **kw) -> Config:
    base = dict(
        level_name="CartPole-v1",
        num_action_repeats=1,
        network="mlp",
        use_lstm=False,
        mlp_sizes="8",
        unroll_length=T,
        batch_size=B,
        logdir=str(tmp_path),
        entropy_cost=0.01,
        baseline_cost=0.5,
        discounting=0.9,
        learning_rate=0.001,
    )
    base.update(kw)
    return Config(**base)


def _random_batch(rng: np.random.Generator) -> dict[str, torch.Tensor]:
    done = rng.random((T + 1, B)) < 0.3
    return {
        "observation": torch.tensor(rng.normal(size=(T + 1, B, OBS)), dtype=torch.float32),
        "reward": torch.tensor(rng.normal(scale=2.0, size=(T + 1, B)), dtype=torch.float32),
        "done": torch.tensor(done),
        "episode_return": torch.zeros(T + 1, B),
        "episode_step": torch.zeros(T + 1, B, dtype=torch.int32),
        "action": torch.tensor(rng.integers(0, A, size=(T + 1, B))),
        "policy_logits": torch.tensor(rng.normal(size=(T + 1, B, A)), dtype=torch.float32),
    }


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_learn_step_loss_matches_an_independent_computation(tmp_path):
    """learn_step must pair env output t with action t+1 (the original's shift),
    bootstrap from the value at T, cut traces at episode ends and clip rewards."""
    rng = np.random.default_rng(0)
    config = _config(tmp_path)
    torch.manual_seed(0)
    agent = Agent((OBS,), A, network="mlp", use_lstm=False, hidden_sizes=(8,))
    batch = _random_batch(rng)
    with torch.no_grad():
        out, _ = agent(batch["observation"], batch["action"], batch["reward"], batch["done"])
    logits, values = out.policy_logits.double().numpy(), out.baseline.double().numpy()
    behaviour = batch["policy_logits"].double().numpy()
    actions, done = batch["action"].numpy(), batch["done"].numpy()
    rewards = np.clip(batch["reward"].double().numpy(), -1, 1)

    expected = 0.0
    rhos, abs_errors, entropies = [], [], []
    for b in range(B):
        # step t of the learning sequence is the transition env output t -> t+1
        lp_target = [_log_softmax(logits[t, b])[actions[t + 1, b]] for t in range(T)]
        lp_behaviour = [_log_softmax(behaviour[t + 1, b])[actions[t + 1, b]] for t in range(T)]
        rho = np.exp(np.array(lp_target) - np.array(lp_behaviour))
        rhos += list(rho)
        c, rho_bar = np.minimum(rho, 1.0), np.minimum(rho, 1.0)
        gamma = [0.0 if done[t + 1, b] else 0.9 for t in range(T)]
        v = list(values[:T, b]) + [values[T, b]]
        delta = [rho_bar[t] * (rewards[t + 1, b] + gamma[t] * v[t + 1] - v[t]) for t in range(T)]
        vs = []
        for s in range(T):  # the paper's definition, summed out
            total, weight = v[s], 1.0
            for t in range(s, T):
                total += weight * delta[t]
                weight *= gamma[t] * c[t]
            vs.append(total)
        vs_next = vs[1:] + [v[T]]
        abs_errors += [abs(vs[t] - v[t]) for t in range(T)]
        for t in range(T):
            advantage = rho_bar[t] * (rewards[t + 1, b] + gamma[t] * vs_next[t] - v[t])
            probs = np.exp(_log_softmax(logits[t, b]))
            expected += -lp_target[t] * advantage
            expected += 0.5 * 0.5 * (vs[t] - v[t]) ** 2
            expected += 0.01 * np.sum(probs * np.log(probs))
            entropies.append(-np.sum(probs * np.log(probs)))

    optimizer = torch.optim.SGD(agent.parameters(), lr=0.0)
    stats = learner.learn_step(agent, optimizer, batch, config)
    assert stats["total_loss"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    # The V-trace diagnostics, from the same independent computation.
    assert stats["vtrace/mean_rho"] == pytest.approx(np.mean(rhos), rel=1e-4)
    assert stats["vtrace/rho_clipped"] == pytest.approx(np.mean(np.array(rhos) > 1.0))
    assert stats["vtrace/pg_rho_clipped"] == pytest.approx(np.mean(np.array(rhos) > 1.0))
    assert 0 < stats["vtrace/rho_clipped"] < 1  # the check can tell clipped from not
    assert stats["entropy"] == pytest.approx(np.mean(entropies), rel=1e-4)  # nats per step
    assert stats["vtrace/mean_abs_vs_minus_value"] == pytest.approx(np.mean(abs_errors), rel=1e-4)
    assert stats["skipped"] == 0.0


def test_learn_step_with_lstm_runs_and_changes_parameters(tmp_path):
    rng = np.random.default_rng(1)
    config = _config(tmp_path, use_lstm=True, lstm_size=16)
    agent = Agent((OBS,), A, network="mlp", use_lstm=True, lstm_size=16, hidden_sizes=(8,))
    batch = _random_batch(rng)
    batch["core_state_0"] = torch.randn(B, 16)
    batch["core_state_1"] = torch.randn(B, 16)
    before = [p.detach().clone() for p in agent.parameters()]
    stats = learner.learn_step(agent, torch.optim.SGD(agent.parameters(), lr=0.1), batch, config)
    assert np.isfinite(stats["total_loss"]) and stats["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.parameters()))


def test_gradient_norm_clipping(tmp_path):
    rng = np.random.default_rng(2)
    agent = Agent((OBS,), A, network="mlp", use_lstm=False, hidden_sizes=(8,))
    batch = _random_batch(rng)
    learner.learn_step(agent, torch.optim.SGD(agent.parameters(), lr=0.0), batch, _config(tmp_path, max_grad_norm=1e-3))
    norm = torch.sqrt(sum((p.grad**2).sum() for p in agent.parameters()))
    assert norm == pytest.approx(1e-3, rel=1e-3)


def test_learner_drops_bad_messages_and_keeps_serving(tmp_path):
    config = _config(tmp_path, batch_size=2, num_envs_per_actor=2, unroll_length=5)
    server = learner.Learner(config)
    context = zmq.Context.instance()
    peer = context.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(server.unroll_address)
    good_shapes = unroll.new_unroll(server.unroll_spec, 2)
    bad = [
        [b"\x00garbage"],
        wire.encode("params", {}),  # a foreign kind on the unroll socket
        wire.encode("unroll", {**good_shapes, "reward": np.zeros((6, 2), np.float64)}),  # wrong dtype
        wire.encode("unroll", {k: v for k, v in good_shapes.items() if k != "action"}),  # missing array
        [wire.encode("unroll", good_shapes)[0][:-1]],  # a message cut short
    ]
    stop = threading.Event()
    actor = threading.Thread(
        target=run_actor,
        args=(config, 7, server.unroll_address, server.params_address),
        kwargs=dict(stop=stop, max_unrolls=3),
        daemon=True,
    )
    try:
        for frames in bad:
            peer.send_multipart(frames)
        actor.start()
        batch = server.next_batch(timeout=30)
        assert batch is not None, "no batch from the good actor"
        assert batch["observation"].shape == (6, 2, 4)
        # The peer's and the actor's connections are read fair-queued: the good
        # actor's unroll can come before the last bad messages (the count is a total).
        deadline = time.monotonic() + 10
        while server.book.take_report().bad_messages < len(bad) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.book.take_report().bad_messages == len(bad)
        assert server.book.known(7)
    finally:
        stop.set()
        actor.join(timeout=10)
        peer.close()
        server.close(save=False)


def test_checkpoint_write_failure_keeps_the_previous_one(tmp_path, monkeypatch):
    server = learner.Learner(_config(tmp_path))
    try:
        server.save_checkpoint()
        first = checkpoint.latest(tmp_path)
        content = first.read_bytes()
        server.frames = 1000

        def full_disk(obj, f, *args, **kwargs):
            f.write(b"partial")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(torch, "save", full_disk)
        server.save_checkpoint()  # logs, does not raise
        assert checkpoint.list_checkpoints(tmp_path) == [first]
        assert first.read_bytes() == content
        assert not [p for p in os.listdir(first.parent) if p.endswith(".tmp")]
    finally:
        monkeypatch.undo()
        server.close(save=False)


def test_checkpoints_are_pruned_and_corrupt_ones_refused(tmp_path):
    for frames in (10, 20, 30, 40):
        checkpoint.save(tmp_path, {"frames": frames}, frames, keep=2)
    kept = checkpoint.list_checkpoints(tmp_path)
    assert [checkpoint.load(p)["frames"] for p in kept] == [30, 40]
    kept[-1].write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read checkpoint") as error:
        checkpoint.load(kept[-1])
    assert "\n" not in str(error.value)


def test_learning_rate_schedule_decays_linearly_to_zero_by_frames(tmp_path):
    config = _config(tmp_path, learning_rate=0.01, total_environment_frames=1000)
    assert learner.learning_rate_at(0, config) == pytest.approx(0.01)
    assert learner.learning_rate_at(250, config) == pytest.approx(0.0075)
    assert learner.learning_rate_at(999, config) == pytest.approx(0.00001)
    assert learner.learning_rate_at(1000, config) == 0.0
    assert learner.learning_rate_at(5000, config) == 0.0  # a resumed run past its budget


def test_learning_rate_can_hold_before_it_decays(tmp_path):
    config = _config(tmp_path, learning_rate=0.01, total_environment_frames=1000, learning_rate_decay_start_frames=600)
    assert learner.learning_rate_at(0, config) == 0.01
    assert learner.learning_rate_at(600, config) == 0.01
    assert learner.learning_rate_at(700, config) == pytest.approx(0.0075)
    assert learner.learning_rate_at(1000, config) == 0.0
    assert learner.learning_rate_at(5000, config) == 0.0


@pytest.mark.parametrize("start", [-1, 1000])
def test_learning_rate_decay_start_must_be_within_the_budget(tmp_path, start):
    with pytest.raises(ConfigError, match="--learning_rate_decay_start_frames"):
        _config(tmp_path, total_environment_frames=1000, learning_rate_decay_start_frames=start)


def test_learn_step_applies_the_given_learning_rate(tmp_path):
    agent = Agent((OBS,), A, network="mlp", use_lstm=False, hidden_sizes=(8,))
    optimizer = torch.optim.SGD(agent.parameters(), lr=0.5)
    learner.learn_step(agent, optimizer, _random_batch(np.random.default_rng(3)), _config(tmp_path), 0.125)
    assert optimizer.param_groups[0]["lr"] == 0.125


def test_entropy_cost_decays_over_its_own_horizon(tmp_path):
    config = _config(tmp_path, total_environment_frames=1000, entropy_cost=0.02, entropy_cost_decay_frames=400)
    assert learner.entropy_cost_at(0, config) == pytest.approx(0.02)
    assert learner.entropy_cost_at(100, config) == pytest.approx(0.015)
    assert learner.entropy_cost_at(400, config) == 0.0
    assert learner.entropy_cost_at(700, config) == 0.0  # stays 0 while the learning rate still decays
    assert learner.learning_rate_at(700, config) > 0.0
    constant = _config(tmp_path, total_environment_frames=1000, entropy_cost=0.02)
    assert learner.entropy_cost_at(700, constant) == 0.02


def test_entropy_cost_decay_frames_must_not_be_negative(tmp_path):
    with pytest.raises(ConfigError, match="--entropy_cost_decay_frames"):
        _config(tmp_path, entropy_cost_decay_frames=-1)


def test_learn_step_uses_the_given_entropy_cost(tmp_path):
    """learn_step's `entropy_cost` replaces --entropy_cost: a quarter of it gives the
    update of a flag a quarter as large, and not that of the flag's own value."""

    def update(given: float | None, **kw) -> list[torch.Tensor]:
        torch.manual_seed(0)
        agent = Agent((OBS,), A, network="mlp", use_lstm=False, hidden_sizes=(8,))
        optimizer = torch.optim.SGD(agent.parameters(), lr=1.0)
        batch = _random_batch(np.random.default_rng(4))
        learner.learn_step(agent, optimizer, batch, _config(tmp_path, **kw), 0.1, entropy_cost=given)
        return [p.detach().clone() for p in agent.parameters()]

    given = update(0.25, entropy_cost=1.0)
    quarter = update(None, entropy_cost=0.25)
    full = update(None, entropy_cost=1.0)
    assert all(torch.allclose(g, q, atol=1e-6) for g, q in zip(given, quarter))
    assert not all(torch.allclose(g, f, atol=1e-4) for g, f in zip(given, full))


def _optimizer_state(optimizer) -> list[torch.Tensor]:
    return [t.clone() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]


@pytest.mark.parametrize("poison", ["reward", "logits"])
def test_a_non_finite_update_is_skipped_and_leaves_parameters_and_optimizer_alone(tmp_path, poison):
    from impala.optim import RMSPropTF

    config = _config(tmp_path, reward_clipping="none")
    agent = Agent((OBS,), A, network="mlp", use_lstm=False, hidden_sizes=(8,))
    optimizer = RMSPropTF(agent.parameters(), lr=0.01, decay=0.99, momentum=0.0, epsilon=0.1)
    rng = np.random.default_rng(4)
    assert learner.learn_step(agent, optimizer, _random_batch(rng), config)["skipped"] == 0.0
    params, state = [p.detach().clone() for p in agent.parameters()], _optimizer_state(optimizer)
    batch = _random_batch(rng)
    if poison == "reward":
        batch["reward"][2, 1] = float("nan")
    else:
        batch["policy_logits"][1, 0, 0] = float("inf")
    stats = learner.learn_step(agent, optimizer, batch, config)
    assert stats["skipped"] == 1.0
    assert not np.isfinite(stats["total_loss"]) or not np.isfinite(stats["grad_norm"])
    assert all(torch.equal(a, b) for a, b in zip(params, agent.parameters()))
    after = _optimizer_state(optimizer)
    assert len(after) == len(state) and all(torch.equal(a, b) for a, b in zip(state, after))


def test_a_checkpoint_with_non_finite_parameters_is_never_written(tmp_path):
    server = learner.Learner(_config(tmp_path))
    try:
        server.save_checkpoint()
        first = checkpoint.latest(tmp_path)
        server.frames = 1000
        with torch.no_grad():
            next(server.agent.parameters())[0] = float("nan")
        server.save_checkpoint()  # logs, does not raise
        assert checkpoint.list_checkpoints(tmp_path) == [first]
        assert all(torch.isfinite(t).all() for t in checkpoint.load(first)["model"].values())
        with pytest.raises(checkpoint.NonFiniteError):
            checkpoint.save(tmp_path, {"model": server.agent.state_dict()}, 2000)
        assert checkpoint.list_checkpoints(tmp_path) == [first]
    finally:
        server.close(save=False)


def test_non_finite_unrolls_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    """Real learner, real socket: unrolls whose rewards are NaN (the wire carries
    any float) make every update non-finite; the parameters stay as they were and
    after MAX_NONFINITE_IN_A_ROW the run stops with a one-line error. The receiver
    drops such unrolls (test_receiver.py); its value checks are turned off here to
    reach the guard behind them (defence in depth)."""
    monkeypatch.setattr(receiver_module, "check_values", lambda arrays, limits: None)
    config = _config(
        tmp_path, batch_size=1, num_envs_per_actor=1, unroll_length=5, reward_clipping="none", log_interval_s=0.001
    )
    server = learner.Learner(config)
    peer = zmq.Context.instance().socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(server.unroll_address)
    try:
        before = [p.detach().clone() for p in server.agent.parameters()]
        arrays = unroll.new_unroll(server.unroll_spec, 1)
        arrays["reward"][3] = float("nan")
        frames = wire.encode("unroll", arrays, task=0)
        for _ in range(learner.MAX_NONFINITE_IN_A_ROW):
            peer.send_multipart(frames)
        with pytest.raises(learner.NonFiniteLossError, match="in a row") as error:
            server.run()
        assert "\n" not in str(error.value)
        assert all(torch.equal(a, b) for a, b in zip(before, server.agent.parameters()))
        assert server.param_version == 0
        rows = read_jsonl(tmp_path / "metrics.jsonl")
        assert sum(r["skipped_updates"] for r in rows) >= learner.MAX_NONFINITE_IN_A_ROW - 1
    finally:
        peer.close()
        server.close(save=True)
    saved = checkpoint.load(checkpoint.latest(tmp_path))
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def _run_with_actor(config, server, body, save: bool = True):
    stop = threading.Event()
    actor = threading.Thread(
        target=run_actor,
        args=(config, 0, server.unroll_address, server.params_address),
        kwargs=dict(stop=stop),
        daemon=True,
    )
    actor.start()
    try:
        body()
    finally:
        stop.set()
        actor.join(timeout=10)
        server.close(save=save)


def test_a_failing_server_socket_stops_the_run(tmp_path, monkeypatch):
    """A failure outside one message's handling (here the unroll socket's read,
    with a real actor on real sockets) ends run() with a one-line error."""
    config = _config(tmp_path, batch_size=2, num_envs_per_actor=2, unroll_length=5)
    real = wire.recv_routed

    def broken(socket, **kwargs):
        if kwargs.get("allowed_kinds") == ("unroll",):
            raise zmq.ZMQError(zmq.ENOTSOCK, "injected failure")
        return real(socket, **kwargs)

    monkeypatch.setattr(wire, "recv_routed", broken)
    server = learner.Learner(config)

    def body():
        with pytest.raises(learner.ServerThreadError, match="unrolls thread failed: ZMQError: injected") as e:
            server.run()
        assert "\n" not in str(e.value)

    _run_with_actor(config, server, body)
    assert checkpoint.latest(tmp_path) is not None


def test_a_stop_event_ends_run_after_an_update_and_the_actors_are_not_told_finished(tmp_path, caplog):
    """run(stop=...) returns once the event is set (experiment.STOP_REQUESTED: a SIGTERM
    whose KeyboardInterrupt was lost), well before the frame budget, and does not tell
    the actors the run is finished; close(save=True) then keeps its frames. The budget
    (100 updates) is there so that a run that ignores the event fails the test."""
    caplog.set_level(std_logging.INFO, logger="absl")  # absl's own level may have been raised by earlier tests
    config = _config(tmp_path, batch_size=2, num_envs_per_actor=2, unroll_length=5, total_environment_frames=1000)
    server = learner.Learner(config)
    stop = threading.Event()

    def tick():
        if server.param_version >= 3:
            stop.set()

    _run_with_actor(config, server, lambda: server.run(tick=tick, stop=stop))
    assert 3 <= server.param_version < 10 and server.frames < config.total_environment_frames
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Asked to stop at") for m in messages)
    assert not any(m.startswith("Run finished at") for m in messages)
    saved = checkpoint.load(checkpoint.latest(tmp_path))
    assert saved["frames"] == server.frames


def test_an_error_handling_one_message_drops_only_that_message(tmp_path, monkeypatch, caplog):
    """Any exception while handling one message (here a RuntimeError injected where
    the first unrolls are booked, and one where the first parameter request is
    answered) drops that message: counted, one log line naming the task; both
    threads go on serving and training continues."""
    config = _config(tmp_path, batch_size=2, num_envs_per_actor=2, unroll_length=5, total_environment_frames=4 * 2 * 5)
    real_record, real_reply = ActorBook.record, learner.ParamServer.reply
    failures = {"record": 2, "reply": 1}

    def record(self, *args, **kwargs):
        if failures["record"]:
            failures["record"] -= 1
            raise RuntimeError("injected booking failure")
        return real_record(self, *args, **kwargs)

    def reply(self, *args, **kwargs):
        if failures["reply"]:
            failures["reply"] -= 1
            raise KeyError("injected\nreply failure")
        return real_reply(self, *args, **kwargs)

    monkeypatch.setattr(ActorBook, "record", record)
    monkeypatch.setattr(learner.ParamServer, "reply", reply)
    # Every line, not one per kind of drop per 5 s.
    monkeypatch.setattr(learner, "DROP_LOG_INTERVAL_S", 0.0)
    server = learner.Learner(config)
    _run_with_actor(config, server, server.run)  # returns at the frame budget: training went on
    assert server.frames >= config.total_environment_frames and server.param_version >= 4
    assert server.book.take_report().bad_messages == 3
    dropped = [r.getMessage() for r in caplog.records if "Dropped a bad message" in r.getMessage()]
    assert len(dropped) == 3 and all("task 0" in line for line in dropped)
    assert any("RuntimeError: injected booking failure" in line for line in dropped)
    assert all("\n" not in line for line in dropped)


def test_adam_learner_trains_and_its_checkpoint_refuses_rmsprop(tmp_path):
    from impala.optim import make_optimizer

    agent = Agent((OBS,), A, network="mlp", use_lstm=False, hidden_sizes=(8,))
    adam = make_optimizer("adam", agent.parameters(), lr=0.01, decay=0.999, momentum=0.0, epsilon=1e-8)
    before = [p.detach().clone() for p in agent.parameters()]
    stats = learner.learn_step(agent, adam, _random_batch(np.random.default_rng(5)), _config(tmp_path))
    assert stats["skipped"] == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.parameters()))

    server = learner.Learner(_config(tmp_path, optimizer="adam", decay=0.999, epsilon=1e-8))
    try:
        assert isinstance(server.optimizer, torch.optim.Adam)
        assert server.optimizer.param_groups[0]["betas"] == (0.9, 0.999)
        for p in server.agent.parameters():
            p.grad = torch.ones_like(p)
        server.optimizer.step()
        server.save_checkpoint()
    finally:
        server.close(save=False)
    with pytest.raises(checkpoint.CheckpointError, match="--optimizer=adam") as error:
        learner.Learner(_config(tmp_path))  # rmsprop, the default
    assert "\n" not in str(error.value)
    resumed = learner.Learner(_config(tmp_path, optimizer="adam", decay=0.999, epsilon=1e-8))
    try:
        assert any(state for state in resumed.optimizer.state.values())  # Adam's moments came back
    finally:
        resumed.close(save=False)
