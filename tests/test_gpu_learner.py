"""Issue 13 item 3, a learner that never waits: --learner_dtype (bfloat16 autocast
of the forward pass only; float32 unchanged), batches written straight into reused
(pinned on CUDA) buffers and fed to the device one ahead, and parameter snapshots
published off the training thread. The CUDA tests run where CUDA exists and are
skipped elsewhere; the same classes' CPU paths are tested everywhere."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from impala import learner, losses, unroll, wire
from impala.actor import run_actor
from impala.config import Config, ConfigError
from impala.nets import Agent
from impala.optim import RMSPropTF
from impala.receiver import BatchAssembler, BatchBuffers
from impala.transfer import BatchFeed, SnapshotPublisher

T, B, A = 5, 3, 4
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _config(tmp_path, **kw) -> Config:
    base = dict(
        level_name="CartPole-v1",
        num_action_repeats=1,
        network="mlp",
        use_lstm=False,
        mlp_sizes="16",
        unroll_length=T,
        batch_size=B,
        logdir=str(tmp_path),
        entropy_cost=0.01,
        baseline_cost=0.5,
        discounting=0.9,
        learning_rate=0.01,
        max_grad_norm=1.0,
        device="cpu",
    )
    base.update(kw)
    return Config(**base)


def _image_batch(rng: np.random.Generator, device: str = "cpu", lstm: int = 0) -> dict[str, torch.Tensor]:
    """A Pong-like batch ([T+1, B, 4, 36, 36] uint8 frames) with fixed contents."""
    batch = {
        "observation": torch.tensor(rng.integers(0, 256, (T + 1, B, 4, 36, 36)), dtype=torch.uint8),
        "reward": torch.tensor(rng.normal(scale=2.0, size=(T + 1, B)), dtype=torch.float32),
        "done": torch.tensor(rng.random((T + 1, B)) < 0.2),
        "action": torch.tensor(rng.integers(0, A, (T + 1, B))),
        "policy_logits": torch.tensor(rng.normal(size=(T + 1, B, A)), dtype=torch.float32),
    }
    if lstm:
        batch["core_state_0"] = torch.tensor(rng.normal(size=(B, lstm)), dtype=torch.float32)
        batch["core_state_1"] = torch.tensor(rng.normal(size=(B, lstm)), dtype=torch.float32)
    return {k: v.to(device) for k, v in batch.items()}


def _agent_and_optimizer(config: Config, device: str = "cpu", seed: int = 0):
    torch.manual_seed(seed)
    agent = Agent((4, 36, 36), A, network="shallow", use_lstm=config.use_lstm, lstm_size=config.lstm_size).to(device)
    return agent, RMSPropTF(
        agent.parameters(),
        lr=config.learning_rate,
        decay=config.decay,
        momentum=config.momentum,
        epsilon=config.epsilon,
    )


def _reference_step(agent, optimizer, batch, config) -> dict[str, float]:
    """learn_step as it was before --learner_dtype (issue 13): the oracle that
    float32 must still match bit for bit."""
    state = tuple(batch[f"core_state_{k}"] for k in range(2) if f"core_state_{k}" in batch)
    output, _ = agent(batch["observation"], batch["action"], batch["reward"], batch["done"], state)
    loss = losses.impala_loss(
        target_logits=output.policy_logits[:-1],
        baseline=output.baseline[:-1],
        bootstrap_value=output.baseline[-1],
        behaviour_logits=batch["policy_logits"][1:],
        actions=batch["action"][1:],
        rewards=losses.clip_rewards(batch["reward"][1:], config.reward_clipping),
        discounts=(~batch["done"][1:]).float() * config.discounting,
        baseline_cost=config.baseline_cost,
        entropy_cost=config.entropy_cost,
        clip_rho_threshold=config.clip_rho_threshold,
        clip_pg_rho_threshold=config.clip_pg_rho_threshold,
        vtrace_lambda=config.vtrace_lambda,
    )
    optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(agent.parameters(), config.max_grad_norm)
    optimizer.step()
    return {"total_loss": loss.total.item(), "grad_norm": grad_norm.item()}


def _run_steps(step, config, device="cpu", steps=3, lstm=0):
    agent, optimizer = _agent_and_optimizer(config, device)
    rng = np.random.default_rng(7)
    stats = [step(agent, optimizer, _image_batch(rng, device, lstm), config) for _ in range(steps)]
    return agent, optimizer, stats


def _assert_bit_identical(config, device="cpu", lstm=0):
    agent, optimizer, stats = _run_steps(learner.learn_step, config, device, lstm=lstm)
    ref_agent, ref_optimizer, ref_stats = _run_steps(_reference_step, config, device, lstm=lstm)
    for s, r in zip(stats, ref_stats):
        assert s["total_loss"] == r["total_loss"] and s["grad_norm"] == r["grad_norm"]
    for p, q in zip(agent.parameters(), ref_agent.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, q)
        state, ref_state = optimizer.state[p], ref_optimizer.state[q]
        # Frozen parameters (the LSTM's second bias, nets.init) have no optimizer state.
        assert state.keys() == ref_state.keys() and bool(state) == p.requires_grad
        for key, value in state.items():
            assert torch.equal(value, ref_state[key]) if isinstance(value, torch.Tensor) else value == ref_state[key]


@pytest.mark.parametrize("use_lstm", [False, True])
def test_float32_learn_step_is_bit_identical_to_the_previous_implementation(tmp_path, use_lstm):
    config = _config(tmp_path, use_lstm=use_lstm, lstm_size=8)
    _assert_bit_identical(config, lstm=8 if use_lstm else 0)


def test_learn_step_gives_vtrace_lambda_to_the_loss(tmp_path):
    # The reference passes --vtrace_lambda itself; a learn_step that dropped it would
    # train with lambda 1 and differ (the losses differ at 0.5: checked below).
    config = _config(tmp_path, vtrace_lambda=0.5)
    _assert_bit_identical(config)
    _, _, stats = _run_steps(learner.learn_step, config)
    _, _, stats_at_one = _run_steps(learner.learn_step, _config(tmp_path))
    assert stats[0]["total_loss"] != stats_at_one[0]["total_loss"]


def test_bfloat16_autocasts_the_network_only_and_stays_close_to_float32(tmp_path, monkeypatch):
    """bfloat16: the forward pass is rounded (results differ from float32, so the
    flag does something), V-trace and the losses get float32 inputs, parameters,
    gradients and optimizer state stay float32, and the update stays close."""
    seen = []
    real_loss = losses.impala_loss

    def recording(**kwargs):
        seen.append({k: v.dtype for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()})
        return real_loss(**kwargs)

    monkeypatch.setattr(losses, "impala_loss", recording)
    _, _, f32_stats = _run_steps(learner.learn_step, _config(tmp_path))
    bf16, optimizer, bf16_stats = _run_steps(learner.learn_step, _config(tmp_path, learner_dtype="bfloat16"))
    assert seen and all(d == torch.float32 for call in seen for d in call.values()), seen
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in bf16.parameters())
    assert all(
        t.dtype == torch.float32
        for s in optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    )
    assert [s["total_loss"] for s in bf16_stats] != [s["total_loss"] for s in f32_stats]  # autocast happened
    for s, r in zip(bf16_stats, f32_stats):
        assert s["total_loss"] == pytest.approx(r["total_loss"], rel=0.05, abs=0.05)
        assert s["skipped"] == 0.0


def test_learner_dtype_is_a_checked_flag(tmp_path):
    assert Config().learner_dtype == "float32"
    with pytest.raises(ConfigError, match="learner_dtype"):
        _config(tmp_path, learner_dtype="float16")


# ---------------------------------------------------------------------------
# Batches: assembled into reused buffers, fed to the device.

SPEC = unroll.unroll_spec(T, (3,), np.float32, A, state_sizes=(2,))


def _marked(num_envs: int, first: int) -> unroll.Unroll:
    arrays = unroll.new_unroll(SPEC, num_envs)
    for j in range(num_envs):
        arrays["reward"][:, j] = first + j
        arrays["core_state_0"][j] = first + j
        arrays["observation"][:, j] = first + j
    return arrays


def _ids(batch) -> list[int]:
    return [int(x) for x in np.asarray(batch["reward"])[0]]


def test_batches_are_written_into_reused_buffers():
    buffers = BatchBuffers(SPEC, 2, keep=2)
    assembler = BatchAssembler(SPEC, 2, buffers)
    (first,) = assembler.add(_marked(2, 0))
    assert set(first.tensors) == set(SPEC) and first["reward"].base is not None  # a view of the tensors
    assert first.tensors["reward"].data_ptr() == first["reward"].ctypes.data
    pointer = first.tensors["observation"].data_ptr()
    buffers.give_back(first.tensors)
    (second,) = assembler.add(_marked(2, 10))
    assert second.tensors["observation"].data_ptr() == pointer and buffers.made == 1  # reused, rewritten
    assert _ids(second) == [10, 11] and second["core_state_0"][:, 0].tolist() == [10, 11]
    # Not given back: new memory, and the batch kept keeps its contents.
    (third,) = assembler.add(_marked(2, 20))
    assert buffers.made == 2 and _ids(second) == [10, 11] and _ids(third) == [20, 21]
    for batch in (second, third, first):
        buffers.give_back(batch.tensors)  # one more than `keep`: dropped
    assert buffers._free.qsize() == 2


def _feed_from(batches: list[dict], device: str) -> tuple[BatchFeed, list, list]:
    taken, released = [], []

    def next_batch(timeout):
        if not batches:
            return None
        taken.append(batches.pop(0))
        return taken[-1]

    return BatchFeed(next_batch, released.append, torch.device(device)), taken, released


def _host_batches(n: int, pin: bool = False) -> list[dict]:
    buffers = BatchBuffers(SPEC, 2, pin_memory=pin)
    assembler = BatchAssembler(SPEC, 2, buffers)
    return [assembler.add(_marked(2, 10 * i))[0].tensors for i in range(n)]


def test_on_the_cpu_the_feed_uses_received_batches_as_they_are_and_takes_none_ahead():
    hosts = _host_batches(3)
    pointers = [h["observation"].data_ptr() for h in hosts]
    feed, taken, released = _feed_from(list(hosts), "cpu")
    first = feed.next(0.0)
    assert first["observation"].data_ptr() == pointers[0]  # no copy
    assert len(taken) == 1 and released == []  # nothing taken early, nothing released while in use
    second = feed.next(0.0)
    assert _ids(second) == [10, 11] and released == [hosts[0]]
    feed.next(0.0)
    assert feed.next(0.0) is None and released == hosts


# ---------------------------------------------------------------------------
# Parameter snapshots.


def test_snapshots_are_taken_at_the_offer_and_published_on_the_publisher_thread():
    """The snapshot is the parameters at `offer`, whatever the training thread does
    to them afterwards; a busy publisher refuses an offer, which is made again."""
    net = torch.nn.Linear(3, 2)
    stop, release, published = threading.Event(), threading.Event(), []

    def publish(arrays, version):
        release.wait(10)  # a slow encoding
        published.append((version, {k: v.clone() for k, v in arrays.items()}, threading.current_thread().name))

    publisher = SnapshotPublisher(net.state_dict(), publish, stop, torch.device("cpu"))
    publisher.start()
    try:
        expected = {k: v.clone() for k, v in net.state_dict().items()}
        assert publisher.offer(1)
        with torch.no_grad():
            net.weight.add_(1.0)  # the next update, while version 1 is being published
        assert not publisher.offer(2)  # busy
        release.set()
        assert publisher.idle.wait(10)
        assert publisher.offer(2)
        assert publisher.idle.wait(10)
    finally:
        stop.set()
        publisher.join(10)
    (v1, arrays1, thread), (v2, arrays2, _) = published
    assert (v1, v2, thread) == (1, 2, "publisher")
    assert all(torch.equal(arrays1[k], expected[k]) for k in expected)
    assert torch.equal(arrays2["weight"], expected["weight"] + 1.0)


def test_a_failing_publisher_stops_the_run(tmp_path, monkeypatch):
    """Real learner, real actor, real sockets: publishing that raises ends run()
    with a one-line ServerThreadError."""
    config = _config(tmp_path, batch_size=2, num_envs_per_actor=2, unroll_length=5)
    server = learner.Learner(config)

    def broken(state_dict, version):
        raise RuntimeError("injected publish failure")

    monkeypatch.setattr(server.publisher, "_publish", broken)
    stop = threading.Event()
    actor = threading.Thread(
        target=run_actor,
        args=(config, 0, server.unroll_address, server.params_address),
        kwargs=dict(stop=stop),
        daemon=True,
    )
    actor.start()
    try:
        with pytest.raises(learner.ServerThreadError, match="publisher thread failed: RuntimeError: injected") as e:
            server.run()
        assert "\n" not in str(e.value)
    finally:
        stop.set()
        actor.join(timeout=10)
        server.close(save=False)


def _learner_serves_its_newest_parameters(tmp_path, **kw) -> None:
    """A real learner trained by a real actor: after run() its parameter socket
    serves the newest version, equal to the agent's parameters, and the batches'
    memory was reused."""
    config = _config(
        tmp_path, batch_size=2, num_envs_per_actor=2, unroll_length=5, total_environment_frames=2 * 5 * 12, **kw
    )
    server = learner.Learner(config)
    stop = threading.Event()
    actor = threading.Thread(
        target=run_actor,
        args=(config, 0, server.unroll_address, server.params_address),
        kwargs=dict(stop=stop),
        daemon=True,
    )
    actor.start()
    try:
        server.run()
        assert server.param_version == 12
        deadline = time.monotonic() + 30
        while server.params.version != 12 and time.monotonic() < deadline:
            server.offer_snapshot()  # the last snapshot may still be on its way: it is offered again each pass
            time.sleep(0.05)
        # After run() the socket answers 'finished' (the run is over), so the snapshot
        # it served until then is read where the serving thread reads it.
        reply = wire.decode(server.params.snapshot()[1])
        assert reply.kind == "params" and reply.param_version == 12
        for name, t in server.agent.state_dict().items():
            assert np.array_equal(reply.arrays[name], t.cpu().numpy()), name
        assert server.receiver.buffers.made < 12  # reused, not one per batch
    finally:
        stop.set()
        actor.join(timeout=10)
        server.close(save=False)


def test_the_learner_publishes_its_newest_parameters_and_reuses_batch_memory(tmp_path):
    _learner_serves_its_newest_parameters(tmp_path)


# ---------------------------------------------------------------------------
# CUDA: the same, where it exists.


@needs_cuda
@pytest.mark.parametrize("use_lstm", [False, True])
def test_cuda_float32_learn_step_is_bit_identical_to_the_previous_implementation(tmp_path, use_lstm, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # the same kernels for both runs
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    _assert_bit_identical(_config(tmp_path, use_lstm=use_lstm, lstm_size=8), "cuda", lstm=8 if use_lstm else 0)


@needs_cuda
def test_cuda_bfloat16_learn_step_stays_close_to_float32(tmp_path):
    _, _, f32 = _run_steps(learner.learn_step, _config(tmp_path), "cuda")
    bf16, _, bf = _run_steps(learner.learn_step, _config(tmp_path, learner_dtype="bfloat16"), "cuda")
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    for s, r in zip(bf, f32):
        assert s["total_loss"] == pytest.approx(r["total_loss"], rel=0.05, abs=0.05)


@needs_cuda
def test_cuda_batch_buffers_are_pinned():
    batch = _host_batches(1, pin=True)[0]
    assert all(t.is_pinned() for t in batch.values())


@needs_cuda
def test_cuda_feed_copies_the_next_batch_ahead_and_releases_after_the_copy():
    hosts = _host_batches(3, pin=True)
    feed, taken, released = _feed_from(list(hosts), "cuda")
    first = feed.next(0.0)
    assert first["observation"].is_cuda and first["reward"][0].tolist() == [0, 1]
    assert len(taken) == 2 and released == []  # the second batch's copy is under way
    second = feed.next(0.0)
    assert released == [hosts[0]] and len(taken) == 3
    for t in hosts[0].values():  # given back, so it may be reused: the device copy is its own
        t.zero_()
    assert first["reward"][0].tolist() == [0, 1] and first["core_state_0"][:, 0].tolist() == [0, 1]
    assert second["reward"][0].tolist() == [10, 11] and second["core_state_0"][:, 0].tolist() == [10, 11]
    third = feed.next(0.0)
    assert third["reward"][0].tolist() == [20, 21]
    assert feed.next(0.0) is None and released == hosts


@needs_cuda
def test_cuda_snapshot_is_the_parameters_at_the_offer():
    net = torch.nn.Linear(64, 64).cuda()
    stop, published = threading.Event(), []
    publisher = SnapshotPublisher(
        net.state_dict(),
        lambda arrays, version: published.append((version, {k: v.clone() for k, v in arrays.items()})),
        stop,
        torch.device("cuda"),
    )
    publisher.start()
    try:
        expected = {k: v.cpu() for k, v in net.state_dict().items()}
        assert publisher.offer(1)
        with torch.no_grad():
            for _ in range(100):  # queued behind the snapshot's device-side copy
                net.weight.add_(1.0)
        assert publisher.idle.wait(10)
    finally:
        stop.set()
        publisher.join(10)
    version, arrays = published[0]
    assert version == 1 and all(torch.equal(arrays[k], expected[k]) for k in expected)


@needs_cuda
def test_cuda_learner_publishes_its_newest_parameters_and_reuses_batch_memory(tmp_path):
    _learner_serves_its_newest_parameters(tmp_path, device="cuda")
