"""Tests for impala.unroll (layout, overlap, validation) and for how an
actor cuts a real environment's trajectory into overlapping unrolls."""

import numpy as np
import pytest
import torch

from impala import envs, unroll
from impala.actor import LockStep
from impala.envs.gym import GymEnvironment
from impala.nets import Agent
from impala.unroll import UnrollError, new_unroll, next_unroll, unroll_spec, validate

T = 5
OBS = (4, 84, 84)
A = 6
H = 8
TIME_MAJOR = ("observation", "reward", "done", "episode_return", "episode_step", "action", "policy_logits")


def _spec(T=T, state_sizes=(H, H)):
    return unroll_spec(T, OBS, np.uint8, A, state_sizes)


def _filled(spec, num_envs, rng):
    """An unroll with every entry random (so copies and slices are checkable)."""
    out = new_unroll(spec, num_envs)
    for array in out.values():
        if array.dtype == np.bool_:
            array[...] = rng.random(array.shape) < 0.5
        elif np.issubdtype(array.dtype, np.integer):
            array[...] = rng.integers(0, 100, array.shape)
        else:
            array[...] = rng.standard_normal(array.shape)
    return out


# ---------------------------------------------------------------------------
# Layout.


def test_unroll_spec_layout():
    spec = _spec()
    assert list(spec) == [*TIME_MAJOR, "core_state_0", "core_state_1"]
    assert spec["observation"] == (np.dtype(np.uint8), (T + 1, *OBS), True)
    assert spec["reward"] == (np.dtype(np.float32), (T + 1,), True)
    assert spec["done"] == (np.dtype(np.bool_), (T + 1,), True)
    assert spec["episode_return"] == (np.dtype(np.float32), (T + 1,), True)
    assert spec["episode_step"] == (np.dtype(np.int32), (T + 1,), True)
    assert spec["action"] == (np.dtype(np.int64), (T + 1,), True)
    assert spec["policy_logits"] == (np.dtype(np.float32), (T + 1, A), True)
    assert spec["core_state_0"] == spec["core_state_1"] == (np.dtype(np.float32), (H,), False)
    # No LSTM, no state arrays; vector observations in float32.
    plain = unroll_spec(3, (4,), "float32", 2)
    assert list(plain) == list(TIME_MAJOR)
    assert plain["observation"] == (np.dtype(np.float32), (4, 4), True)


def test_new_unroll_shapes_and_zeros():
    spec = _spec()
    u = new_unroll(spec, 3)
    assert set(u) == set(spec)
    assert u["observation"].shape == (T + 1, 3, *OBS) and u["observation"].dtype == np.uint8
    assert u["policy_logits"].shape == (T + 1, 3, A)
    for name in ("reward", "done", "episode_return", "episode_step", "action"):
        assert u[name].shape == (T + 1, 3) and u[name].dtype == spec[name][0]
    assert u["core_state_0"].shape == u["core_state_1"].shape == (3, H)
    assert all(not a.any() for a in u.values())
    assert validate(u, spec) == 3


def test_next_unroll_overlaps_by_one_step_in_fresh_arrays():
    spec = _spec()
    rng = np.random.default_rng(0)
    previous = _filled(spec, 3, rng)
    saved = {k: v.copy() for k, v in previous.items()}
    nxt = next_unroll(spec, previous)
    assert validate(nxt, spec) == 3
    for name in TIME_MAJOR:
        np.testing.assert_array_equal(nxt[name][0], previous[name][-1])
        assert not nxt[name][1:].any(), name
    for name in ("core_state_0", "core_state_1"):  # the actor writes these itself
        assert not nxt[name].any()
    for name in spec:
        assert not np.shares_memory(nxt[name], previous[name]), name
    # The previous unroll is untouched, and writing either one leaves the other alone.
    for name in spec:
        np.testing.assert_array_equal(previous[name], saved[name])
    nxt["observation"][0] = 255 - nxt["observation"][0]
    previous["reward"][-1] += 1.0
    np.testing.assert_array_equal(previous["observation"], saved["observation"])
    assert nxt["reward"][0, 0] == saved["reward"][-1, 0]


# ---------------------------------------------------------------------------
# Validation.


def _one_line_error(arrays, spec, *names):
    with pytest.raises(UnrollError) as info:
        validate(arrays, spec)
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message
    return message


def test_validate_accepts_a_right_unroll():
    spec = _spec()
    assert validate(_filled(spec, 2, np.random.default_rng(0)), spec) == 2
    no_state = unroll_spec(T, (4,), np.float32, 2)
    assert validate(new_unroll(no_state, 1), no_state) == 1


def test_validate_missing_and_extra_arrays():
    spec = _spec()
    u = new_unroll(spec, 2)
    del u["policy_logits"]
    _one_line_error(u, spec, "policy_logits", "missing")
    u = new_unroll(spec, 2)
    u["surprise"] = np.zeros((T + 1, 2), np.float32)
    _one_line_error(u, spec, "surprise")
    u = new_unroll(spec, 2)
    del u["core_state_1"]  # e.g. an actor without LSTM talking to an LSTM learner
    _one_line_error(u, spec, "core_state_1")


@pytest.mark.parametrize(
    "name,dtype",
    [
        ("observation", np.float32),
        ("reward", np.float64),
        ("done", np.uint8),
        ("episode_step", np.int64),
        ("action", np.int32),
        ("core_state_0", np.float16),
    ],
)
def test_validate_wrong_dtype(name, dtype):
    spec = _spec()
    u = new_unroll(spec, 2)
    u[name] = u[name].astype(dtype)
    _one_line_error(u, spec, repr(name))


@pytest.mark.parametrize(
    "name,shape",
    [
        ("observation", (T + 1, 2, 4, 84, 83)),
        ("observation", (T, 2, *OBS)),
        ("policy_logits", (T + 1, 2, A + 1)),
        ("action", (T + 2, 2)),
        ("episode_return", (T + 1, 2, 1)),
        ("core_state_1", (2, H + 1)),
    ],
)
def test_validate_wrong_shape(name, shape):
    spec = _spec()
    u = new_unroll(spec, 2)
    u[name] = np.zeros(shape, spec[name][0])
    _one_line_error(u, spec, repr(name))


@pytest.mark.parametrize("name", ["observation", "done", "policy_logits", "core_state_0"])
def test_validate_inconsistent_env_counts(name):
    spec = _spec()
    u = new_unroll(spec, 3)
    u[name] = new_unroll(spec, 2)[name]  # 2 envs where the rest has 3
    _one_line_error(u, spec, repr(name))


def test_validate_bad_reward_array():
    spec = _spec()
    u = new_unroll(spec, 2)
    u["reward"] = np.zeros((T + 1,), np.float32)
    _one_line_error(u, spec, "reward")
    u["reward"] = np.zeros((T + 1, 0), np.float32)
    _one_line_error(u, spec, "reward")


# ---------------------------------------------------------------------------
# An actor cutting a real environment into unrolls.


def _actor_unrolls(make_env, seeds, num_unrolls=2, unroll_length=T, torch_seed=0):
    torch.manual_seed(torch_seed)
    environments = [make_env(seed) for seed in seeds]
    first = environments[0]
    agent = Agent(
        first.observation_shape, first.num_actions, network="mlp", use_lstm=True, lstm_size=H, hidden_sizes=(16,)
    )
    spec = unroll_spec(
        unroll_length,
        first.observation_shape,
        first.observation_dtype,
        first.num_actions,
        [s.shape[1] for s in agent.initial_state(1)],
    )
    buffer = new_unroll(spec, len(environments))
    stepper = LockStep(environments)
    stepper.initial(buffer)
    state = agent.initial_state(len(environments))
    unrolls = []
    for _ in range(num_unrolls):  # as run_actor does
        initial_state = [s.numpy().copy() for s in state]
        state = stepper.act(agent, buffer, state, unroll_length)
        arrays = dict(buffer)
        arrays.update({f"core_state_{k}": s for k, s in enumerate(initial_state)})
        assert validate(arrays, spec) == len(environments)
        unrolls.append(arrays)
        buffer = next_unroll(spec, buffer)
    stepper.close()
    return agent, spec, unrolls


def _replay(make_env, seed, unrolls, i):
    """Replays env i's actions on an identically seeded env and checks every output."""
    env = make_env(seed)
    start = env.initial()
    np.testing.assert_array_equal(unrolls[0]["observation"][0, i], start.observation)
    assert (unrolls[0]["done"][0, i], unrolls[0]["episode_step"][0, i]) == (False, 0)
    for u in unrolls:
        for t in range(1, u["action"].shape[0]):
            out = env.step(int(u["action"][t, i]))
            np.testing.assert_array_equal(u["observation"][t, i], out.observation)
            assert u["reward"][t, i] == np.float32(out.reward)
            assert u["done"][t, i] == out.done
            assert u["episode_return"][t, i] == np.float32(out.episode_return)
            assert u["episode_step"][t, i] == out.episode_step
    env.close()


def _cartpole(seed):
    return envs.make("CartPole-v1", seed=seed)


def _short_cartpole(seed):
    return GymEnvironment.from_level("CartPole-v1", seed=seed, max_episode_steps=3)


@pytest.mark.parametrize("make_env", [_cartpole, _short_cartpole], ids=["cartpole", "cartpole_3_steps"])
def test_actor_unrolls_overlap_and_follow_the_actions(make_env):
    seeds = (0, 1)
    agent, spec, (first, second) = _actor_unrolls(make_env, seeds)
    # Step 0 of the second unroll repeats step T of the first.
    for name in TIME_MAJOR:
        np.testing.assert_array_equal(second[name][0], first[name][T], err_msg=name)
    # Actions are in range, and every env output t >= 1 came from action t.
    for u in (first, second):
        assert ((u["action"][1:] >= 0) & (u["action"][1:] < agent.num_actions)).all()
    for i, seed in enumerate(seeds):
        _replay(make_env, seed, [first, second], i)
    # The environments differ (different seeds), so columns were not mixed up.
    assert not np.array_equal(first["observation"][0, 0], first["observation"][0, 1])

    # The recorded behaviour logits are what the agent gives when run the way the
    # learner runs it: over env outputs 0..T-1 from the unroll's initial core
    # state, with last actions/rewards/dones; output t picked action t + 1.
    # This holds across the cut too (the second unroll starts from the carried state).
    with torch.no_grad():
        for u in (first, second):
            output, _ = agent(
                torch.from_numpy(u["observation"][:-1]),
                torch.from_numpy(u["action"][:-1]),
                torch.from_numpy(u["reward"][:-1]),
                torch.from_numpy(u["done"][:-1]),
                (torch.from_numpy(u["core_state_0"]), torch.from_numpy(u["core_state_1"])),
            )
            np.testing.assert_allclose(output.policy_logits.numpy(), u["policy_logits"][1:], rtol=1e-5, atol=1e-6)
    assert not np.allclose(second["core_state_0"], 0.0)  # the state really was carried
    assert not first["core_state_0"].any()


def test_actor_unrolls_mark_episode_ends():
    _, _, unrolls = _actor_unrolls(_short_cartpole, (0,), num_unrolls=2)
    # Steps 1..10 of the trajectory (step 0 of the second unroll is the overlap).
    steps = [(u, t) for k, u in enumerate(unrolls) for t in range(1, T + 1)]
    for global_step, (u, t) in enumerate(steps, start=1):
        ended = global_step % 3 == 0  # 3-step episodes: CartPole cannot fall in 3 steps
        assert u["done"][t, 0] == ended, global_step
        assert u["reward"][t, 0] == 1.0
        if ended:  # the finished episode's totals, and already the next episode's start
            assert (u["episode_step"][t, 0], u["episode_return"][t, 0]) == (3, 3.0)
            assert np.all(np.abs(u["observation"][t, 0]) <= 0.05)
        else:
            assert u["episode_step"][t, 0] == global_step % 3
            assert u["episode_return"][t, 0] == float(global_step % 3)
    # Done flags where expected: first unroll t=3; second unroll t=1 (step 6) and t=4 (step 9).
    assert np.flatnonzero(unrolls[0]["done"][:, 0]).tolist() == [3]
    assert np.flatnonzero(unrolls[1]["done"][:, 0]).tolist() == [1, 4]
    # What the learner would log as finished episodes.
    returns = [float(r) for u in unrolls for r in u["episode_return"][1:, 0][u["done"][1:, 0]]]
    assert returns == [3.0, 3.0, 3.0]


# ---------------------------------------------------------------------------
# One step definition (impala/step.py) behind every layout.


def test_unrolls_and_env_worker_slots_derive_from_the_step_definition():
    from impala import step
    from impala.env_worker import SharedSteps
    from impala.envs import StepOutput

    spec = step.EnvSpec((3, 4), np.dtype(np.uint8), 5, instruction_length=7)
    fields = step.fields(spec)
    # The environment's fields are StepOutput's, instruction only where the level has one.
    assert set(step.environment_fields(spec)) == set(StepOutput._fields)
    plain = step.EnvSpec((3, 4), np.dtype(np.uint8), 5)
    assert set(step.environment_fields(plain)) == set(StepOutput._fields) - {"instruction"}
    assert {n for n, f in fields.items() if f.source == step.AGENT} == {"action", "policy_logits"}
    layout = unroll.spec_of(9, spec, (16, 16))
    assert layout == unroll_spec(9, (3, 4), np.uint8, 5, (16, 16), instruction_length=7)
    assert {name for name, (_, _, time_major) in layout.items() if time_major} == set(fields)
    for name, field in fields.items():
        assert layout[name] == (field.dtype, (10, *field.shape), True)
    shared = SharedSteps(spec, 3)
    try:
        assert set(shared.arrays) == {*step.environment_fields(spec), "action"}
        for name, array in shared.arrays.items():
            assert (array.dtype, array.shape) == (fields[name].dtype, (3, *fields[name].shape))
        output = StepOutput(1.5, True, np.full((3, 4), 9, np.uint8), 2.5, 4, np.arange(7, dtype=np.int32))
        shared.write(1, output)
        for name in StepOutput._fields:
            np.testing.assert_array_equal(shared.arrays[name][1], getattr(output, name))
        assert not shared.arrays["observation"][0].any()
    finally:
        shared.close(unlink=True)
