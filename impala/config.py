"""Every setting of impala, in one place.

`Config` is a frozen dataclass: lower modules take it as a plain value (it is
picklable, so it crosses into spawned actor processes). `define_flags` turns each
field into an absl flag of the same name, with the field's default and help, so
flags and defaults cannot drift apart. Names follow the original scalable_agent
where it had them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from absl import flags


class ConfigError(ValueError):
    """A setting that cannot work; the message is one line for the user."""


# Choices of flags that lower modules check too: nets.resolve_network takes
# NETWORKS, losses.clip_rewards REWARD_CLIPPING_MODES. They are said here, where
# the flags are, and imported from here (config imports nothing of impala).
NETWORKS = ("auto", "mlp", "shallow", "deep")
REWARD_CLIPPING_MODES = ("abs_one", "soft_asymmetric", "none")
OPTIMIZERS = ("rmsprop", "adam")


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class Config:
    # What runs.
    mode: str = _f("train", "train or test.", ("train", "test"))
    job_name: str = _f("", "learner, actor, or empty to run everything on this machine.", ("", "learner", "actor"))
    task: int = _f(0, "Actor task number (with --job_name=actor).")
    learner_address: str = _f(
        "tcp://127.0.0.1:0",
        "Where the learner binds (learner job) or is reached (actor job); the parameter "
        "socket takes the next port. Port 0 picks free ports (one-machine runs only).",
    )
    keys_dir: str = _f("", "CurveZMQ keys (python -m impala.security --keys_dir=DIR); both jobs take it.")
    insecure: bool = _f(False, "Let the learner bind beyond loopback without keys (unauthenticated, unencrypted).")
    max_message_mb: int = _f(64, "Largest message the learner accepts from one peer; bigger ones are cut off.")
    logdir: str = _f("/tmp/impala", "Checkpoints, metrics.jsonl and TensorBoard events go here.")
    seed: int = _f(
        1,
        "Random seed: the learner's initialisation (as the original's tf.set_random_seed); actor i samples "
        "with seed + 1000 * i and seeds its env j with seed + 1000 * i + j (the original seeded actor i's "
        "one env with i + 1 whatever --seed; why: docs/design.md, Seeds).",
    )

    # Environment.
    level_name: str = _f(
        "CartPole-v1",
        "A gymnasium id (CartPole-v1, ALE/Pong-v5), a DeepMind Lab level (dmlab:<level script>, or a "
        "DMLab-30 name such as rooms_watermaze), or a multi-task run: dmlab30 (the DMLab-30 suite, docs/dmlab.md), "
        "atari57 (the Atari-57 games) or a comma-separated list of Atari games or of DMLab levels "
        "(ALE/Pong-v5,ALE/Breakout-v5; full ids, each once); actor i plays level i mod n (docs/atari.md).",
    )
    num_action_repeats: int = _f(4, "Environment frames per agent step (Atari's frame skip).")
    sticky_actions: float = _f(0.0, "Atari repeat_action_probability (0.25 is the v5 default).")
    full_action_space: bool = _f(
        False, "Atari: all 18 actions instead of the game's minimal set. Multi-task Atari runs always use all 18."
    )

    # Actors.
    num_actors: int = _f(4, "Actor processes started with --job_name unset.")
    num_envs_per_actor: int = _f(1, "Environments each actor steps in lock-step, one forward pass for all.")
    unroll_length: int = _f(100, "Agent steps per unroll (T); unrolls overlap by one step.")
    # The actor host (docs/dynamic_batching.md): envs in worker processes, inference batched dynamically.
    env_workers_per_actor: int = _f(
        0,
        "Environment worker processes per actor, sharing its --num_envs_per_actor; their policy "
        "calls are batched dynamically in the actor. 0 steps the envs in the actor in lock-step.",
    )
    inference_fill_batches: bool = _f(
        True,
        "Actor host: batches wait to fill up: one fires at the maximum, or once at least the minimum "
        "wait and the oldest has waited --inference_timeout_ms (docs/dynamic_batching.md). "
        "false: the original batcher.cc's rules (fire as soon as the minimum waits; after the timeout, below it).",
    )
    inference_minimum_batch_size: int = _f(
        1, "Actor host: filling, the fewest env rows a timed-out batch may have; else a batch fires at this many."
    )
    inference_maximum_batch_size: int = _f(
        0, "Actor host: the most env rows in a batch (filling: it fires at this many); 0 means all the actor's envs."
    )
    inference_timeout_ms: float = _f(
        10.0,
        "Actor host: filling, a batch of at least the minimum fires once its oldest row has waited this "
        "long; else what waits fires after this long, below the minimum too.",
    )
    inference_dtype: str = _f(
        "float32",
        "Number format of the actors' forward passes. bfloat16 is faster on CPUs with AVX512-BF16 "
        "or AMX, slower elsewhere; V-trace corrects for its rounding (docs/dynamic_batching.md).",
        ("float32", "bfloat16"),
    )

    # Agent.
    network: str = _f("auto", "Torso: mlp, shallow, deep, or auto (mlp for vectors, deep for images).", NETWORKS)
    use_lstm: bool = _f(True, "Put an LSTM core after the torso, as in the paper.")
    lstm_size: int = _f(256, "LSTM core width.")
    mlp_sizes: str = _f("64,64", "Hidden layer widths of the mlp torso, comma separated.")

    # Learner.
    batch_size: int = _f(2, "Unrolls per learner batch.")
    total_environment_frames: int = _f(int(1e9), "Train until this many environment frames.")
    stop_at_return: str = _f(
        "",
        "Also stop training, with a checkpoint, once the mean return of the last 100 training episodes "
        "(all levels together, counted as scripts/run_summary.py does) reaches this number. Empty: train "
        "to --total_environment_frames; the learning rate decays over that budget either way.",
    )
    optimizer: str = _f(
        "rmsprop",
        "rmsprop: the paper's (TensorFlow 1 RMSProp: --decay, --momentum, --epsilon inside the square root); "
        "adam: torch.optim.Adam with betas (0.9, --decay) and --epsilon outside the square root.",
        OPTIMIZERS,
    )
    learning_rate: float = _f(0.00048, "Learning rate, decayed linearly to zero at --total_environment_frames.")
    learning_rate_decay_start_frames: int = _f(
        0,
        "0: --learning_rate decays from the first frame, as in the paper. Else it stays at --learning_rate "
        "for this many frames, then decays linearly to 0 at --total_environment_frames. Not in the paper: "
        "for a fast Pong run that stalls in the middle, a higher rate there and still 0 at the end "
        "(docs/design.md says why; docs/results.md, round 10, what it did).",
    )
    decay: float = _f(0.99, "RMSProp decay (adam: beta2).")
    momentum: float = _f(0.0, "RMSProp momentum (adam: unused).")
    epsilon: float = _f(0.1, "Optimizer epsilon (rmsprop: inside the square root, as in TensorFlow 1).")
    entropy_cost: float = _f(0.00025, "Entropy cost.")
    entropy_cost_decay_frames: int = _f(
        0,
        "0: a constant --entropy_cost, as in the paper. Else --entropy_cost decays linearly to 0 at this "
        "many frames and stays 0 after (--total_environment_frames: the learning rate's schedule). Not in "
        "the paper: late in a run the advantages shrink while the entropy term does not, and the policy's "
        "entropy stayed high or rose (docs/results.md, rounds 7 and 8).",
    )
    baseline_cost: float = _f(0.5, "Baseline cost.")
    discounting: float = _f(0.99, "Discount factor.")
    reward_clipping: str = _f("abs_one", "Reward clipping.", REWARD_CLIPPING_MODES)
    clip_rho_threshold: float = _f(1.0, "V-trace rho-bar; 0 or less means no clipping.")
    clip_pg_rho_threshold: float = _f(1.0, "V-trace rho-bar of the policy gradient; 0 or less: none.")
    vtrace_lambda: float = _f(
        1.0,
        "V-trace's lambda: c_i = lambda min(1, pi/mu), as Retrace(lambda) (1: the original's V-trace; "
        "below 1, shorter traces and less variance, leaning on the baseline).",
    )
    max_grad_norm: float = _f(0.0, "Clip the global gradient norm to this; 0 turns it off.")
    replay_proportion: float = _f(
        0.0,
        "Experience replay: batches replayed per fresh batch (RLlib's p:1; 1 is one replayed update after each "
        "fresh one, 0.5 one after every second). Frames count fresh data only; 0 turns replay off.",
    )
    replay_buffer_size: int = _f(
        1000,
        "Experience replay: env-columns (one env's unroll) each learner rank keeps, the newest; at least "
        "--batch_size / --learner_ranks. Held on the learner's device: a Pong column (T=20) is about 0.6 MB.",
    )
    save_replay_buffer: bool = _f(
        True,
        "Experience replay: at a clean stop each learner rank writes its replay buffer beside the final "
        "checkpoint (<logdir>/checkpoints/replay-rank<r>.pt, the buffer's size on disk), and a resume from "
        "that checkpoint takes it back; false: a resumed run starts the buffer empty.",
    )
    device: str = _f("auto", "Learner device: cpu, cuda, or auto (cuda when available).")
    learner_threads: int = _f(1, "Torch threads of the learner process.")
    max_queued_batches: int = _f(2, "Learner batches prepared ahead; bounds memory (back-pressure).")
    low_lag: bool = _f(
        False,
        "Fewer unrolls in flight, acted with newer parameters: before each unroll an actor waits for room "
        "towards the learner and for the newest parameters, and the ZeroMQ queues hold one unroll at each "
        "end (two at the learner with --keys_dir). For a learner-bound run; with --max_queued_batches=1 "
        "it took pong_fast.cfg's policy lag from 30 to 16 updates (docs/results.md, 'Round 6: a bounded policy lag').",
    )
    learner_ranks: int = _f(
        1,
        "Data-parallel learner processes (one per GPU), launched with torchrun --nproc_per_node=N; "
        "actors need it too: task i sends its unrolls to rank i mod N (docs/distributed.md). Each rank "
        "trains on --batch_size / N envs; gradients are summed over all ranks.",
    )
    rank_timeout_s: float = _f(
        60.0,
        "Data-parallel learner: seconds a rank waits for the others before it counts them lost "
        "and the run stops (rank 0 writes a checkpoint).",
    )
    learner_dtype: str = _f(
        "float32",
        "Number format of the learner's forward pass (autocast; parameters, optimizer, V-trace and "
        "losses stay float32). bfloat16 is faster on GPUs and on CPUs with AVX512-BF16 or AMX (docs/design.md).",
        ("float32", "bfloat16"),
    )
    # What the learner accepts from peers (docs/protocol.md): bounds on what one actor may claim.
    max_actors: int = _f(
        1024,
        "Learner: actor task numbers accepted are 0 .. max_actors-1; others' unrolls "
        "are dropped (bounds the per-actor bookkeeping).",
    )
    max_envs_per_unroll: int = _f(
        0,
        "Learner: most environments one unroll may hold; wider ones are dropped. "
        "0 means max(--num_envs_per_actor, --batch_size).",
    )
    params_min_interval_s: float = _f(
        0.05,
        "Learner: a peer asking again sooner than this after it was sent "
        "parameters is answered 'params_unchanged' (fair service).",
    )

    # Bookkeeping.
    log_interval_s: float = _f(
        5.0,
        "Seconds between progress lines and metrics rows. The training thread writes them between updates, so "
        "an update that takes longer (the deep network on a CPU) spaces them out to one per update.",
    )
    checkpoint_interval_s: float = _f(300.0, "Seconds between checkpoints (one is also written on exit).")
    keep_checkpoints: int = _f(3, "Checkpoints kept in <logdir>/checkpoints.")

    # DeepMind Lab (docs/dmlab.md) and --mode=test.
    width: int = _f(96, "DeepMind Lab observation width in pixels.")
    height: int = _f(72, "DeepMind Lab observation height in pixels.")
    dataset_path: str = _f(
        "", "DeepMind Lab datasetPath: the brady_konkle_oliva2008 images that the psychlab_* levels need."
    )
    level_cache_dir: str = _f(
        "", "DeepMind Lab level cache directory: compiled maps are reused across episodes and runs. Empty: none."
    )
    dmlab_renderer: str = _f(
        "software", "DeepMind Lab renderer: software (OSMesa) or hardware (EGL).", ("software", "hardware")
    )
    test_num_episodes: int = _f(10, "--mode=test: episodes per level.")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"--{f.name}={getattr(self, f.name)!r} is not one of {choices}")
        for name in (
            "num_actors",
            "num_envs_per_actor",
            "unroll_length",
            "batch_size",
            "num_action_repeats",
            "lstm_size",
            "learner_threads",
            "max_queued_batches",
            "max_message_mb",
            "keep_checkpoints",
            "max_actors",
            "learner_ranks",
            "replay_buffer_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.learner_ranks:
            raise ConfigError(
                f"--batch_size={self.batch_size} must be divisible by --learner_ranks={self.learner_ranks}"
            )
        if self.replay_proportion > 0 and self.replay_buffer_size < self.batch_size // self.learner_ranks:
            raise ConfigError(
                f"--replay_buffer_size={self.replay_buffer_size} must hold a batch: at least --batch_size / "
                f"--learner_ranks = {self.batch_size // self.learner_ranks} env-columns"
            )
        try:
            goal = self.return_goal
        except ValueError:
            goal = math.nan
        if goal is not None and not math.isfinite(goal):
            raise ConfigError(f"--stop_at_return must be a number or empty, got {self.stop_at_return!r}")
        if not 0 <= self.env_workers_per_actor <= self.num_envs_per_actor:
            raise ConfigError(
                f"--env_workers_per_actor must be in [0, --num_envs_per_actor], got {self.env_workers_per_actor}"
            )
        maximum = self.inference_maximum_batch_size or self.num_envs_per_actor
        if not 1 <= self.inference_minimum_batch_size <= maximum:
            raise ConfigError(
                f"--inference_minimum_batch_size must be in [1, {maximum}] (the maximum batch: "
                "--inference_maximum_batch_size, or the actor's envs when that is 0), "
                f"got {self.inference_minimum_batch_size}"
            )
        if self.inference_maximum_batch_size < 0 or self.inference_timeout_ms < 0:
            raise ConfigError("--inference_maximum_batch_size and --inference_timeout_ms must not be negative")
        self._check_numbers()
        if self.max_envs_per_unroll < 0:
            raise ConfigError(f"--max_envs_per_unroll must not be negative, got {self.max_envs_per_unroll}")
        if self.total_environment_frames < 1:
            raise ConfigError("--total_environment_frames must be positive")
        if not 0 <= self.learning_rate_decay_start_frames < self.total_environment_frames:
            raise ConfigError(
                "--learning_rate_decay_start_frames must be in [0, --total_environment_frames), "
                f"got {self.learning_rate_decay_start_frames}"
            )
        if self.entropy_cost_decay_frames < 0:
            raise ConfigError(f"--entropy_cost_decay_frames must not be negative, got {self.entropy_cost_decay_frames}")
        try:
            _ = self.hidden_sizes  # parses --mlp_sizes
        except ValueError:
            raise ConfigError(f"--mlp_sizes must be comma-separated integers, got {self.mlp_sizes!r}")
        for name in ("width", "height", "test_num_episodes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")

    # Ranges of float flags (inclusive bounds; None: unbounded). Every float flag must
    # also be finite: a NaN learning rate would train NaNs into the checkpoints.
    _FLOAT_RANGES = {
        "learning_rate": (0.0, None),
        "decay": (0.0, 1.0),
        "momentum": (0.0, 1.0),
        "epsilon": (0.0, None),
        "entropy_cost": (0.0, None),
        "baseline_cost": (0.0, None),
        "discounting": (0.0, 1.0),
        "vtrace_lambda": (0.0, 1.0),
        "max_grad_norm": (0.0, None),
        "replay_proportion": (0.0, None),
        "sticky_actions": (0.0, 1.0),
        "log_interval_s": (1e-3, None),
        "checkpoint_interval_s": (0.0, None),
        "params_min_interval_s": (0.0, 60.0),
        "rank_timeout_s": (1.0, None),
    }

    def _check_numbers(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name} must be a finite number, got {value}")
        for name, (low, high) in self._FLOAT_RANGES.items():
            value = getattr(self, name)
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
                raise ConfigError(f"--{name} must be {'in ' if high is not None else ''}{bounds}, got {value}")

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.mlp_sizes.split(",") if s.strip())

    @property
    def envs_per_unroll_limit(self) -> int:
        """--max_envs_per_unroll, with 0 resolved."""
        return self.max_envs_per_unroll or max(self.num_envs_per_actor, self.batch_size)

    @property
    def return_goal(self) -> float | None:
        """--stop_at_return as a number; None when it is empty."""
        return float(self.stop_at_return) if self.stop_at_return.strip() else None

    @property
    def frames_per_step(self) -> int:
        """Environment frames consumed by one learner batch."""
        return self.batch_size * self.unroll_length * self.num_action_repeats

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one absl flag per Config field (call once, before parsing)."""
    for f in dataclasses.fields(Config):
        help_text, choices = f.metadata["help"], f.metadata["choices"]
        if choices:
            flags.DEFINE_enum(f.name, f.default, list(choices), help_text, flag_values=flag_values)
        elif f.type in ("bool", bool):
            flags.DEFINE_bool(f.name, f.default, help_text, flag_values=flag_values)
        elif f.type in ("int", int):
            flags.DEFINE_integer(f.name, f.default, help_text, flag_values=flag_values)
        elif f.type in ("float", float):
            flags.DEFINE_float(f.name, f.default, help_text, flag_values=flag_values)
        else:
            flags.DEFINE_string(f.name, f.default, help_text, flag_values=flag_values)


def sections() -> list[tuple[str, list[str]]]:
    """Config's fields grouped by the section comments of its class body, in order:
    [(title, [field name, ...]), ...] (for --help). A section starts at a comment
    line after a blank line or the class line; its title is the comment up to a '.'
    or ':'."""
    import inspect
    import re

    names = [f.name for f in dataclasses.fields(Config)]
    try:
        lines = inspect.getsource(Config).splitlines()
    except (OSError, TypeError):  # no source (e.g. a zip without .py files): one section
        return [("Flags", names)]
    groups: list[tuple[str, list[str]]] = []
    previous = ""
    for line in lines:
        comment, field_line = re.match(r"    # (.+)", line), re.match(r"    (\w+): ", line)
        if comment and (not previous.strip() or previous.startswith("class ")):
            groups.append((re.split(r"[.:]( |$)", comment.group(1))[0], []))
        elif field_line and field_line.group(1) in names:
            if not groups:
                groups.append(("Flags", []))
            groups[-1][1].append(field_line.group(1))
        previous = line
    return [g for g in groups if g[1]]


def from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Config:
    return Config(**{f.name: flag_values[f.name].value for f in dataclasses.fields(Config)})
