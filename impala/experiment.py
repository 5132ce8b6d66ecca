"""Entry point: `python -m impala.experiment [--flagfile=configs/X.cfg] [--flags]`.

With no --job_name, trains on this machine (learner + actor processes). With
--job_name=learner or --job_name=actor --task=N, runs one job of a multi-host
run. With --mode=test, plays the latest checkpoint of --logdir and reports its
scores instead (evaluate.py). Every user error ends in one line on stderr and
exit status 2; a learner that cannot go on (a failed server thread, non-finite
updates) writes a checkpoint and ends in one line and exit status 1.

    python -m impala.experiment --flagfile=configs/cartpole.cfg --logdir=/tmp/impala/cartpole
"""

from __future__ import annotations

import signal
import sys
import textwrap
import threading

from absl import app, flags, logging

from impala import config as config_lib

config_lib.define_flags()
FLAGS = flags.FLAGS


def _fail(message: str, status: int = 2) -> None:
    print(f"impala: error: {message}", file=sys.stderr)
    sys.exit(status)


_HELP, _HELPFULL = ("--help", "-help", "--helpshort", "-helpshort", "-?", "-h"), ("--helpfull", "-helpfull")


def _help() -> str:
    """The program's own flags, by section of impala/config.py."""
    lines = [__doc__.strip(), "", "Flags are --name=value; --flagfile=FILE reads them from a file (configs/*.cfg)."]
    for title, names in config_lib.sections():
        lines += ["", f"{title}:"]
        for name in names:
            flag = FLAGS[name]
            default = flag.default_as_str.strip("'") or "''"
            lines.append(f"  --{name} (default: {default})")
            lines += textwrap.wrap(flag.help, 88, initial_indent="      ", subsequent_indent="      ")
    lines += ["", "--helpfull lists these and absl's own flags (logging, --flagfile)."]
    return "\n".join(lines)


def _parse(argv: list[str]) -> list[str]:
    # absl's --help lists only flags defined in this module (none: they come from
    # config.py) and exits 1; ours lists them by section and exits 0, as --helpfull does.
    if any(arg in _HELP for arg in argv[1:]):
        print(_help())
        sys.exit(0)
    if any(arg in _HELPFULL for arg in argv[1:]):
        app.usage(writeto_stdout=True)
        sys.exit(0)
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(str(e).splitlines()[0])


# Set by SIGTERM or SIGINT. The KeyboardInterrupt raised with it can land where Python
# cannot propagate it (a ZeroMQ frame's __dealloc__: "Exception ignored in ..."), and is
# then lost; an actor and a one-rank learner also stop when they see this set, so that no
# signal goes unheeded.
STOP_REQUESTED = threading.Event()


def _interrupt(signum: int, frame) -> None:
    STOP_REQUESTED.set()
    raise KeyboardInterrupt(signal.Signals(signum).name)


def release_zmq() -> None:
    """Ends this process's ZeroMQ context before the interpreter exits.

    Frames sent with copy=False lend their buffers to libzmq until its I/O thread is done
    with them; pyzmq's garbage collector, which keeps those buffers alive, stops in an
    atexit hook. A frame still in flight then (an unroll half-written to a busy learner, an
    I/O thread starved by 48 actors on 2 cores) is released after it: libzmq's free callback
    writes to the gc's dead socket (`Assertion failed: pfd.revents & POLLIN
    (src/signaler.cpp:238)`) or reads freed memory (`Bad address (src/tcp.cpp:227)`), and the
    job aborts. destroy() drops unsent frames and returns once libzmq has let go of every
    buffer, while the gc still runs."""
    import time

    import zmq
    from zmq.utils.garbage import gc

    zmq.Context.instance().destroy(linger=0)
    # libzmq has let go of every buffer; pyzmq's gc thread drops its references as
    # libzmq's notices reach it, so give it a moment to do so while it still runs.
    deadline = time.monotonic() + 1.0
    while gc.refs and time.monotonic() < deadline:
        time.sleep(0.005)


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
        host, _ = address.split_address(config.learner_address)
        if config.job_name and not config.keys_dir and not config.insecure and security.is_loopback(host[6:]):
            # Jobs on one machine: keys made automatically in --logdir, so that no other
            # user's process can connect (docs/protocol.md, "Who can connect").
            config = config.replace(keys_dir=security.local_keys(config.logdir))
        if config.mode == "test":  # plays the latest checkpoint of --logdir (impala/evaluate.py)
            from impala import evaluate

            evaluate.run(config)
        elif config.job_name == "":
            local.train(config, stop=STOP_REQUESTED)
        elif config.job_name == "learner":
            # Under torchrun (--learner_ranks=N) this is one of N ranks (impala/distributed.py).
            server = learner.Learner(config)
            ranks = server.ranks
            logging.info(
                "Learner%s listening at %s (parameters at %s).",
                f" rank {ranks.rank} of {ranks.world_size}" if ranks.world_size > 1 else "",
                server.unroll_address,
                server.params_address,
            )
            try:
                server.run(stop=STOP_REQUESTED)
            finally:
                server.close()
        else:
            unroll_address, params_address = address.learner_addresses(
                config.learner_address, config.task, config.learner_ranks
            )
            if config.task < 0:
                raise config_lib.ConfigError(f"--task must be >= 0, got {config.task}")
            run_actor(config, config.task, unroll_address, params_address, stop=STOP_REQUESTED)
    except KeyboardInterrupt:
        logging.info("Interrupted.")
    except (
        config_lib.ConfigError,
        envs.UnknownLevelError,
        checkpoint.CheckpointError,
        local.ActorCrashLoop,
        security.KeysError,
    ) as e:
        _fail(str(e))
    except learner.LearnerFailure as e:  # not the user's doing: status 1 (a checkpoint was written)
        _fail(str(e), status=1)
    finally:
        release_zmq()


def run_main() -> None:
    app.run(main, flags_parser=_parse)


if __name__ == "__main__":
    run_main()
