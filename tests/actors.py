"""Helpers for tests that run a real actor (`run_actor`, in a thread) against
ZeroMQ sockets playing the learner."""

from __future__ import annotations

import threading

from impala.actor import run_actor
from impala.config import Config

# A small CartPole actor: 2 envs, unrolls of 5 steps, an MLP without LSTM.
CARTPOLE_ACTOR = Config(
    level_name="CartPole-v1",
    network="mlp",
    use_lstm=False,
    mlp_sizes="16",
    num_action_repeats=1,
    num_envs_per_actor=2,
    unroll_length=5,
)


def start_actor(
    config: Config, unroll_address: str, params_address: str, stop: threading.Event
) -> tuple[threading.Thread, list[BaseException]]:
    """Starts actor 0 in a daemon thread; returns it and the list that gets what it raises."""
    errors: list[BaseException] = []

    def act():
        try:
            run_actor(config, 0, unroll_address, params_address, stop=stop)
        except BaseException as e:  # noqa: BLE001 -- the test reports it
            errors.append(e)

    actor = threading.Thread(target=act, daemon=True)
    actor.start()
    return actor, errors
