"""Tests for scripts/bench.py's accounting: the machine's limit counts every learning
pass (fresh and replayed) and the replay buffer's sampling, measured on a real buffer."""

import math

import pytest

from impala import replay
from impala.config import Config
from tests import scripts

bench = scripts.load("bench")


def test_the_limit_counts_each_replayed_pass_and_its_sampling():
    env, inference, learner, sampling = 1000.0, 2000.0, 500.0, 10000.0
    # Without replay each agent step is acted once and learned once; the replay rate is unused.
    assert bench.machine_limit(2, env, inference, learner, 0.0, 0.0) == pytest.approx(
        2 / (1 / env + 1 / inference + 1 / learner)
    )
    # 3:1 replay: four learning passes per agent step, three of them drawn from the buffer.
    assert bench.machine_limit(2, env, inference, learner, sampling, 3.0) == pytest.approx(
        2 / (1 / env + 1 / inference + 4 / learner + 3 / sampling)
    )
    # 0.5:1: one replayed batch after every second fresh one.
    assert bench.machine_limit(1, env, inference, learner, sampling, 0.5) == pytest.approx(
        1 / (1 / env + 1 / inference + 1.5 / learner + 0.5 / sampling)
    )


def test_replay_sampling_is_timed_on_a_full_buffer_of_the_levels_columns(monkeypatch):
    config = Config(
        level_name="CartPole-v1",
        num_action_repeats=1,
        network="mlp",
        mlp_sizes="8",
        use_lstm=True,  # core states travel in the buffer too
        unroll_length=5,
        batch_size=4,
        replay_proportion=3,
        replay_buffer_size=10,
    )
    sampled_from = []
    original = replay.ReplayBuffer.sample

    def recording_sample(self, batch_size, generator):
        sampled_from.append((len(self), self.capacity, batch_size))
        return original(self, batch_size, generator)

    monkeypatch.setattr(replay.ReplayBuffer, "sample", recording_sample)
    rate = bench.replay_samples_per_second(config, 0.05)
    assert math.isfinite(rate) and rate > 0
    assert sampled_from and all(entry == (10, 10, 4) for entry in sampled_from)
