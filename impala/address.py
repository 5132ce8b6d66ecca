"""The learner's addresses: unrolls on --learner_address, parameters on the next
port. With --learner_ranks=N > 1 (the data-parallel learner, docs/distributed.md),
all ranks run on the learner's host; rank 0 binds both ports as above and rank r > 0
binds its own unroll port, PORT + 1 + r; actor task i sends its unrolls to rank
i mod N and asks rank 0 for parameters. Both jobs read them from here, so the rule
is written once."""

from __future__ import annotations

from impala.config import ConfigError


def split_address(address: str) -> tuple[str, int]:
    """'tcp://HOST:PORT' -> ('tcp://HOST', PORT); a one-line ConfigError otherwise."""
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


def params_port(unroll_port: int) -> int:
    """The parameter socket's port for a learner whose unrolls arrive on `unroll_port`."""
    return unroll_port + 1


def unroll_port(port: int, rank: int) -> int:
    """The unroll socket's port of learner rank `rank` when rank 0's is `port`."""
    return port if rank == 0 else params_port(port) + rank


def rank_of_task(task: int, ranks: int) -> int:
    """The learner rank that takes actor task `task`'s unrolls."""
    return task % ranks


def learner_addresses(learner_address: str, task: int = 0, ranks: int = 1) -> tuple[str, str]:
    """(unroll address, parameter address) for actor `task` of a learner of `ranks`
    ranks bound at a real port."""
    host, port = split_address(learner_address)
    if port == 0:
        raise ConfigError("--job_name=actor needs the learner's real port in --learner_address")
    if unroll_port(port, ranks - 1) >= 65536:
        raise ConfigError(f"--learner_address port too high for --learner_ranks={ranks}: {learner_address!r}")
    return f"{host}:{unroll_port(port, rank_of_task(task, ranks))}", f"{host}:{params_port(port)}"
