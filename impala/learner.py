"""The learner: receives unrolls, applies V-trace, updates the network, serves
parameters.

Its rooms, each a unit built and tested alone:
  - impala/receiver.py: the unroll socket's messages -> validated unrolls, the actor
    book (counts, lags, episodes, liveness) and batches in a bounded queue;
  - impala/param_server.py: parameter snapshots and the parameter socket's answers;
  - impala/progress.py: the progress line, metrics rows and TensorBoard;
  - impala/checkpoint.py: atomic checkpoints, refused when non-finite or foreign;
  - impala/distributed.py: the data-parallel ranks (torchrun, --learner_ranks): what
    they agree on each iteration and the gradient all-reduce;
  - impala/replay.py: experience replay (--replay_proportion): the ring of recent
    env-columns and how many replayed updates follow each fresh one;
  - this module: the update (`learn_step`: the whole of it, in one function), the
    learning-rate schedule (`learning_rate_at`), and `Learner`, which builds the model
    and optimizer, binds the two sockets, starts their server threads and runs the
    training loop (frame counting, replay, publishing, checkpoint cadence).

With N data-parallel ranks every rank runs a Learner on its share of the actors
(batches of --batch_size / N envs) and all take the same update; rank 0 alone
serves parameters and writes checkpoints and metrics (docs/distributed.md).

Threads, and the state each owns:
  - the training thread (the caller of `run`): the agent, the optimizer, `frames`,
    `param_version`, the progress log, the non-finite count, the BatchFeed
    (impala/transfer.py: batches on the device, on a GPU one copied ahead) and the
    replay buffer (impala/replay.py); it copies the parameters for the publisher
    (`offer`) and reads the actor book through `take_report`;
  - 'publisher' (a SnapshotPublisher; rank 0 only): waits for that copy to reach the host,
    encodes it and hands it to the ParamServer (`publish`), off the training
    thread's critical path;
  - 'unrolls' (a ServerThread): the unroll socket and the UnrollReceiver with its
    batch assembler; it writes the actor book (under the book's lock) and the queue;
  - 'params' (a ServerThread; rank 0 only): the parameter socket; it reads the ParamServer's
    current snapshot, which `publish` replaces whole.
A failure while one message is handled, of any kind, drops that message only
(counted, one log line); a server thread that fails outside one message (its
socket) records its error and the training thread stops the run within a second
(ServerThreadError); `close` then writes a checkpoint. See ServerThread.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import zmq
from absl import logging

from impala import checkpoint, distributed, envs, losses, replay, security, unroll, wire
from impala.address import params_port, split_address, unroll_port
from impala.config import Config, ConfigError
from impala.memory import reuse_freed_memory
from impala.metrics import MetricsWriter, Stopwatch, drop_rows_after
from impala.nets import Agent, make_agent
from impala.optim import make_optimizer
from impala.param_server import ParamServer
from impala.progress import ProgressLog, configured_levels
from impala.receiver import ActorBook, Limits, UnrollReceiver
from impala.transfer import BatchFeed, SnapshotPublisher

# Per-peer ZeroMQ queue bounds: with the bounded batch queue they cap the memory
# that unrolls in flight can take, whatever the actors do. An actor keeps at most one
# parameter request in flight, so two replies queued for a peer that does not read are
# one more than it needs (ZeroMQ drops further ones for that peer, not for others).
PARAMS_SNDHWM = 2
# Unrolls a connection may have queued at the learner (the unroll socket's RCVHWM, in
# messages), beyond the one ZeroMQ's I/O thread is reading: as many as fit in
# UNROLL_READ_AHEAD_BYTES, from MIN_UNROLL_RCVHWM to MAX_UNROLL_RCVHWM (unroll_rcvhwm). Read-ahead lets
# the 'unrolls' thread go on while the I/O thread waits for a core (with 48 1-env Pong
# connections on 2 loaded cores it received 25% more with 4 than with 1), but the learner
# holds C x (RCVHWM + 1) unrolls of C actors: with 16-env Pong unrolls (9 MB) only the
# minimum is affordable, near the original's C x 1 (each actor's enqueue was a blocking
# RPC). docs/results.md, "How many actors one learner takes".
UNROLL_READ_AHEAD_BYTES = 4 * 2**20
MAX_UNROLL_RCVHWM = 4
# Not 1: with RCVHWM 1 the CurveZMQ actors of tests/test_compose_run.py never got an
# unroll through (the learner saw none for 10 minutes; 2 and 4 pass). Cause not found.
MIN_UNROLL_RCVHWM = 2
# With --low_lag (without keys, for the reason above): the fewest unrolls queued per connection.
LOW_LAG_UNROLL_RCVHWM = 1
# Connections the kernel queues until the I/O thread accepts them (ZeroMQ's default is
# 100; Linux caps it at net.core.somaxconn). With 100, a thousand actors connecting at
# once overflow the queue, and the dropped ones retry with the kernel's exponential
# back-off: the last took a minute or more to connect (scripts/load.py at C = 1,024).
LISTEN_BACKLOG = 4096
# Updates skipped in a row for a non-finite loss or gradient norm before the run stops:
# one bad batch is skipped, a learner that keeps producing them is broken.
MAX_NONFINITE_IN_A_ROW = 10
# How long a finished learner keeps answering parameter requests with 'finished'. Actors
# ask at every unroll boundary, about every second while their unrolls wait, and every
# 3 s while they wait for a learner (param_client.PARAMS_RETRY_S): twice the longest.
FINISH_GRACE_S = 6.0
# Seconds between log lines about dropped messages of one kind (ServerThread._dropped).
DROP_LOG_INTERVAL_S = 5.0


def unroll_bytes(spec: Mapping, num_envs: int) -> int:
    """The arrays' bytes of an unroll of `num_envs` envs of `spec` (unroll.unroll_spec)."""
    return num_envs * sum(np.dtype(dtype).itemsize * int(np.prod(shape)) for dtype, shape, _ in spec.values())


def unroll_rcvhwm(unroll_bytes: int, low_lag: bool = False) -> int:
    """The unroll socket's RCVHWM for unrolls of `unroll_bytes` (see UNROLL_READ_AHEAD_BYTES),
    or LOW_LAG_UNROLL_RCVHWM for `low_lag`."""
    if low_lag:
        return LOW_LAG_UNROLL_RCVHWM
    return max(MIN_UNROLL_RCVHWM, min(MAX_UNROLL_RCVHWM, UNROLL_READ_AHEAD_BYTES // max(unroll_bytes, 1)))


class LearnerFailure(RuntimeError):
    """The run cannot go on; the message is one line for the user."""


class ServerThreadError(LearnerFailure):
    """A server thread failed with an unexpected error."""


class NonFiniteLossError(LearnerFailure):
    """Too many updates in a row had a non-finite loss or gradient norm."""


class RankLostError(LearnerFailure):
    """Another data-parallel learner rank died or stopped answering."""


@dataclass
class EnvSpec:
    observation_shape: tuple[int, ...]
    observation_dtype: np.dtype
    num_actions: int
    instruction_length: int = 0  # > 0: levels with instructions (DMLab), see envs.instruction_length


def env_spec(config: Config) -> EnvSpec:
    """Reads the level's observation and action spaces from one instance."""
    try:
        env = envs.make(
            config.level_name, seed=config.seed, num_action_repeats=config.num_action_repeats, **envs.options(config)
        )
    except envs.UnknownLevelError:
        raise
    except ValueError as e:  # e.g. a continuous action space
        raise ConfigError(str(e).splitlines()[0])
    try:
        return EnvSpec(
            tuple(env.observation_shape), np.dtype(env.observation_dtype), env.num_actions, envs.instruction_length(env)
        )
    finally:
        env.close()


def state_sizes(agent: Agent) -> tuple[int, ...]:
    return tuple(s.shape[1] for s in agent.initial_state(1))


def check_logdir(logdir: str) -> None:
    """A one-line error for a logdir that is a file or cannot be written."""
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise ConfigError(f"--logdir={logdir} exists and is not a directory")
    try:
        os.makedirs(logdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--logdir={logdir} cannot be created: {e.strerror}")
    if not os.access(logdir, os.W_OK | os.X_OK):
        raise ConfigError(f"--logdir={logdir} is not writable")


def _linear_to_zero(frames: int, start: int, end: int) -> float:
    """1 until `start` frames, then linearly down to 0 at `end` (> start), 0 after."""
    return min(1.0, max(0.0, (end - frames) / (end - start)))


def learning_rate_at(frames: int, config: Config) -> float:
    """The original's schedule: --learning_rate decayed linearly to 0 at
    --total_environment_frames (tf.train.polynomial_decay, power 1), by the frames
    trained on before the update. With --learning_rate_decay_start_frames (beyond the
    original, 0 by default) the rate holds until then and decays over the rest."""
    start, end = config.learning_rate_decay_start_frames, config.total_environment_frames
    return config.learning_rate * _linear_to_zero(frames, start, end)


def entropy_cost_at(frames: int, config: Config) -> float:
    """--entropy_cost, constant as in the original; with --entropy_cost_decay_frames
    (beyond the original, off by default) decayed linearly to 0 there, by the frames
    trained on before the update, as `learning_rate_at`."""
    if config.entropy_cost_decay_frames <= 0:
        return config.entropy_cost
    return config.entropy_cost * _linear_to_zero(frames, 0, config.entropy_cost_decay_frames)


AllReduce = Callable[[list[torch.Tensor], list[torch.Tensor]], None]


def learn_step(
    agent: Agent,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    config: Config,
    learning_rate: float | None = None,
    all_reduce: AllReduce | None = None,
    entropy_cost: float | None = None,
) -> dict[str, float]:
    """The whole update on a batch of unrolls ([T+1, B, ...] tensors, see unroll.py),
    at `learning_rate` (None: the optimizer's as it is) and `entropy_cost` (None:
    --entropy_cost; the learner passes `entropy_cost_at`). `all_reduce(sums,
    means)`, for data-parallel ranks (distributed.Ranks.all_reduce), sums the
    gradients and loss terms over the ranks and averages the diagnostics, in place,
    before clipping: an update of N ranks on B / N envs each is then one update on
    all B.

    Returns the loss terms, the gradient norm, V-trace diagnostics and 'skipped':
    1.0 when the loss or the gradient norm was not finite, and the update was
    skipped (parameters and optimizer state untouched), else 0.0.

    With --learner_dtype=bfloat16 only the network's forward pass (and so its
    backward) runs under autocast; parameters, gradients and RMSProp stay float32
    (bfloat16 has float32's exponent range: no loss scaling), and V-trace and the
    losses run in float32 on the outputs: exp(log pi - log mu) turns a logit's
    rounding (8 bits of mantissa) into a relative error of the importance weight,
    and the losses sum T x B terms, which bfloat16 would round away; they are a
    tiny part of the work. With float32 nothing is autocast."""
    if learning_rate is not None:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
    initial_state = tuple(batch[f"core_state_{k}"] for k in range(2) if f"core_state_{k}" in batch)
    with _forward_precision(config.learner_dtype, batch["observation"].device):
        output, _ = agent(
            batch["observation"],
            batch["action"],
            batch["reward"],
            batch["done"],
            initial_state,
            instruction=batch.get("instruction"),
        )
    logits, baseline = output.policy_logits.float(), output.baseline.float()  # no-ops in float32

    # Env output t led the network to pick action t+1: learn from transitions
    # 0..T-1 and bootstrap from the value of the last env output.
    loss = losses.impala_loss(
        target_logits=logits[:-1],
        baseline=baseline[:-1],
        bootstrap_value=baseline[-1],
        behaviour_logits=batch["policy_logits"][1:],
        actions=batch["action"][1:],
        rewards=losses.clip_rewards(batch["reward"][1:], config.reward_clipping),
        discounts=(~batch["done"][1:]).float() * config.discounting,
        baseline_cost=config.baseline_cost,
        entropy_cost=config.entropy_cost if entropy_cost is None else entropy_cost,
        clip_rho_threshold=config.clip_rho_threshold if config.clip_rho_threshold > 0 else None,
        clip_pg_rho_threshold=config.clip_pg_rho_threshold if config.clip_pg_rho_threshold > 0 else None,
        vtrace_lambda=config.vtrace_lambda,
    )
    optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    terms = {
        "total_loss": loss.total,
        "pg_loss": loss.policy_gradient,
        "baseline_loss": loss.baseline,
        "entropy_loss": loss.entropy,
    }
    diagnostics = loss.diagnostics
    if all_reduce is not None:
        # The losses are sums over time and batch: the ranks' sums add up to the whole
        # batch's (not DDP's average). The diagnostics are means over equal shares.
        sums, means = torch.stack([t.detach() for t in terms.values()]), torch.stack(list(diagnostics.values()))
        all_reduce([p.grad for p in agent.parameters() if p.grad is not None] + [sums], [means])
        terms, diagnostics = dict(zip(terms, sums)), dict(zip(diagnostics, means))
    max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(agent.parameters(), max_norm)
    scalars = {**terms, "grad_norm": grad_norm, **diagnostics}
    # One device sync for all of them, before the step: a non-finite update is not applied.
    stats = dict(zip(scalars, torch.stack([s.detach() for s in scalars.values()]).tolist()))
    finite = math.isfinite(stats["total_loss"]) and math.isfinite(stats["grad_norm"])
    if finite:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    stats["skipped"] = 0.0 if finite else 1.0
    return stats


def _forward_precision(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device` for the forward pass; nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def _one_line(error: BaseException) -> str:
    """'Type: message (at file:line)' for an unexpected error, without a traceback."""
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}{at}"


class ServerThread(threading.Thread):
    """Serves one ROUTER socket: reads each message (wire.recv_routed, `kinds`) and
    calls `handle(identity, message)`, until `stop` is set.

    Two kinds of failure, two policies (docs/protocol.md, "Faults"):
      - one message: any exception while decoding or handling it -- a WireError, an
        UnrollError, or anything else (a check that was missed, a value that reaches a
        bug) -- drops that message only. It is counted (`bad_messages`) and logged in
        one rate-limited line naming the sender's task (or its connection when the
        header could not be read); the thread goes on serving the others.
      - the thread: an error outside one message's handling -- the socket failing
        (zmq.ZMQError from a read) or the loop itself -- ends the thread with `error`
        set, and the training thread stops the run loudly (ServerThreadError)."""

    def __init__(
        self,
        name: str,
        socket: zmq.Socket,
        kinds: tuple[str, ...],
        handle: Callable[[bytes, wire.Message], None],
        book: ActorBook,
        stop: threading.Event,
    ):
        super().__init__(name=name, daemon=True)
        self.socket, self.kinds, self.handle, self.book, self.stop = socket, kinds, handle, book, stop
        self.error: BaseException | None = None
        self._last_logged: dict[str, float] = {}  # kind of drop -> when last logged (this thread's)

    def run(self) -> None:
        try:
            poller = zmq.Poller()
            poller.register(self.socket, zmq.POLLIN)
            while not self.stop.is_set():
                if not poller.poll(100):
                    continue
                try:  # a zmq.ZMQError from the socket's read is not one message's: it ends the thread
                    identity, message = wire.recv_routed(self.socket, allowed_kinds=self.kinds)
                except wire.RoutedWireError as e:
                    self._dropped(e, f"connection {e.identity.hex()[:16]}")
                    continue
                try:
                    self.handle(identity, message)
                except Exception as e:  # noqa: BLE001 -- one message's failure drops that message only
                    self._dropped(e, f"task {message.task}")
        except BaseException as e:  # noqa: BLE001 -- every other failure must end the run, loudly
            if not self.stop.is_set():
                self.error = e
                logging.error("The learner's %s thread failed: %s", self.name, _one_line(e))

    def _dropped(self, error: Exception, sender: str) -> None:
        count = self.book.bad_message()
        why = (
            str(error).splitlines()[0] if isinstance(error, (wire.WireError, unroll.UnrollError)) else _one_line(error)
        )
        # At most one line per kind of drop (the reason with its numbers blanked) every
        # DROP_LOG_INTERVAL_S: a flooding peer cannot flood the log, and one kind of bad
        # message does not hide another. The kinds are few; the dict is bounded anyway.
        kind, now = re.sub(r"\d+", "#", why)[:80], time.monotonic()
        if now - self._last_logged.get(kind, -math.inf) < DROP_LOG_INTERVAL_S:
            return
        if len(self._last_logged) >= 64:
            self._last_logged.clear()
        self._last_logged[kind] = now
        logging.warning("Dropped a bad message from %s on the %s socket (%d so far): %s", sender, self.name, count, why)


class Learner:
    """Owns the network, the optimizer and the two sockets (ranks > 0: the unroll
    socket only). `run` trains until the frame budget; `close` stops the threads and
    writes a final checkpoint (rank 0)."""

    def __init__(self, config: Config, spec: EnvSpec | None = None):
        self.ranks = distributed.Ranks.from_environment(config)
        self.is_main = self.ranks.is_main
        if self.is_main:
            check_logdir(config.logdir)
        self.config = config
        self.spec = spec or env_spec(config)
        self.device = self.ranks.device(_device(config.device))
        try:
            self.ranks.start(self.device)
        except distributed.RankLostError as e:
            raise RankLostError(str(e))
        torch.set_num_threads(config.learner_threads)
        reuse_freed_memory()
        torch.manual_seed(config.seed)

        try:
            agent = make_agent(config, self.spec.observation_shape, self.spec.num_actions, self.spec.instruction_length)
        except ValueError as e:  # e.g. --network=mlp on image observations
            raise ConfigError(f"--network={config.network} does not fit {config.level_name}: {e}")
        self.agent = agent.to(self.device)
        self.optimizer = make_optimizer(
            config.optimizer,
            self.agent.parameters(),
            lr=config.learning_rate,
            decay=config.decay,
            momentum=config.momentum,
            epsilon=config.epsilon,
        )
        self.signature = checkpoint.network_signature(config, self.agent)
        self.frames = 0
        self.param_version = 0
        run_id = uuid.uuid4().hex
        if self.is_main:
            self._restore()
        if self.ranks.world_size > 1:
            run_id = self._share_state(run_id)

        self.unroll_spec = unroll.unroll_spec(
            config.unroll_length,
            self.spec.observation_shape,
            self.spec.observation_dtype,
            self.spec.num_actions,
            state_sizes(self.agent),
            instruction_length=self.spec.instruction_length,
        )
        # Seconds per part of the learner's threads and of the actors (from their
        # unrolls); each metrics row has them per second of wall time ('time/...').
        self.watch = Stopwatch()
        self.params = ParamServer(run_id=run_id, min_interval_s=config.params_min_interval_s)
        if self.is_main:
            self.params.publish(self.agent.state_dict(), self.param_version)
        self._offered = self.param_version  # the newest version handed to the publisher
        self.book = ActorBook(self.spec.num_actions, config.num_action_repeats)
        encoder = getattr(self.agent, "instruction", None)
        limits = Limits(
            self.spec.num_actions,
            configured_levels(config.level_name),
            max_envs=config.envs_per_unroll_limit,
            max_actors=config.max_actors,
            vocabulary=encoder.embedding.num_embeddings if encoder is not None else 0,
        )
        # Policy lags count the learner's updates, published or not yet (equal on every rank).
        self.receiver = UnrollReceiver(
            self.unroll_spec,
            config.batch_size // self.ranks.world_size,
            self.spec.num_actions,
            self.book,
            self.watch,
            default_level=config.level_name,
            run_id=run_id,
            param_version=lambda: self.param_version,
            max_queued_batches=config.max_queued_batches,
            pin_memory=self.device.type == "cuda",
            limits=limits,
        )
        self.feed = BatchFeed(self.receiver.next_batch, self.receiver.release, self.device)
        self._stop = self.receiver.stop
        # Rank 0 alone serves parameters, so only it snapshots them for the actors.
        self.publisher: SnapshotPublisher | None = (
            SnapshotPublisher(self.agent.state_dict(), self.params.publish, self._stop, self.device)
            if self.is_main
            else None
        )
        # Experience replay: this rank's own columns (its share of the actors), sampled
        # with its own stream; None when off, so nothing of it touches the default path.
        self.replay: replay.ReplayBuffer | None = None
        self._replay_generator: torch.Generator | None = None
        if config.replay_proportion > 0:
            self.replay = replay.ReplayBuffer(self.unroll_spec, config.replay_buffer_size)
            self._replay_generator = replay.generator(config.seed, self.ranks.rank)
        self._fresh_batches = 0  # trained on since the replay buffer began (replays_due's k)
        if self.replay is not None and self.frames > 0:
            self._restore_replay()

        # The configured actors' unrolls decide the read-ahead (other sizes are bounded by it in messages).
        self.unroll_rcvhwm = unroll_rcvhwm(
            unroll_bytes(self.unroll_spec, config.num_envs_per_actor), low_lag=config.low_lag and not config.keys_dir
        )
        self._context = zmq.Context.instance()
        self.unroll_address, self.params_address = self._bind()
        self._threads = [
            ServerThread("unrolls", self._unroll_socket, ("unroll",), self.receiver.handle, self.book, self._stop)
        ]
        if self.is_main:  # rank 0 alone serves parameters
            self._threads += [
                ServerThread(
                    "params",
                    self._params_socket,
                    ("get_params",),
                    functools.partial(self.params.handle, self._params_socket),
                    self.book,
                    self._stop,
                ),
                self.publisher,
            ]
        for t in self._threads:
            t.start()
        self.metrics = MetricsWriter(config.logdir) if self.is_main else None
        self._last_checkpoint = time.monotonic()

    # -- checkpoints ---------------------------------------------------------------

    def _restore(self) -> None:
        path = checkpoint.latest(self.config.logdir)
        if path is None:
            return
        state = checkpoint.load(path)
        checkpoint.load_agent(state, path, self.config, self.agent, self.optimizer)
        self.frames = int(state["frames"])
        self.param_version = int(state["param_version"])
        drop_rows_after(os.path.join(self.config.logdir, "metrics.jsonl"), self.frames)
        logging.info("Resumed from %s at %d frames (parameter version %d).", path, self.frames, self.param_version)

    def _restore_replay(self) -> None:
        """Takes back the replay buffer, sampling stream and schedule position this rank
        saved at the clean stop that wrote the checkpoint just restored (save_replay);
        without one that fits, the buffer starts empty, and the log says why."""
        config, rank = self.config, self.ranks.rank
        if not config.save_replay_buffer:
            return
        try:
            state = checkpoint.load_replay(config.logdir, rank)
        except checkpoint.CheckpointError as e:
            logging.warning("%s; the replay buffer starts empty.", e)
            return
        if state is None:
            logging.info("No replay buffer saved at %d frames: it starts empty.", self.frames)
            return
        if state.get("frames") != self.frames:
            logging.info(
                "The replay buffer saved at %s frames is not the restored checkpoint's (%d frames): it starts empty.",
                state.get("frames"),
                self.frames,
            )
            return
        try:
            stream = torch.Generator()
            stream.set_state(state["generator"])
            self.replay.load_state_dict(state["buffer"], self.device)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            logging.warning(
                "The replay buffer in %s does not fit this run (%s): it starts empty.",
                checkpoint.replay_path(config.logdir, rank),
                _one_line(e),
            )
            return
        self._replay_generator, self._fresh_batches = stream, int(state["fresh_batches"])
        logging.info("Restored the replay buffer: %d columns, saved at %d frames.", len(self.replay), self.frames)

    def save_replay(self) -> None:
        """Every rank: its replay buffer, sampling stream and schedule position, for a
        resume from the checkpoint at this frame count (--save_replay_buffer). A failed
        write is logged; the resumed run then starts the buffer empty."""
        if self.replay is None or not self.config.save_replay_buffer:
            return
        state = {
            "frames": self.frames,
            "buffer": self.replay.state_dict(),
            "generator": self._replay_generator.get_state(),
            "fresh_batches": self._fresh_batches,
        }
        try:
            path = checkpoint.save_replay(self.config.logdir, self.ranks.rank, state)
            logging.info("Saved the replay buffer (%d columns) to %s.", len(self.replay), path)
        except OSError as e:
            logging.error("Replay buffer at %d frames not written (%s).", self.frames, e.strerror or e)

    def _share_state(self, run_id: str) -> str:
        """Every rank takes rank 0's network, optimizer, frames, parameter version and
        run id (restored or new); returns the run id."""
        state = None
        if self.is_main:
            state = {
                "model": self.agent.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "frames": self.frames,
                "param_version": self.param_version,
                "run_id": run_id,
            }
        try:
            state = self.ranks.broadcast_state(state, self.device)
        except distributed.RankLostError as e:
            raise RankLostError(str(e))
        if not self.is_main:
            self.agent.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.frames, self.param_version = int(state["frames"]), int(state["param_version"])
        return str(state["run_id"])

    def save_checkpoint(self) -> None:
        if not self.is_main:
            return  # rank 0 writes them
        state = {
            "model": self.agent.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_name": self.config.optimizer,
            "frames": self.frames,
            "param_version": self.param_version,
            "signature": self.signature,
            "level_name": self.config.level_name,
        }
        try:
            path = checkpoint.save(self.config.logdir, state, self.frames, keep=self.config.keep_checkpoints)
            logging.info("Saved checkpoint %s.", path)
        except OSError as e:  # e.g. a full disk: keep training, the previous checkpoint stays
            logging.error(
                "Checkpoint at %d frames not written (%s); the previous one is kept.", self.frames, e.strerror or e
            )
        except checkpoint.NonFiniteError as e:
            logging.error("Checkpoint at %d frames not written: %s; the previous one is kept.", self.frames, e)
        self._last_checkpoint = time.monotonic()

    # -- sockets -----------------------------------------------------------------

    def _bind(self) -> tuple[str, str]:
        """Binds the two sockets by the trust model (docs/protocol.md, "Who can connect"):
        a one-machine run (no --job_name, --learner_address on loopback port 0, no keys)
        binds ipc:// sockets in a fresh directory only this user can enter; otherwise
        TCP, with CurveZMQ when --keys_dir is given (experiment.py gives a loopback job
        the automatic keys of its --logdir), or without it on loopback or with --insecure."""
        config, rank = self.config, self.ranks.rank
        host, port = split_address(config.learner_address)
        if port == 0 and self.ranks.world_size > 1:
            raise ConfigError("--learner_ranks > 1 needs a real port in --learner_address (each rank binds its own)")
        self._unroll_socket = self._context.socket(zmq.ROUTER)
        self._params_socket = self._context.socket(zmq.ROUTER) if self.is_main else None
        sockets = [s for s in (self._unroll_socket, self._params_socket) if s is not None]
        for s in sockets:
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, config.max_message_mb * 2**20)
            s.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
        self._unroll_socket.setsockopt(zmq.RCVHWM, self.unroll_rcvhwm)
        if self._params_socket is not None:
            self._params_socket.setsockopt(zmq.SNDHWM, PARAMS_SNDHWM)
        self._auth = None
        self._private_dir = None
        loopback = security.is_loopback(host[len("tcp://") :])
        if config.job_name == "" and port == 0 and loopback and not config.keys_dir:
            # mkdtemp makes the directory mode 0700: other users cannot reach the sockets in it.
            self._private_dir = tempfile.mkdtemp(prefix="impala-")
            addresses = (f"ipc://{self._private_dir}/unrolls", f"ipc://{self._private_dir}/params")
            for s, address in zip(sockets, addresses):
                s.bind(address)
            return addresses
        if config.keys_dir:
            try:
                self._auth = security.serve_securely(self._context, sockets, config.keys_dir)
            except security.KeysError as e:
                raise ConfigError(str(e))
        elif not loopback:
            if not config.insecure:
                raise ConfigError(
                    f"--learner_address={config.learner_address} is reachable from other hosts: give "
                    "--keys_dir (python -m impala.security --keys_dir=DIR) or --insecure"
                )
            logging.warning(
                "Learner bound to %s WITHOUT authentication or encryption (--insecure): "
                "anyone who can reach it can send unrolls.",
                host,
            )
        else:
            logging.warning(
                "Learner bound to %s without keys: any process on this machine can connect and send unrolls.", host
            )
        try:
            if port == 0:
                unroll_port_bound = self._unroll_socket.bind_to_random_port(host)
                parameter_port = self._params_socket.bind_to_random_port(host)
            else:
                own_port, parameter_port = unroll_port(port, rank), params_port(port)
                self._unroll_socket.bind(f"{host}:{own_port}")
                if self._params_socket is not None:
                    self._params_socket.bind(f"{host}:{parameter_port}")
                unroll_port_bound = own_port
        except zmq.ZMQError as e:
            raise ConfigError(f"cannot bind learner rank {rank} at {config.learner_address}: {e}")
        return f"{host}:{unroll_port_bound}", f"{host}:{parameter_port}"

    def refused_connections(self) -> int:
        return self._auth.provider.refused if self._auth else 0

    # -- training ----------------------------------------------------------------

    def next_batch(self, timeout: float) -> dict[str, torch.Tensor] | None:
        """The next batch on the learner's device, or None after `timeout` seconds;
        the batch returned before must no longer be used (its memory is reused)."""
        return self.feed.next(timeout)

    def offer_snapshot(self) -> None:
        """Hands the parameters to the publisher if they are newer than the last
        snapshot it took and it is free; otherwise a later pass of the loop does
        (rank 0 only: the other ranks have no publisher)."""
        if self._offered < self.param_version and self.publisher.offer(self.param_version):
            self._offered = self.param_version

    def check_threads(self) -> None:
        """Raises ServerThreadError if a server thread has failed."""
        for t in self._threads:
            if t.error is not None:
                raise ServerThreadError(f"the learner's {t.name} thread failed: {_one_line(t.error)}")

    def run(self, tick: Callable[[], None] | None = None, stop: threading.Event | None = None) -> None:
        """Trains until --total_environment_frames, or until the mean return of the
        last 100 episodes reaches --stop_at_return, then tells the actors the run is
        finished (for up to FINISH_GRACE_S); `tick` runs at least once a second
        (the local launcher uses it to watch its actors). Raises LearnerFailure when a
        server thread fails, updates keep being non-finite or another rank is lost.
        With N ranks, SIGTERM or SIGINT to any rank ends the loop of all after the same
        update (distributed.stop_on_signals). With one, the signal's KeyboardInterrupt
        ends it; `stop` (set by the same signal handler) also returns it within about a
        second, after the current update, for an interrupt that was lost where Python
        could not raise it (impala/experiment.py, STOP_REQUESTED)."""
        config = self.config
        log = None
        if self.is_main:
            book = distributed.GatheredBook(self.book) if self.ranks.world_size > 1 else self.book
            log = ProgressLog(config, self.metrics, book, self.watch, self.refused_connections, self.frames)
        nonfinite_in_a_row = 0
        batch = None  # a rank keeps its batch until every rank has one
        stopped = False  # by a signal to some rank: the actors are not told the run finished
        reached = self._reached(log)  # --stop_at_return (rank 0 decides; a resumed run may be there)
        with distributed.stop_on_signals(self.ranks.world_size > 1) as stop_requested:
            # One rank stops when the goal is reached; N ranks stop together, at their next agreement.
            while self.frames < config.total_environment_frames and not (reached and self.ranks.world_size == 1):
                if self.ranks.world_size == 1 and stop is not None and stop.is_set():
                    logging.info("Asked to stop at %d frames.", self.frames)
                    stopped = True
                    break
                self.check_threads()
                if tick is not None:
                    tick()
                if batch is None:
                    with self.watch("learner_wait"):
                        batch = self.next_batch(timeout=1.0)
                train, write_row = batch is not None, True
                if self.ranks.world_size > 1:
                    agreed = self._agree(batch is not None, stop_requested.is_set() or reached, log)
                    if agreed.stop:
                        stopped = True
                        break
                    # Rows only after the others' reports came in (rank 0's own clock decided).
                    train, write_row = agreed.train, agreed.log
                if train:
                    schedule = (learning_rate_at(self.frames, config), entropy_cost_at(self.frames, config))
                    with self.watch("learner_step"):
                        stats = self._learn(batch, *schedule)
                    nonfinite_in_a_row = self._after_update(stats, log, nonfinite_in_a_row)
                    if self.replay is not None:
                        nonfinite_in_a_row = self._replay(batch, stats, schedule, log, nonfinite_in_a_row)
                    batch = None
                if self.is_main:
                    with self.watch("learner_publish"):
                        self.offer_snapshot()
                if log is not None and write_row:
                    if log.maybe_write(self.frames, self.param_version, self.optimizer.param_groups[0]["lr"]):
                        reached = reached or self._reached(log)
        if self.ranks.world_size > 1:  # every rank left the loop at the same agreement or frame count
            self._gather_reports(log)
        if log is not None:
            log.maybe_write(self.frames, self.param_version, self.optimizer.param_groups[0]["lr"], force=True)
        if self.is_main and (not stopped or reached):
            self._tell_finished()

    def _reached(self, log: ProgressLog | None) -> bool:
        """Whether rank 0's progress log says --stop_at_return is reached (logged once)."""
        if log is None or not log.reached(self.config.return_goal):
            return False
        logging.info(
            "The mean return of the last %d episodes is %.2f, at least --stop_at_return=%s: stopping at %d frames.",
            log.recent.episodes,
            log.recent.mean,
            self.config.stop_at_return,
            self.frames,
        )
        return True

    def _learn(self, batch: dict[str, torch.Tensor], learning_rate: float, entropy_cost: float) -> dict[str, float]:
        """One update (learn_step) on `batch`, with the other ranks when there are some."""
        all_reduce = self._all_reduce if self.ranks.world_size > 1 else None
        config = self.config
        return learn_step(self.agent, self.optimizer, batch, config, learning_rate, all_reduce, entropy_cost)

    def _replay(
        self,
        batch: dict[str, torch.Tensor],
        stats: dict[str, float],
        schedule: tuple[float, float],
        log: ProgressLog | None,
        nonfinite_in_a_row: int,
    ) -> int:
        """After a fresh batch's update: stores its columns and runs the replayed updates
        due (replay.replays_due), at the fresh update's `schedule` (learning rate and
        entropy cost); returns the non-finite updates in a row. Every rank stores and
        replays alike (the same batch count and the same all-reduced `skipped`), so
        their all-reduces pair up. A batch whose update was skipped is not stored:
        replaying it would be skipped again."""
        self._fresh_batches += 1
        if not stats["skipped"]:
            with self.watch("learner_step"):
                self.replay.add(batch)
        columns = self.config.batch_size // self.ranks.world_size
        for _ in range(replay.replays_due(self._fresh_batches, self.config.replay_proportion)):
            if len(self.replay) < columns:  # only after skipped first batches: these replays are dropped
                break
            with self.watch("learner_step"):
                stats = self._learn(self.replay.sample(columns, self._replay_generator), *schedule)
            nonfinite_in_a_row = self._after_update(stats, log, nonfinite_in_a_row, replayed=True)
            if self.is_main:
                with self.watch("learner_publish"):
                    self.offer_snapshot()
        return nonfinite_in_a_row

    def _all_reduce(self, sums: list[torch.Tensor], means: list[torch.Tensor]) -> None:
        try:
            self.ranks.all_reduce(sums, means)
        except distributed.RankLostError as e:
            raise RankLostError(str(e))

    def _agree(self, have_batch: bool, stop: bool, log: ProgressLog | None) -> distributed.Agreement:
        """What all ranks do now (train, stop, log); gathers the ranks' actor reports for
        rank 0 when it is to write a progress row."""
        log_due = log is not None and log.clock() - log.last_time >= self.config.log_interval_s
        try:
            agreed = self.ranks.agree(have_batch, stop, log_due)
        except distributed.RankLostError as e:
            raise RankLostError(str(e))
        if agreed.log:
            self._gather_reports(log)
        if agreed.stop:
            logging.info("Learner rank %d: stopping with the other ranks.", self.ranks.rank)
        return agreed

    def _gather_reports(self, log: ProgressLog | None) -> None:
        """The other ranks' actor reports, for rank 0's next progress row."""
        try:
            reports = self.ranks.gather_reports(None if self.is_main else self.book.take_report())
        except distributed.RankLostError as e:
            raise RankLostError(str(e))
        if log is not None:
            log.book.others = reports[1:]

    def _after_update(
        self, stats: dict[str, float], log: ProgressLog | None, nonfinite_in_a_row: int, replayed: bool = False
    ) -> int:
        """Logs the update, counts a fresh batch's frames, advances the parameter
        version and checkpoints; returns the non-finite updates in a row (fresh and
        replayed alike)."""
        config = self.config
        if log is not None:
            log.add_update(stats, replayed=replayed)
        # A fresh batch's frames count even when its update is skipped: they were consumed.
        # config.frames_per_step is the whole batch's (all ranks). Replayed ones are not new frames.
        if not replayed:
            self.frames += config.frames_per_step
        if stats["skipped"]:
            nonfinite_in_a_row += 1
            logging.warning(
                "Update skipped: loss %g, gradient norm %g (%d in a row).",
                stats["total_loss"],
                stats["grad_norm"],
                nonfinite_in_a_row,
            )
            if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise NonFiniteLossError(
                    f"{nonfinite_in_a_row} updates in a row had a non-finite loss or gradient norm "
                    f"(last: loss {stats['total_loss']:g}, gradient norm {stats['grad_norm']:g}); the "
                    "last good checkpoint is kept. Try a lower --learning_rate or --max_grad_norm"
                )
        else:
            nonfinite_in_a_row = 0
            self.param_version += 1
        if self.is_main and time.monotonic() - self._last_checkpoint > config.checkpoint_interval_s:
            self.save_checkpoint()
        return nonfinite_in_a_row

    def _tell_finished(self) -> None:
        """Answers every parameter request 'finished' for up to FINISH_GRACE_S, so that
        actors exit instead of waiting for a learner that is gone; ends sooner once
        every actor that sent unrolls lately has been told."""
        self.params.finish()
        live = set(self.book.take_report().unroll_rates)
        deadline = time.monotonic() + FINISH_GRACE_S
        while time.monotonic() < deadline and not (live and self.params.has_told(live)):
            self.check_threads()
            time.sleep(0.1)
        logging.info(
            "Run finished at %d frames; told the actors (%d of %d live ones asked).",
            self.frames,
            sum(self.params.has_told({task}) for task in live),
            len(live),
        )

    def close(self, save: bool = True) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        if save:
            self.save_checkpoint()
            self.save_replay()
        self._unroll_socket.close(linger=0)
        if self._params_socket is not None:
            self._params_socket.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
        if self.metrics is not None:
            self.metrics.close()
        self.ranks.close()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={name} but CUDA is not available here")
    return torch.device(name)
