"""DeepMind Lab: the stand-in engine's strictness, the environment wrapper against it,
level naming, instructions through actor and learner, and training end to end.

The real engine cannot be built here; `tests/deepmind_lab/` stands in for it and is
put on sys.path (PYTHONPATH for subprocesses) by these tests only."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from impala import checkpoint, dmlab30, envs, step, unroll
from impala.actor import LockStep
from impala.actor_host import ActorHost
from impala.config import Config
from impala.envs import dmlab
from impala.learner import learn_step
from impala.metrics import read_jsonl
from impala.nets import Agent, InstructionEncoder
from impala.receiver import BatchAssembler
from tests import cli

TESTS = Path(__file__).resolve().parent  # holds the deepmind_lab stand-in package
SMALL = dict(width=32, height=24)  # the smallest frames the shallow torso takes


@pytest.fixture
def lab(monkeypatch):
    """The stand-in `deepmind_lab` module, importable for this test only."""
    monkeypatch.syspath_prepend(str(TESTS))
    sys.modules.pop("deepmind_lab", None)
    import deepmind_lab

    yield deepmind_lab
    sys.modules.pop("deepmind_lab", None)


@pytest.fixture
def spy(lab, monkeypatch):
    """Records what the wrapper hands the engine."""
    calls = {"init": [], "step": []}

    class SpyLab(lab.Lab):
        def __init__(self, *args, **kwargs):
            calls["init"].append((args, kwargs))
            super().__init__(*args, **kwargs)

        def step(self, action, num_steps=1):
            calls["step"].append((action.copy(), action.dtype, num_steps))
            return super().step(action, num_steps=num_steps)

    monkeypatch.setattr(lab, "Lab", SpyLab)
    return calls


def with_stand_in() -> dict:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(TESTS) + (os.pathsep + path if path else "")}


# ---------------------------------------------------------------------------
# The stand-in follows the documented API strictly.


def test_stand_in_wants_string_config(lab):
    lab.Lab("seekavoid_arena_01", ["RGB_INTERLEAVED"], config={"width": "32", "height": "24"})
    for config in ({"width": 32}, {"width": "32", "height": 24.0}, {1: "x"}):
        with pytest.raises(TypeError, match="str"):
            lab.Lab("seekavoid_arena_01", ["RGB_INTERLEAVED"], config=config)
    with pytest.raises(ValueError):
        lab.Lab("seekavoid_arena_01", ["NOT_AN_OBSERVATION"])
    with pytest.raises(ValueError):
        lab.Lab("seekavoid_arena_01", ["RGB_INTERLEAVED"], renderer="gpu")
    with pytest.raises(RuntimeError, match="Failed to find"):
        lab.Lab("contributed/dmlab30/no_such_level", ["RGB_INTERLEAVED"])
    with pytest.raises(RuntimeError, match="held out"):
        lab.Lab("contributed/dmlab30/rooms_collect_good_objects_test", ["RGB_INTERLEAVED"])
    lab.Lab(
        "contributed/dmlab30/rooms_collect_good_objects_test",
        ["RGB_INTERLEAVED"],
        config={"allowHoldOutLevels": "true"},
    )


def test_stand_in_wants_intc_actions_of_shape_7(lab):
    env = lab.Lab("seekavoid_arena_01", ["RGB_INTERLEAVED"])
    env.reset(seed=1)
    env.step(np.zeros(7, np.intc), num_steps=4)
    for action in (
        np.zeros(7, np.int64),
        np.zeros(7, np.float32),
        np.zeros((1, 7), np.intc),
        np.zeros(6, np.intc),
        [0] * 7,
    ):
        with pytest.raises(TypeError, match="intc"):
            env.step(action)
    with pytest.raises(ValueError):
        env.step(np.array([0, 0, 2, 0, 0, 0, 0], np.intc))  # outside the action spec
    with pytest.raises(ValueError):
        env.step(np.zeros(7, np.intc), num_steps=0)


def test_stand_in_observations_and_step_only_while_running(lab):
    env = lab.Lab("seekavoid_arena_01", ["RGB_INTERLEAVED", "INSTR"], config={"width": "32", "height": "24"})
    assert not env.is_running()
    with pytest.raises(RuntimeError, match="wrong status"):
        env.observations()
    with pytest.raises(RuntimeError, match="wrong status"):
        env.step(np.zeros(7, np.intc))
    env.reset(seed=5)
    assert env.observations()["RGB_INTERLEAVED"].shape == (24, 32, 3)
    frames = 0
    while env.is_running():
        env.step(np.zeros(7, np.intc), num_steps=3)
        frames += 3
    assert env.num_steps() == lab.episode_frames("seekavoid_arena_01") <= frames
    with pytest.raises(RuntimeError, match="wrong status"):
        env.observations()
    with pytest.raises(RuntimeError, match="wrong status"):
        env.step(np.zeros(7, np.intc))
    env.reset(seed=6)
    env.observations()
    env.close()
    assert not env.is_running()  # the one call allowed after close()
    for call in (env.observations, env.action_spec, lambda: env.reset(seed=1), env.close):
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_stand_in_rewards_are_deterministic_and_level_dependent(lab):
    def episode_return(level, action):
        env = lab.Lab(level, ["RGB_INTERLEAVED"], config={"allowHoldOutLevels": "true"})
        env.reset(seed=1)
        total = 0.0
        while env.is_running():
            total += env.step(np.array(action, np.intc), num_steps=4)
        return total

    forward, look_left = dmlab.ACTION_SET[0], dmlab.ACTION_SET[4]
    level0 = "contributed/dmlab30/" + dmlab30.TRAIN_LEVELS[0]  # index 0: rewards moving forward
    assert episode_return(level0, forward) == lab.episode_frames(level0) * lab.reward_per_frame(level0) > 0
    assert episode_return(level0, look_left) == 0
    level1 = "contributed/dmlab30/" + dmlab30.TEST_LEVELS[1]  # index 1: rewards looking left
    assert episode_return(level1, look_left) == lab.episode_frames(level1) * lab.reward_per_frame(level1) > 0
    assert lab.reward_per_frame(level0) != lab.reward_per_frame(level1)


# ---------------------------------------------------------------------------
# The wrapper against the stand-in.


def test_wrapper_maps_actions_to_intc_arrays_with_repeats(spy):
    env = envs.make("dmlab:seekavoid_arena_01", seed=1, num_action_repeats=3, **SMALL)
    assert env.num_actions == len(dmlab.ACTION_SET) == 9
    env.initial()
    for a in range(env.num_actions):
        env.step(a)
    for a, (action, dtype, num_steps) in enumerate(spy["step"]):
        assert dtype == np.intc and action.shape == (7,) and num_steps == 3
        np.testing.assert_array_equal(action, dmlab.ACTION_SET[a])
    for bad in (-1, 9):
        with pytest.raises(ValueError):
            env.step(bad)
    env.close()
    env.close()  # closing twice is harmless (the engine itself refuses a second close)


def test_wrapper_config_is_strings_as_the_original_sets_it(spy, tmp_path):
    envs.make("rooms_watermaze", seed=1, num_action_repeats=4).close()
    (level, observations), kwargs = spy["init"][-1]
    assert level == "contributed/dmlab30/rooms_watermaze"
    assert observations == ["RGB_INTERLEAVED", "INSTR"]  # on every level, as the original
    assert kwargs["config"] == {"width": "96", "height": "72", "logLevel": "WARN"}
    assert kwargs["renderer"] == "software" and kwargs["level_cache"] is None

    envs.make(
        "dmlab:contributed/dmlab30/language_select_located_object",
        seed=1,
        training=False,
        width=32,
        height=24,
        dataset_path="/data/brady",
        renderer="hardware",
        level_cache_dir=str(tmp_path / "cache"),
    ).close()
    (level, observations), kwargs = spy["init"][-1]
    assert level == "contributed/dmlab30/language_select_located_object"
    assert observations == ["RGB_INTERLEAVED", "INSTR"]
    assert kwargs["config"] == {
        "width": "32",
        "height": "24",
        "logLevel": "WARN",
        "datasetPath": "/data/brady",
        "allowHoldOutLevels": "true",
        "mixerSeed": str(0x600D5EED),
    }
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in kwargs["config"].items())
    assert kwargs["renderer"] == "hardware" and isinstance(kwargs["level_cache"], dmlab.LevelCache)


def test_wrapper_observations_are_chw_uint8_copies(lab):
    env = envs.make("rooms_watermaze", seed=2, num_action_repeats=4, **SMALL)
    assert env.observation_shape == (3, 24, 32) and env.observation_dtype == np.uint8
    first = env.initial()
    assert first.observation.shape == (3, 24, 32) and first.observation.dtype == np.uint8
    assert first.observation.flags.c_contiguous
    assert (first.observation[0] == 8 * dmlab30.TRAIN_LEVELS.index("rooms_watermaze")).all()  # R: level
    assert (first.observation[1] == 0).all()  # G: frames into the episode
    kept = first.observation.copy()
    second = env.step(0)
    assert (second.observation[1] == 4).all()
    np.testing.assert_array_equal(first.observation, kept)  # not overwritten by the next step
    env.close()


def test_wrapper_auto_resets_as_step_output_says(lab):
    level = "rooms_collect_good_objects_train"  # index 0: moving forward earns 1 per frame
    path = "contributed/dmlab30/" + level
    env = envs.make(level, seed=3, num_action_repeats=4, **SMALL)
    out = env.initial()
    assert out == envs.StepOutput(0.0, False, out.observation, 0.0, 0, out.instruction)
    steps = lab.episode_frames(path) // 4
    total = 0.0
    for t in range(1, steps + 1):
        out = env.step(0)  # forward
        total += out.reward
        assert out.reward == 4 * lab.reward_per_frame(path)
        assert out.done == (t == steps)
        assert out.episode_step == t and out.episode_return == total
    # The last step ends the episode: its totals, and already the next episode's frame.
    assert (out.observation[1] == 0).all()
    out = env.step(4)  # looking left earns nothing here
    assert (out.reward, out.done, out.episode_return, out.episode_step) == (0.0, False, 0.0, 1)
    env.close()


def test_wrapper_seeds_each_episode_from_its_own_seed(lab):
    def instructions(seed, episodes=6):
        env = envs.make("language_execute_random_task", seed=seed, num_action_repeats=8, **SMALL)
        seen = [tuple(env.initial().instruction)]
        while len(seen) < episodes:
            out = env.step(0)
            if out.done:
                seen.append(tuple(out.instruction))
        env.close()
        return seen

    assert instructions(7) == instructions(7)
    assert instructions(7) != instructions(8)
    assert len(set(instructions(7))) > 1  # a new seed for every episode


def test_language_levels_give_tokenised_instructions(lab):
    env = envs.make("language_select_described_object", seed=1, num_action_repeats=4, **SMALL)
    out = env.initial()
    text = env._lab.observations()["INSTR"]
    assert text in lab.INSTRUCTIONS
    np.testing.assert_array_equal(out.instruction, dmlab.tokenize(text))
    assert out.instruction.dtype == np.int32 and out.instruction.shape == (env.instruction_length,)
    env.close()
    other = envs.make("rooms_watermaze", seed=1, num_action_repeats=4, **SMALL)
    assert other.instruction_length == env.instruction_length  # one layout for the whole suite
    assert not other.initial().instruction.any()  # no instruction on this level: INSTR is empty
    other.close()


def test_tokenize():
    tokens = dmlab.tokenize("Pick the red hat")
    assert tokens.shape == (dmlab.MAX_INSTRUCTION_WORDS,) and tokens.dtype == np.int32
    assert (tokens[:4] > 0).all() and (tokens[:4] <= dmlab.NUM_HASH_BUCKETS).all() and not tokens[4:].any()
    assert tokens[1] == dmlab.tokenize("the")[0] == dmlab.word_id("the")  # stable across calls
    np.testing.assert_array_equal(dmlab.tokenize(b"Pick the red hat"), tokens)
    assert not dmlab.tokenize("").any() and not dmlab.tokenize("  ").any()
    long = dmlab.tokenize(" ".join(["word"] * 50), max_words=8)
    assert long.shape == (8,) and (long == dmlab.word_id("word")).all()
    assert InstructionEncoder().embedding.num_embeddings == dmlab.NUM_HASH_BUCKETS + 1


def test_level_cache_is_written_then_reused(lab, tmp_path):
    cache_dir = tmp_path / "cache"

    def play(seed):
        env = envs.make(
            "explore_goal_locations_small", seed=seed, num_action_repeats=8, level_cache_dir=str(cache_dir), **SMALL
        )
        env.initial()
        for _ in range(30):
            env.step(0)
        hits = env._lab.cache_hits
        env.close()
        return hits

    assert play(1) >= 0
    written = sorted(p.name for p in cache_dir.iterdir())
    assert written and not any(name.startswith(".") for name in written)  # no temporary files left
    assert play(1) > 0  # the same seeds: every map comes from the cache
    cache = dmlab.LevelCache(str(cache_dir))
    assert not cache.fetch("../escape", str(tmp_path / "x")) and not cache.fetch("missing", str(tmp_path / "x"))


def test_level_names():
    for name in (
        "dmlab30",
        "rooms_watermaze",
        "rooms_collect_good_objects_test",
        "dmlab:seekavoid_arena_01",
        "dmlab:contributed/dmlab30/rooms_watermaze",
    ):
        assert envs.resolve_level(name) == "dmlab"
    assert dmlab.level_path("rooms_watermaze") == "contributed/dmlab30/rooms_watermaze"
    assert dmlab.level_path("dmlab:rooms_watermaze") == "contributed/dmlab30/rooms_watermaze"
    assert dmlab.level_path("dmlab:seekavoid_arena_01") == "seekavoid_arena_01"
    # Actor i plays DMLab-30 training level i mod 30, in the original's order.
    assert [envs.level_for_task("dmlab30", i) for i in (0, 1, 29, 30, 61)] == [
        "rooms_collect_good_objects_train",
        "rooms_exploit_deferred_effects_train",
        "explore_object_rewards_many",
        "rooms_collect_good_objects_train",
        "rooms_exploit_deferred_effects_train",
    ]
    assert envs.level_for_task("rooms_watermaze", 5) == "rooms_watermaze"
    for name, hint in (("rooms_watermase", "rooms_watermaze"), ("dmlab_30", "dmlab30")):
        with pytest.raises(envs.UnknownLevelError, match=hint) as e:
            envs.resolve_level(name)
        assert "\n" not in str(e.value)
    with pytest.raises(envs.UnknownLevelError, match="names no level"):
        envs.resolve_level("dmlab:")


def test_unknown_dmlab_level_is_a_one_line_error(lab):
    with pytest.raises(envs.UnknownLevelError, match="rooms_watermaze") as e:
        envs.make("dmlab:contributed/dmlab30/rooms_watermase", seed=1)
    assert "\n" not in str(e.value) and "cannot load" in str(e.value)


def test_missing_engine_is_a_one_line_error_in_process(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepmind_lab", None)  # import deepmind_lab -> ImportError
    with pytest.raises(envs.EngineMissingError) as e:
        envs.make("dmlab30", seed=1)
    assert "\n" not in str(e.value) and "docs/dmlab.md" in str(e.value)


def test_missing_engine_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        cli.command("--level_name=dmlab30", f"--logdir={tmp_path}"),
        cwd=cli.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "DeepMind Lab is not installed" in result.stderr and "docs/dmlab.md" in result.stderr
    assert "docker build --target dmlab" in result.stderr


# ---------------------------------------------------------------------------
# Instructions through the unroll, the actor and the learner.


def test_unroll_layout_gets_instructions_only_when_asked():
    plain = unroll.unroll_spec(5, (4,), np.float32, 2, (8, 8))
    assert "instruction" not in plain
    spec = unroll.unroll_spec(5, (3, 24, 32), np.uint8, 9, (8, 8), instruction_length=32)
    assert spec["instruction"] == (np.dtype(np.int32), (6, 32), True)
    assert {k: v for k, v in spec.items() if k != "instruction"} == unroll.unroll_spec(
        5, (3, 24, 32), np.uint8, 9, (8, 8)
    )


def test_instruction_encoder_reads_up_to_the_last_word():
    torch.manual_seed(0)
    encoder = InstructionEncoder()
    tokens = torch.tensor([[5, 9, 2, 0, 0], [0, 0, 0, 0, 0], [5, 9, 2, 0, 0], [7, 0, 0, 0, 0]])
    out = encoder(tokens)
    assert out.shape == (4, 64)
    for row, length in ((0, 3), (3, 1)):
        alone, _ = encoder.lstm(encoder.embedding(tokens[row : row + 1, :length]))
        torch.testing.assert_close(out[row], alone[0, -1])  # padding after the words changes nothing
    assert not out[1].any()  # an empty instruction: zeros
    torch.testing.assert_close(out[0], out[2])
    assert not encoder(torch.zeros(3, 5, dtype=torch.int32)).any()
    # Core input = torso + reward + one-hot action + instruction; none without the encoder.
    with_encoder = Agent((4,), 3, network="mlp", use_lstm=False, hidden_sizes=(8,), instruction_length=5)
    without = Agent((4,), 3, network="mlp", use_lstm=False, hidden_sizes=(8,))
    assert with_encoder.policy.in_features == without.policy.in_features + 64
    assert without.instruction is None and without.instruction_length == 0
    inputs = (
        torch.zeros(2, 4, 4),
        torch.zeros(2, 4, dtype=torch.long),
        torch.zeros(2, 4),
        torch.zeros(2, 4, dtype=torch.bool),
    )
    with pytest.raises(ValueError, match="no instruction encoder"):
        without(*inputs, instruction=torch.zeros(2, 4, 5, dtype=torch.int32))
    output, _ = with_encoder(*inputs, instruction=tokens[:, None].expand(4, 2, 5).transpose(0, 1).reshape(2, 4, 5))
    assert output.policy_logits.shape == (2, 4, 3)


def test_actor_unrolls_carry_instructions_that_the_learner_trains_on(lab, tmp_path):
    torch.manual_seed(0)
    level, T = "language_answer_quantitative_question", 6
    environments = [envs.make(level, seed=s, num_action_repeats=4, **SMALL) for s in (1, 2)]
    first = environments[0]
    agent = Agent(
        first.observation_shape,
        first.num_actions,
        network="shallow",
        lstm_size=16,
        instruction_length=envs.instruction_length(first),
    )
    spec = unroll.unroll_spec(
        T,
        first.observation_shape,
        first.observation_dtype,
        first.num_actions,
        [s.shape[1] for s in agent.initial_state(1)],
        instruction_length=envs.instruction_length(first),
    )
    buffer = unroll.new_unroll(spec, 2)
    starts = [env.initial() for env in environments]
    for i, start in enumerate(starts):
        step.write(buffer, (0, i), start)
    state = agent.initial_state(2)
    initial_state = [s.numpy().copy() for s in state]
    LockStep(environments).act(agent, buffer, state, T)
    arrays = dict(buffer)
    arrays.update({f"core_state_{k}": s for k, s in enumerate(initial_state)})
    assert unroll.validate(arrays, spec) == 2
    for i, start in enumerate(starts):
        np.testing.assert_array_equal(arrays["instruction"][0, i], start.instruction)
        assert arrays["instruction"][0, i].any()
    # Replaying the actions on fresh envs gives the same instructions step by step.
    for i, seed in enumerate((1, 2)):
        env = envs.make(level, seed=seed, num_action_repeats=4, **SMALL)
        env.initial()
        for t in range(1, T + 1):
            np.testing.assert_array_equal(
                arrays["instruction"][t, i], env.step(int(arrays["action"][t, i])).instruction
            )
        env.close()

    config = Config(
        level_name=level, network="shallow", lstm_size=16, unroll_length=T, batch_size=2, logdir=str(tmp_path), **SMALL
    )
    batch = {k: torch.from_numpy(v) for k, v in BatchAssembler(spec, 2).add(arrays)[0].items()}
    before = agent.instruction.embedding.weight.detach().clone()
    stats = learn_step(agent, torch.optim.SGD(agent.parameters(), lr=0.1), batch, config)
    assert np.isfinite(stats["total_loss"])
    assert not torch.equal(before, agent.instruction.embedding.weight)  # the encoder learns too
    with pytest.raises(ValueError, match="instruction"):
        agent(batch["observation"], batch["action"], batch["reward"], batch["done"])
    for env in environments:
        env.close()


def test_env_workers_carry_instructions_to_the_unroll_and_the_agent(lab):
    """The actor host on a language level: each step's instruction goes through the
    workers' shared memory into the unroll, and the agent reads it."""
    torch.manual_seed(0)
    level, T, seeds = "language_answer_quantitative_question", 6, [1, 2, 3]
    make_env = functools.partial(envs.make, level, num_action_repeats=4, **SMALL)  # spawned workers call it
    with ActorHost(make_env, seeds, num_workers=2) as host:
        assert host.spec.instruction_length > 0
        agent = Agent(
            host.spec.observation_shape,
            host.spec.num_actions,
            network="shallow",
            lstm_size=16,
            instruction_length=host.spec.instruction_length,
        )
        seen = []
        agent.instruction.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
        spec = unroll.spec_of(T, host.spec, [s.shape[1] for s in agent.initial_state(1)])
        buffer = unroll.new_unroll(spec, len(seeds))
        host.initial(buffer)
        host.act(agent, buffer, agent.initial_state(len(seeds)), T)
    assert len(seen) >= T and all(tokens.any() for tokens in seen)  # every forward pass read instructions
    assert {tuple(row) for tokens in seen for row in tokens.reshape(-1, tokens.shape[-1]).tolist()} == {
        tuple(row) for row in buffer["instruction"][:-1].reshape(-1, spec["instruction"][1][-1]).tolist()
    }
    for i, seed in enumerate(seeds):  # replaying the actions gives the unroll's steps, instructions included
        env = make_env(seed=seed)
        np.testing.assert_array_equal(buffer["instruction"][0, i], env.initial().instruction)
        for t in range(1, T + 1):
            out = env.step(int(buffer["action"][t, i]))
            np.testing.assert_array_equal(buffer["instruction"][t, i], out.instruction)
            np.testing.assert_array_equal(buffer["observation"][t, i], out.observation)
        env.close()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as actors and the learner run; steadier on a busy machine
    yield
    torch.set_num_threads(threads)


def test_agent_learns_the_rewarded_action_of_a_stand_in_level(lab, tmp_path, one_thread):
    """A few dozen updates on one level: the policy moves toward the rewarded actions."""
    torch.manual_seed(1)
    level, T, n = "rooms_watermaze", 10, 4  # index 3: FIRE (action 8) earns 1 per frame
    environments = [envs.make(level, seed=s, num_action_repeats=4, **SMALL) for s in range(n)]
    config = Config(
        level_name=level,
        network="shallow",
        use_lstm=False,
        unroll_length=T,
        batch_size=n,
        learning_rate=0.002,
        entropy_cost=0.001,
        logdir=str(tmp_path),
        **SMALL,
    )
    agent = Agent(
        environments[0].observation_shape,
        9,
        network="shallow",
        use_lstm=False,
        instruction_length=environments[0].instruction_length,
    )
    optimizer = torch.optim.RMSprop(agent.parameters(), lr=config.learning_rate)
    spec = unroll.unroll_spec(T, agent.observation_shape, np.uint8, 9, (), instruction_length=agent.instruction_length)
    buffer = unroll.new_unroll(spec, n)
    stepper = LockStep(environments)
    stepper.initial(buffer)

    def fire_rate(arrays):
        return float((arrays["action"][1:] == 8).mean())

    rates = []
    for _ in range(30):
        stepper.act(agent, buffer, (), T)
        rates.append(fire_rate(buffer))
        learn_step(agent, optimizer, {k: torch.from_numpy(v) for k, v in buffer.items()}, config)
        buffer = unroll.next_unroll(spec, buffer)
    assert rates[0] < 0.25 and np.mean(rates[-5:]) > 0.5, rates  # from ~1/9 at random
    for env in environments:
        env.close()


# ---------------------------------------------------------------------------
# End to end: `python -m impala.experiment` on the stand-in.


def test_dmlab30_trains_end_to_end_with_returns_per_level(tmp_path):
    logdir = tmp_path / "dmlab30"
    process = cli.start(
        "--level_name=dmlab30",
        "--network=shallow",
        "--width=32",
        "--height=24",
        "--lstm_size=16",
        "--num_actors=2",
        "--num_envs_per_actor=2",
        "--unroll_length=10",
        "--batch_size=2",
        "--total_environment_frames=1600",
        "--log_interval_s=0.5",
        "--device=cpu",
        f"--logdir={logdir}",
        env=with_stand_in(),
    )
    try:
        out, _ = process.communicate(timeout=240)
    finally:
        cli.kill_session(process.pid)
    assert process.returncode == 0, out[-3000:]
    state = checkpoint.load(checkpoint.latest(logdir))
    assert state["frames"] >= 1600 and state["level_name"] == "dmlab30"
    assert any(k.startswith("instruction.") for k in state["model"])
    rows = read_jsonl(logdir / "metrics.jsonl")
    levels = {k.split("/", 1)[1] for row in rows for k in row if k.startswith("mean_episode_return/")}
    # Actor i plays level i; how many unrolls each actor got in depends on timing.
    assert levels and levels <= {"rooms_collect_good_objects_train", "rooms_exploit_deferred_effects_train"}, rows
    # Which actors got to act before the budget was spent depends on timing too (on a
    # loaded machine one actor can fill it alone); each that acted plays its own level.
    acted = dict(re.findall(r"Actor (\d+): acting on (\w+)", out))
    assert acted, out[-3000:]
    levels_of = {"0": "rooms_collect_good_objects_train", "1": "rooms_exploit_deferred_effects_train"}
    assert acted.items() <= levels_of.items(), acted


def test_a_language_level_trains_with_env_workers(tmp_path):
    """Instructions through env workers, the actor host and a real learner."""
    logdir = tmp_path / "language"
    process = cli.start(
        "--level_name=language_answer_quantitative_question",
        "--network=shallow",
        "--width=32",
        "--height=24",
        "--lstm_size=16",
        "--num_actors=1",
        "--num_envs_per_actor=4",
        "--env_workers_per_actor=2",
        "--unroll_length=10",
        "--batch_size=2",
        "--total_environment_frames=400",
        "--log_interval_s=0.5",
        "--device=cpu",
        f"--logdir={logdir}",
        env=with_stand_in(),
    )
    try:
        out, _ = process.communicate(timeout=240)
    finally:
        cli.kill_session(process.pid)
    assert process.returncode == 0, out[-3000:]
    state = checkpoint.load(checkpoint.latest(logdir))
    assert state["frames"] >= 400  # 5 updates of 2 x 10 steps x 4 frames
    assert any(k.startswith("instruction.") for k in state["model"])
    assert "Actor 0: acting on language_answer_quantitative_question" in out


# ---------------------------------------------------------------------------
# INSTR on every level that provides it (issue 17, item 5).


def test_instr_is_requested_on_a_non_language_level_that_provides_it(spy, lab):
    env = envs.make("explore_goal_locations_small", seed=1, num_action_repeats=4, **SMALL)
    (level, observations), _ = spy["init"][-1]
    assert not dmlab30.short_name(level).startswith("language_")
    assert "INSTR" in {o["name"] for o in env._lab.observation_spec()}  # the level provides it
    assert "INSTR" in observations  # and the engine was asked for it
    env.initial()
    assert env._lab.observations()["INSTR"] == ""  # this level gives no instruction: empty words
    env.close()


def test_a_level_whose_engine_lacks_instr_opens_without_it(lab, monkeypatch):
    class NoInstr(lab.Lab):  # an engine that does not know INSTR, refusing it as Lab refuses unknown names
        def __init__(self, level, observations, **kwargs):
            if "INSTR" in observations:
                raise ValueError("Unknown observation 'INSTR'")
            super().__init__(level, observations, **kwargs)

    monkeypatch.setattr(lab, "Lab", NoInstr)
    env = envs.make("rooms_watermaze", seed=1, num_action_repeats=4, **SMALL)
    out = env.initial()
    assert env._lab._observations == ["RGB_INTERLEAVED"] and not out.instruction.any()
    env.close()
