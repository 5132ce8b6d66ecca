"""The learner: receives unrolls, applies V-trace, updates the network, serves
parameters.

Two ZeroMQ ROUTER sockets, each served by its own thread so that the training
loop never waits on the network:
  - unrolls (the learner address): decoded, validated and gathered into
    batches of `batch_size` envs; a bounded queue of ready batches gives
    back-pressure (a full queue stops reads, the actors' sends then block);
  - parameters (the next port): an actor asks with the version it has and gets
    the newest snapshot, or 'params_unchanged'. Snapshots are taken after each
    update in the training thread and only read by the serving thread.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import zmq
from absl import logging

from impala import checkpoint, envs, losses, security, unroll, wire
from impala.config import Config, ConfigError
from impala.memory import reuse_freed_memory
from impala.metrics import MetricsWriter, Stopwatch
from impala.nets import Agent, make_agent
from impala.optim import RMSPropTF

# Per-peer ZeroMQ queue bounds: with the bounded batch queue they cap the memory
# that unrolls in flight can take, whatever the actors do.
UNROLL_RCVHWM = 4
ACTOR_SILENT_S = 30.0  # an actor not heard from this long is reported gone
# Parts of an actor's time it reports with its unrolls (meta 'seconds'); others are ignored.
ACTOR_TIMES = ("env", "inference", "act", "send", "params")


@dataclass
class EnvSpec:
    observation_shape: tuple[int, ...]
    observation_dtype: np.dtype
    num_actions: int
    instruction_length: int = 0  # > 0: levels with instructions (DMLab), see envs.instruction_length


def env_spec(config: Config) -> EnvSpec:
    """Reads the level's observation and action spaces from one instance."""
    try:
        env = envs.make(config.level_name, seed=config.seed, num_action_repeats=config.num_action_repeats,
                        **envs.options(config))
    except envs.UnknownLevelError:
        raise
    except ValueError as e:  # e.g. a continuous action space
        raise ConfigError(str(e).splitlines()[0])
    try:
        return EnvSpec(tuple(env.observation_shape), np.dtype(env.observation_dtype), env.num_actions,
                       envs.instruction_length(env))
    finally:
        env.close()


def network_signature(config: Config, agent: Agent) -> dict:
    """What a checkpoint must match to be loaded into this learner."""
    return {
        "observation_shape": list(agent.observation_shape),
        "num_actions": agent.num_actions,
        "network": agent.network,
        "use_lstm": agent.core is not None,
        "lstm_size": config.lstm_size if agent.core is not None else None,
        "mlp_sizes": list(config.hidden_sizes) if agent.network == "mlp" else None,
        # Only for agents that read instructions, so other checkpoints keep matching.
        **({"instruction_length": agent.instruction_length} if agent.instruction_length else {}),
    }


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


def learn_step(agent: Agent, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               config: Config) -> dict[str, float]:
    """One update on a batch of unrolls ([T+1, B, ...] tensors, see unroll.py)."""
    initial_state = tuple(batch[f"core_state_{k}"] for k in range(2) if f"core_state_{k}" in batch)
    output, _ = agent(batch["observation"], batch["action"], batch["reward"], batch["done"], initial_state,
                      instruction=batch.get("instruction"))

    # Env output t led the network to pick action t+1: learn from transitions
    # 0..T-1 and bootstrap from the value of the last env output.
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
        clip_rho_threshold=config.clip_rho_threshold if config.clip_rho_threshold > 0 else None,
        clip_pg_rho_threshold=config.clip_pg_rho_threshold if config.clip_pg_rho_threshold > 0 else None,
    )
    optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(agent.parameters(), max_norm)
    optimizer.step()
    return {
        "total_loss": loss.total.item(),
        "pg_loss": loss.policy_gradient.item(),
        "baseline_loss": loss.baseline.item(),
        "entropy_loss": loss.entropy.item(),
        "grad_norm": grad_norm.item(),
    }


@dataclass
class ActorStats:
    unrolls: int = 0
    envs: int = 0
    last_seen: float = 0.0
    unrolls_logged: int = 0  # unrolls at the previous progress line, for rates
    silent: bool = False


@dataclass
class ServerStats:
    bad_messages: int = 0
    lags: list = field(default_factory=list)
    episodes: list = field(default_factory=list)  # (level, return, length) as unrolls arrive
    actors: dict = field(default_factory=dict)  # task -> ActorStats


class Learner:
    """Owns the network, the optimizer and the two sockets. `run` trains until the
    frame budget; `close` stops the threads and writes a final checkpoint."""

    def __init__(self, config: Config, spec: EnvSpec | None = None):
        check_logdir(config.logdir)
        self.config = config
        self.spec = spec or env_spec(config)
        self.device = _device(config.device)
        torch.set_num_threads(config.learner_threads)
        reuse_freed_memory()
        torch.manual_seed(config.seed)

        self.agent = make_agent(config, self.spec.observation_shape, self.spec.num_actions,
                                self.spec.instruction_length).to(self.device)
        self.optimizer = RMSPropTF(self.agent.parameters(), lr=config.learning_rate, decay=config.decay,
                                   momentum=config.momentum, epsilon=config.epsilon)
        self.signature = network_signature(config, self.agent)
        self.frames = 0
        self.param_version = 0
        self._restore()

        self.unroll_spec = unroll.unroll_spec(config.unroll_length, self.spec.observation_shape,
                                              self.spec.observation_dtype, self.spec.num_actions,
                                              state_sizes(self.agent),
                                              instruction_length=self.spec.instruction_length)
        self.stats = ServerStats()
        self._stats_lock = threading.Lock()
        # Seconds per part of the learner's threads and of the actors (from their
        # unrolls); each metrics row has them per second of wall time ('time/...').
        self.watch = Stopwatch()
        self._batches: queue.Queue = queue.Queue(maxsize=config.max_queued_batches)
        self._stop = threading.Event()
        self._params_frames: tuple[int, list] = (0, [])
        self.run_id = uuid.uuid4().hex  # tells actors that parameter versions restarted
        self._publish()

        self._context = zmq.Context.instance()
        self.unroll_address, self.params_address = self._bind()
        self._threads = [
            threading.Thread(target=self._serve_unrolls, name="unrolls", daemon=True),
            threading.Thread(target=self._serve_params, name="params", daemon=True),
        ]
        for t in self._threads:
            t.start()
        self.metrics = MetricsWriter(config.logdir)
        self._last_checkpoint = time.monotonic()

    # -- checkpoints ---------------------------------------------------------------

    def _restore(self) -> None:
        path = checkpoint.latest(self.config.logdir)
        if path is None:
            return
        state = checkpoint.load(path)
        checkpoint.check_signature(state.get("signature", {}), self.signature, path)
        try:
            self.agent.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise checkpoint.CheckpointError(f"checkpoint {path} does not fit this network: {str(e).splitlines()[0]}")
        self.frames = int(state["frames"])
        self.param_version = int(state["param_version"])
        _drop_rows_after(os.path.join(self.config.logdir, "metrics.jsonl"), self.frames)
        logging.info("Resumed from %s at %d frames (parameter version %d).", path, self.frames, self.param_version)

    def save_checkpoint(self) -> None:
        state = {
            "model": self.agent.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "frames": self.frames,
            "param_version": self.param_version,
            "signature": self.signature,
            "level_name": self.config.level_name,
        }
        try:
            path = checkpoint.save(self.config.logdir, state, self.frames, keep=self.config.keep_checkpoints)
            logging.info("Saved checkpoint %s.", path)
        except OSError as e:  # e.g. a full disk: keep training, the previous checkpoint stays
            logging.error("Checkpoint at %d frames not written (%s); the previous one is kept.",
                          self.frames, e.strerror or e)
        self._last_checkpoint = time.monotonic()

    # -- sockets -----------------------------------------------------------------

    def _bind(self) -> tuple[str, str]:
        config = self.config
        host, port = split_address(config.learner_address)
        self._unroll_socket = self._context.socket(zmq.ROUTER)
        self._params_socket = self._context.socket(zmq.ROUTER)
        sockets = [self._unroll_socket, self._params_socket]
        for s in sockets:
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, config.max_message_mb * 2**20)
        self._unroll_socket.setsockopt(zmq.RCVHWM, UNROLL_RCVHWM)
        self._auth = None
        if config.keys_dir:
            try:
                self._auth = security.serve_securely(self._context, sockets, config.keys_dir)
            except security.KeysError as e:
                raise ConfigError(str(e))
        elif not security.is_loopback(host[len("tcp://"):]):
            if not config.insecure:
                raise ConfigError(
                    f"--learner_address={config.learner_address} is reachable from other hosts: give "
                    "--keys_dir (python -m impala.security --keys_dir=DIR) or --insecure")
            logging.warning("Learner bound to %s WITHOUT authentication or encryption (--insecure): "
                            "anyone who can reach it can send unrolls.", host)
        try:
            if port == 0:
                unroll_port = self._unroll_socket.bind_to_random_port(host)
                params_port = self._params_socket.bind_to_random_port(host)
            else:
                unroll_port, params_port = port, port + 1
                self._unroll_socket.bind(f"{host}:{unroll_port}")
                self._params_socket.bind(f"{host}:{params_port}")
        except zmq.ZMQError as e:
            raise ConfigError(f"cannot bind the learner at {config.learner_address}: {e}")
        return f"{host}:{unroll_port}", f"{host}:{params_port}"

    def _serve(self, socket: zmq.Socket, handle: Callable[[zmq.Socket], None]) -> None:
        """Calls `handle` for each message until close(); errors never end the loop."""
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                handle(socket)
            except (wire.WireError, unroll.UnrollError) as e:
                with self._stats_lock:
                    self.stats.bad_messages += 1
                    count = self.stats.bad_messages
                logging.log_every_n_seconds(logging.WARNING, "Dropped a bad message (%d so far): %s", 5, count,
                                            str(e).splitlines()[0])

    def _serve_unrolls(self) -> None:
        batcher = unroll.Batcher(self.unroll_spec, self.config.batch_size)

        def handle(socket: zmq.Socket) -> None:
            with self.watch("learner_receive"):
                _, message = wire.recv_routed(socket, allowed_kinds=("unroll",))
                unroll.validate(message.arrays, self.unroll_spec)
                self._record_unroll(message)
            with self.watch("learner_assemble"):
                batches = batcher.add(dict(message.arrays))
            for batch in batches:
                self._put(batch)

        self._serve(self._unroll_socket, handle)

    def _record_unroll(self, message: wire.Message) -> None:
        level = message.meta.get("level")
        level = level if isinstance(level, str) and len(level) <= 200 else self.config.level_name
        arrays = message.arrays
        done = arrays["done"][1:]  # step 0 repeats the previous unroll's last step
        episodes = [(level, float(r), int(n)) for r, n in
                    zip(arrays["episode_return"][1:][done], arrays["episode_step"][1:][done])]
        with self._stats_lock:
            actor = self.stats.actors.get(message.task)
            if actor is None or actor.silent:
                logging.info("Actor %d %s (level %s).", message.task,
                             "connected" if actor is None else "is back", level)
                actor = self.stats.actors.setdefault(message.task, ActorStats())
                actor.silent = False
            actor.unrolls += 1
            actor.envs += arrays["reward"].shape[1]
            actor.last_seen = time.monotonic()
            if message.meta.get("run") == self.run_id:  # versions of an earlier run don't compare
                self.stats.lags.append(self.param_version - message.param_version)
            self.stats.episodes.extend(episodes)
        seconds = message.meta.get("seconds")
        if isinstance(seconds, dict):
            for part in ACTOR_TIMES:
                value = seconds.get(part)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e6:
                    self.watch.add(f"actor_{part}", float(value))

    def _put(self, batch: unroll.Unroll) -> None:
        tensors = {name: torch.from_numpy(array) for name, array in batch.items()}
        if self.device.type == "cuda":
            with self.watch("learner_assemble"):
                tensors = {name: t.pin_memory() for name, t in tensors.items()}
        with self.watch("learner_queue_full"):
            self._put_waiting(tensors)

    def _put_waiting(self, tensors: dict[str, torch.Tensor]) -> None:
        while not self._stop.is_set():
            try:
                self._batches.put(tensors, timeout=0.1)
                return
            except queue.Full:
                continue

    def _serve_params(self) -> None:
        def handle(socket: zmq.Socket) -> None:
            identity, message = wire.recv_routed(socket, allowed_kinds=("get_params",))
            have, run = message.meta.get("version"), message.meta.get("run")
            if not isinstance(have, int) or isinstance(have, bool):
                raise wire.WireError("get_params without an integer 'version'")
            version, frames = self._params_frames
            # A different run id means the asker's version belongs to an earlier learner
            # (restarted from a checkpoint): it must take ours even if its number is higher.
            if version > have or run != self.run_id:
                socket.send_multipart([identity, *frames], copy=False)
            else:
                wire.send_routed(socket, identity, "params_unchanged", param_version=version,
                                 meta={"run": self.run_id})

        self._serve(self._params_socket, handle)

    def _publish(self) -> None:
        """Snapshots the parameters for the serving thread (a fresh copy per version,
        so frames still being sent are never overwritten)."""
        arrays = {name: t.detach().to("cpu", copy=True).numpy()
                  for name, t in self.agent.state_dict().items()}
        frames = wire.encode("params", arrays, param_version=self.param_version, meta={"run": self.run_id})
        self._params_frames = (self.param_version, frames)

    # -- training ----------------------------------------------------------------

    def next_batch(self, timeout: float) -> dict[str, torch.Tensor] | None:
        try:
            batch = self._batches.get(timeout=timeout)
        except queue.Empty:
            return None
        return {name: t.to(self.device, non_blocking=True) for name, t in batch.items()}

    def run(self, tick: Callable[[], None] | None = None) -> None:
        """Trains until --total_environment_frames; `tick` runs at least once a second
        (the local launcher uses it to watch its actors)."""
        config = self.config
        log = _ProgressLog(self)
        while self.frames < config.total_environment_frames:
            if tick is not None:
                tick()
            with self.watch("learner_wait"):
                batch = self.next_batch(timeout=1.0)
            if batch is None:
                log.maybe_write({})
                continue
            for group in self.optimizer.param_groups:
                group["lr"] = config.learning_rate * max(0.0, 1.0 - self.frames / config.total_environment_frames)
            with self.watch("learner_step"):
                stats = learn_step(self.agent, self.optimizer, batch, config)
            self.frames += config.frames_per_step
            self.param_version += 1
            with self.watch("learner_publish"):
                self._publish()
            log.maybe_write(stats)
            if time.monotonic() - self._last_checkpoint > config.checkpoint_interval_s:
                self.save_checkpoint()
        log.maybe_write({}, force=True)

    def close(self, save: bool = True) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        if save:
            self.save_checkpoint()
        self._unroll_socket.close(linger=0)
        self._params_socket.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self.metrics.close()


class _ProgressLog:
    """Progress line, metrics.jsonl row and TensorBoard scalars every log interval."""

    def __init__(self, learner: Learner):
        self.learner = learner
        self.recent = collections.deque(maxlen=100)
        self.last_time = time.monotonic()
        self.last_frames = learner.frames
        self.loss_sums: dict[str, float] = collections.defaultdict(float)
        self.updates = 0

    def maybe_write(self, stats: dict[str, float], force: bool = False) -> None:
        for k, v in stats.items():
            self.loss_sums[k] += v
        self.updates += bool(stats)
        now = time.monotonic()
        if not force and now - self.last_time < self.learner.config.log_interval_s:
            return
        if force and self.learner.frames == self.last_frames:
            return  # nothing new since the last row
        learner, config = self.learner, self.learner.config
        elapsed = max(now - self.last_time, 1e-9)
        fps = (learner.frames - self.last_frames) / elapsed
        with learner._stats_lock:
            lags, learner.stats.lags = learner.stats.lags, []
            episodes, learner.stats.episodes = learner.stats.episodes, []
            rates = {}
            for task, actor in learner.stats.actors.items():
                if actor.silent:
                    continue
                if now - actor.last_seen > ACTOR_SILENT_S:
                    actor.silent = True
                    logging.warning("Actor %d silent for %.0fs; counted as gone.", task, now - actor.last_seen)
                    continue
                rates[task] = (actor.unrolls - actor.unrolls_logged) / elapsed
                actor.unrolls_logged = actor.unrolls
            bad = learner.stats.bad_messages
        returns = [e[1] for e in episodes]
        self.recent.extend(returns)
        row = {
            "frames": learner.frames,
            "param_version": learner.param_version,
            "fps": round(fps, 1),
            "sps": round(fps / config.num_action_repeats, 1),
            "mean_episode_return": float(np.mean(returns)) if episodes else None,
            "mean_episode_length": float(np.mean([e[2] for e in episodes])) if episodes else None,
            "episodes": len(episodes),
            "policy_lag": float(np.mean(lags)) if lags else None,
            "learning_rate": learner.optimizer.param_groups[0]["lr"],
            "connected_actors": len(rates),
            "refused_connections": learner._auth.provider.refused if learner._auth else 0,
            "bad_messages": bad,
            "wall_time": time.time(),
        }
        row.update({k: v / max(self.updates, 1) for k, v in self.loss_sums.items()})
        row.update({f"actor_unrolls_per_s/{task}": round(rate, 2) for task, rate in sorted(rates.items())})
        # Seconds spent per second of wall time, summed over threads and actors.
        row.update({f"time/{part}": round(s / elapsed, 4) for part, s in sorted(learner.watch.take().items())})
        levels = sorted({e[0] for e in episodes})
        if len(levels) > 1 or (levels and levels[0] != config.level_name):  # multi-task runs
            for level in levels:
                row[f"mean_episode_return/{level}"] = float(np.mean([r for lv, r, _ in episodes if lv == level]))
        learner.metrics.write(row)
        ret = f"{row['mean_episode_return']:.1f}" if episodes else "-"
        recent = f"{np.mean(self.recent):.1f}" if self.recent else "-"
        logging.info(
            "frames %s | %s steps/s | return %s (%d episodes; last 100: %s) | loss %.3g (pg %.3g, "
            "baseline %.3g, entropy %.3g) | lag %s | actors %d (%s unrolls/s each)",
            f"{learner.frames:,}", f"{row['sps']:,.0f}", ret, len(episodes), recent,
            row.get("total_loss", float("nan")), row.get("pg_loss", float("nan")),
            row.get("baseline_loss", float("nan")), row.get("entropy_loss", float("nan")),
            f"{row['policy_lag']:.1f}" if lags else "-", len(rates),
            f"{min(rates.values()):.1f}-{max(rates.values()):.1f}" if rates else "-")
        self.loss_sums.clear()
        self.updates = 0
        self.last_time, self.last_frames = now, learner.frames


def _drop_rows_after(path: str, frames: int) -> None:
    """On resume, forgets metrics rows of training lost with the previous process
    (logged after its last checkpoint), so `frames` stays monotonic in the file."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["frames"] <= frames:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
        logging.info("Dropped %d metrics rows logged after the checkpoint.", len(lines) - len(keep))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={name} but CUDA is not available here")
    return torch.device(name)


def split_address(address: str) -> tuple[str, int]:
    """'tcp://HOST:PORT' -> ('tcp://HOST', PORT)."""
    if not address.startswith("tcp://") or ":" not in address[6:]:
        raise ConfigError(f"--learner_address must look like tcp://HOST:PORT, got {address!r}")
    host, _, port = address.rpartition(":")
    try:
        port_number = int(port)
    except ValueError:
        raise ConfigError(f"--learner_address has a bad port: {address!r}")
    if not 0 <= port_number < 65535:
        raise ConfigError(f"--learner_address port out of range: {address!r}")
    return host, port_number
