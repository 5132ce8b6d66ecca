"""--mode=test: plays the latest checkpoint of --logdir and reports its scores.

For each level (the 30 DMLab-30 test levels for --level_name=dmlab30, the 57 games
for atari57, a list's levels in its order, otherwise the level itself) it plays
--test_num_episodes whole episodes, logs each one, prints a per-level table and
writes `<logdir>/test_results.json`:

    {"levels": [{"level": <name as run>, "episode_returns": [...], "mean_return": x,
                 "human_normalized_score": y, "human_normalized_score_capped": z}, ...],
     "mean_human_normalized_score": ..., "mean_human_normalized_score_capped": ...,
     "median_human_normalized_score": ...}

Scores are in percent (impala/scores.py) and present only for levels with reference
scores (DMLab-30, Atari-57); the mean and median are over those levels, the capped
mean caps each level at 100 before averaging, as the paper's DMLab-30 numbers do;
the median is what DeepMind's Atari-57 results report.

Evaluation choices, as in the original's test mode:
  - actions are sampled from the policy, not taken greedily: the agent was trained
    and is reported (in the paper and by the original's test mode) as a stochastic
    policy, and the argmax of such a policy can loop forever in states where the
    trained policy mixes actions on purpose;
  - environments are built with training=False: DMLab allows the held-out test
    levels and uses the original's evaluation mixer seed; Atari episodes do not end
    at a lost life;
  - every level uses --seed for its environment and the sampler, so a checkpoint
    and a seed give the same results; one environment per level, one level after
    another, with whole episodes only (no episode is cut short).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from absl import logging

from impala import checkpoint, dmlab30, envs, scores
from impala.config import Config
from impala.files import write_atomically
from impala.nets import Agent, make_agent, sample_actions
from impala.policy import call_agent, inputs_at
from impala.step import EnvSpec, fields, new_arrays, write

RESULTS_FILE = "test_results.json"


def test_levels(level_name: str) -> list[str]:
    """The levels --mode=test plays for a --level_name: DMLab-30's test levels for
    dmlab30, else the levels its actors train on (envs.levels)."""
    if level_name == dmlab30.SUITE_NAME:
        return list(dmlab30.TEST_LEVELS)
    return list(envs.levels(level_name))


def run(config: Config) -> dict:
    """Evaluates, writes test_results.json, prints the table; returns the results."""
    results = evaluate(config)
    path = write_results(config.logdir, results)
    print(format_table(results), flush=True)
    logging.info("Wrote %s.", path)
    return results


def evaluate(config: Config) -> dict:
    path = checkpoint.latest(config.logdir)
    if path is None:
        raise checkpoint.CheckpointError(
            f"no checkpoint in {checkpoint.directory(config.logdir)}: train first "
            "(--mode=train with this --logdir), or point --logdir at a training run"
        )
    state = checkpoint.load(path)
    levels = test_levels(config.level_name)
    torch.set_num_threads(config.learner_threads)
    logging.info(
        "Testing %s (%s frames, trained on %s) on %d level(s), %d episode(s) each.",
        path,
        f"{int(state.get('frames', 0)):,}",
        state.get("level_name", "?"),
        len(levels),
        config.test_num_episodes,
    )
    agent: Agent | None = None
    results = []
    start = time.monotonic()
    for index, level in enumerate(levels, 1):
        env = envs.make_checked(
            level,
            seed=config.seed,
            num_action_repeats=config.num_action_repeats,
            training=False,
            **envs.options(config),
        )
        try:
            if agent is None:
                agent = _load_agent(config, env, state, path)
            torch.manual_seed(config.seed)

            # Called only within this iteration, so it may read the loop's variables.
            def progress(episode: int, episode_return: float, steps: int) -> None:
                logging.info(
                    "Level %d/%d %s: episode %d/%d, return %.2f (%d steps).",
                    index,  # noqa: B023
                    len(levels),
                    level,  # noqa: B023
                    episode,
                    config.test_num_episodes,
                    episode_return,
                    steps,
                )

            returns = play(agent, env, config.test_num_episodes, progress)
        finally:
            env.close()
        result = scores.level_result(level, returns)
        results.append(result)
        score = (
            f", human-normalised {result['human_normalized_score']:.1f}%" if "human_normalized_score" in result else ""
        )
        logging.info(
            "Level %d/%d %s: mean return %.2f over %d episodes%s (%.0fs so far).",
            index,
            len(levels),
            level,
            result["mean_return"],
            len(returns),
            score,
            time.monotonic() - start,
        )
    return scores.summary(results)


def _load_agent(config: Config, env: envs.Environment, state: dict, path: Path) -> Agent:
    agent = make_agent(config, env.observation_shape, env.num_actions, envs.instruction_length(env))
    checkpoint.load_agent(state, path, config, agent)
    agent.eval()
    return agent


@torch.no_grad()
def play(
    agent: Agent, env: envs.Environment, num_episodes: int, on_episode: Callable[[int, float, int], None] | None = None
) -> list[float]:
    """Plays `num_episodes` whole episodes from a fresh start, sampling actions from
    the policy; returns their returns."""
    spec = EnvSpec.of(env)
    if spec.instruction_length and agent.instruction is None:
        spec = dataclasses.replace(spec, instruction_length=0)  # an agent that does not read them
    arrays = new_arrays(fields(spec), (1,))  # the step the agent acts on, for one environment
    write(arrays, 0, env.initial())
    state = agent.initial_state(1)
    returns: list[float] = []
    while len(returns) < num_episodes:
        output, state = call_agent(agent, inputs_at(arrays, slice(None)), state)
        action = int(sample_actions(output.policy_logits)[0, 0])
        step = env.step(action)
        write(arrays, 0, step)
        arrays["action"][0] = action
        if step.done:
            returns.append(float(step.episode_return))
            if on_episode is not None:
                on_episode(len(returns), returns[-1], int(step.episode_step))
    return returns


def write_results(logdir: str | os.PathLike, results: dict) -> Path:
    """Writes <logdir>/test_results.json atomically."""

    def write(f) -> None:
        json.dump(results, f, indent=1)
        f.write("\n")

    return write_atomically(Path(logdir) / RESULTS_FILE, write)


def format_table(results: dict) -> str:
    """The per-level table printed at the end of --mode=test."""
    levels = results["levels"]
    width = max([len("median")] + [len(r["level"]) for r in levels])
    scored = "mean_human_normalized_score" in results
    header = f"{'level':<{width}}  {'episodes':>8}  {'mean return':>11}"
    if scored:
        header += f"  {'human-normalised':>16}  {'capped':>8}"
    lines = [header, "-" * len(header)]
    for r in levels:
        line = f"{r['level']:<{width}}  {len(r['episode_returns']):>8}  {r['mean_return']:>11.2f}"
        if "human_normalized_score" in r:
            line += f"  {r['human_normalized_score']:>15.1f}%  {r['human_normalized_score_capped']:>7.1f}%"
        lines.append(line)
    if scored:
        lines.append("-" * len(header))
        lines.append(
            f"{'mean':<{width}}  {'':>8}  {'':>11}  {results['mean_human_normalized_score']:>15.1f}%"
            f"  {results['mean_human_normalized_score_capped']:>7.1f}%"
        )
        lines.append(f"{'median':<{width}}  {'':>8}  {'':>11}  {results['median_human_normalized_score']:>15.1f}%")
    return "\n".join(lines)
