"""Key generation and the loopback check that decides whether keys are required."""

from __future__ import annotations

import stat
import subprocess

import pytest
import zmq.auth

from impala import security
from tests import cli


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.2.1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("*", False), ("10.1.2.3", False), ("192.168.0.7", False),
])
def test_is_loopback(host, loopback):
    assert security.is_loopback(host) is loopback


def test_generated_keys_pair_up_and_are_private(tmp_path):
    security.generate(tmp_path)
    learner_public, learner_secret = zmq.auth.load_certificate(str(tmp_path / "learner.key_secret"))
    assert zmq.auth.load_certificate(str(tmp_path / "learner.key"))[0] == learner_public and learner_secret
    actor_public, _ = zmq.auth.load_certificate(str(tmp_path / "actor.key_secret"))
    assert zmq.auth.load_certificate(str(tmp_path / "authorized_actors" / "actor.key"))[0] == actor_public
    for secret in tmp_path.glob("*.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_keys_are_never_overwritten(tmp_path):
    security.generate(tmp_path)
    before = (tmp_path / "learner.key_secret").read_bytes()
    result = subprocess.run(cli.command()[:2] + ["impala.security", f"--keys_dir={tmp_path}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not overwriting" in result.stderr
    assert (tmp_path / "learner.key_secret").read_bytes() == before


def test_missing_keys_are_a_clear_error(tmp_path):
    socket = zmq.Context.instance().socket(zmq.DEALER)
    try:
        with pytest.raises(security.KeysError, match="cannot read key"):
            security.connect_securely(socket, str(tmp_path))
    finally:
        socket.close(linger=0)
