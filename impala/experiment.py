"""Entry point: `python -m impala.experiment [--flagfile=configs/X.cfg] [--flags]`.

With no --job_name, trains on this machine (learner + actor processes). With
--job_name=learner or --job_name=actor --task=N, runs one job of a multi-host
run. With --mode=test, plays the latest checkpoint of --logdir and reports its
scores instead (evaluate.py). Every user error ends in one line on stderr and
exit status 2; a learner that cannot go on (a failed server thread, non-finite
updates) writes a checkpoint and ends in one line and exit status 1.
"""

from __future__ import annotations

import signal
import sys

from absl import app, flags, logging

from impala import config as config_lib

config_lib.define_flags()
FLAGS = flags.FLAGS


def _fail(message: str, status: int = 2) -> None:
    print(f"impala: error: {message}", file=sys.stderr)
    sys.exit(status)


def _parse(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(str(e).splitlines()[0])


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags look like --name=value")
    # SIGTERM (docker stop, SLURM, kill) stops as Ctrl-C does: checkpoint, then exit. SIGINT
    # is set explicitly because a shell starts background jobs with it ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    # Imported here so that --help stays fast and flag errors come first.
    from impala import address, checkpoint, envs, learner, local, security
    from impala.actor import run_actor

    try:
        config = config_lib.from_flags(FLAGS)
        envs.resolve_level(config.level_name)
        if config.mode == "test":  # plays the latest checkpoint of --logdir (impala/evaluate.py)
            from impala import evaluate

            evaluate.run(config)
        elif config.job_name == "":
            local.train(config)
        elif config.job_name == "learner":
            server = learner.Learner(config)
            logging.info("Learner listening at %s (parameters at %s).", server.unroll_address,
                         server.params_address)
            try:
                server.run()
            finally:
                server.close()
        else:
            unroll_address, params_address = address.learner_addresses(config.learner_address)
            if config.task < 0:
                raise config_lib.ConfigError(f"--task must be >= 0, got {config.task}")
            run_actor(config, config.task, unroll_address, params_address)
    except KeyboardInterrupt:
        logging.info("Interrupted.")
    except (config_lib.ConfigError, envs.UnknownLevelError, checkpoint.CheckpointError,
            local.ActorCrashLoop, security.KeysError) as e:
        _fail(str(e))
    except learner.LearnerFailure as e:  # not the user's doing: status 1 (a checkpoint was written)
        _fail(str(e), status=1)


def run_main() -> None:
    app.run(main, flags_parser=_parse)


if __name__ == "__main__":
    run_main()
