"""The learner's two addresses: unrolls on --learner_address, parameters on the
next port. Both jobs read them from here, so the rule is written once."""

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


def learner_addresses(learner_address: str) -> tuple[str, str]:
    """(unroll address, parameter address) of a learner bound at a real port."""
    host, port = split_address(learner_address)
    if port == 0:
        raise ConfigError("--job_name=actor needs the learner's real port in --learner_address")
    return f"{host}:{port}", f"{host}:{params_port(port)}"
