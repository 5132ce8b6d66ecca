"""One-machine training: the learner in this process, `--num_actors` actor
processes beside it, talking over the same ZeroMQ wire as a multi-host run.
The learner listens on `ipc://` sockets in a fresh directory only this user can
enter (Learner._bind), so no other user's process can reach it; an explicit
--learner_address or --keys_dir binds TCP instead (docs/protocol.md, "Who can connect").

Actors are spawned (not forked: torch and ZeroMQ threads do not survive a fork),
die with this process (PR_SET_PDEATHSIG) and ignore Ctrl-C, which this process
handles by writing a checkpoint and stopping them. A crashed actor is restarted;
one that keeps crashing stops the run with its exit code.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time

from absl import flags, logging

from impala.actor import run_actor
from impala.config import Config
from impala.learner import Learner
from impala.process import die_with_parent

MAX_RESTARTS = 3  # per actor within RESTART_WINDOW_S before the run gives up
RESTART_WINDOW_S = 60.0


class ActorCrashLoop(RuntimeError):
    pass


def _actor_main(config: Config, task: int, unroll_address: str, params_address: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher owns Ctrl-C
    if not die_with_parent(multiprocessing.parent_process().pid):  # even if it is SIGKILLed (Linux)
        return
    flags.FLAGS.mark_as_parsed()  # flags arrive in `config`; this quiets absl's warning
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    run_actor(config, task, unroll_address, params_address)


class ActorPool:
    def __init__(self, config: Config, unroll_address: str, params_address: str):
        self._context = multiprocessing.get_context("spawn")
        self._args = (config, unroll_address, params_address)
        self._processes: dict[int, multiprocessing.Process] = {}
        self._crashes: dict[int, list[float]] = {}
        for task in range(config.num_actors):
            self._start(task)

    def _start(self, task: int) -> None:
        config, unroll_address, params_address = self._args
        # Not daemonic, so that an actor may start env worker processes of its own;
        # stop() ends actors, and PR_SET_PDEATHSIG does if this process is killed.
        process = self._context.Process(
            target=_actor_main, name=f"actor-{task}", args=(config, task, unroll_address, params_address)
        )
        process.start()
        self._processes[task] = process

    def check(self) -> None:
        """Restarts dead actors; raises ActorCrashLoop if one keeps dying."""
        now = time.monotonic()
        for task, process in list(self._processes.items()):
            if process.is_alive():
                continue
            crashes = [t for t in self._crashes.get(task, []) if now - t < RESTART_WINDOW_S] + [now]
            self._crashes[task] = crashes
            if len(crashes) > MAX_RESTARTS:
                raise ActorCrashLoop(
                    f"actor {task} died {len(crashes)} times within {RESTART_WINDOW_S:.0f}s "
                    f"(last exit code {process.exitcode}); see its log above"
                )
            logging.warning("Actor %d exited with code %s; restarting it.", task, process.exitcode)
            self._start(task)

    def stop(self) -> None:
        for process in self._processes.values():
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + 5.0
        for process in self._processes.values():
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()


def train(config: Config, stop: threading.Event | None = None) -> None:
    """Trains until the frame budget, or until `stop` is set (Learner.run), then stops
    every process it started."""
    learner = Learner(config)
    actors = None
    failed = True
    try:
        if learner.frames >= config.total_environment_frames:
            logging.info("Already trained for %d frames; nothing to do.", learner.frames)
            failed = False
            return
        logging.info("Learner at %s; starting %d actors.", learner.unroll_address, config.num_actors)
        actors = ActorPool(config, learner.unroll_address, learner.params_address)
        learner.run(tick=actors.check, stop=stop)
        failed = False
    except KeyboardInterrupt:
        logging.info("Interrupted at %d frames; writing a checkpoint and stopping.", learner.frames)
        failed = False
    finally:
        if actors is not None:
            actors.stop()
        learner.close(save=True)
        if not failed:
            logging.info("Done: %d frames; logs in %s.", learner.frames, config.logdir)
