"""Key generation and the loopback check that decides whether keys are required."""

from __future__ import annotations

import stat
import subprocess
import time

import pytest
import zmq.auth

from impala import security
from tests import cli


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("*", False),
        ("10.1.2.3", False),
        ("192.168.0.7", False),
    ],
)
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
    result = subprocess.run(
        cli.command()[:2] + ["impala.security", f"--keys_dir={tmp_path}"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not overwriting" in result.stderr
    assert (tmp_path / "learner.key_secret").read_bytes() == before


def test_missing_keys_are_a_clear_error(tmp_path):
    socket = zmq.Context.instance().socket(zmq.DEALER)
    try:
        with pytest.raises(security.KeysError, match="no key file .*actor.key_secret.*python -m impala.security"):
            security.connect_securely(socket, str(tmp_path))
        with pytest.raises(security.KeysError, match="no key file .*learner.key_secret"):
            security.serve_securely(zmq.Context.instance(), [socket], str(tmp_path / "absent"))
    finally:
        socket.close(linger=0)


def test_a_missing_key_file_is_one_line_naming_it(tmp_path):
    result = subprocess.run(
        cli.command("--job_name=actor", "--learner_address=tcp://127.0.0.1:5555", f"--keys_dir={tmp_path}"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("impala: error: no key file") and f"{tmp_path}/actor.key_secret" in last
    assert "Invalid certificate" not in result.stderr and "Traceback" not in result.stderr


def _make(keys_dir, *name):
    return subprocess.run(
        cli.command()[:2] + ["impala.security", f"--keys_dir={keys_dir}", *name],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _public(path):
    return zmq.auth.load_certificate(str(path))[0]


def test_named_pairs_add_actors_without_overwriting(tmp_path):
    assert _make(tmp_path).returncode == 0  # today's default layout still works
    learner_key = (tmp_path / "learner.key").read_bytes()
    default_actor = _public(tmp_path / "actor.key_secret")
    for name in ("box-7", "box-8"):
        result = _make(tmp_path, f"--name={name}")
        assert result.returncode == 0, result.stderr
        assert f"{tmp_path}/{name}/" in result.stdout and f"authorized_actors/{name}.key" in result.stdout
    assert (tmp_path / "learner.key").read_bytes() == learner_key  # made once, reused
    assert _public(tmp_path / "actor.key_secret") == default_actor
    authorized = {p.name: _public(p) for p in (tmp_path / "authorized_actors").glob("*.key")}
    assert set(authorized) == {"actor.key", "box-7.key", "box-8.key"}
    for name in ("box-7", "box-8"):  # each folder is an actor box's whole --keys_dir
        folder = tmp_path / name
        assert (folder / "learner.key").read_bytes() == learner_key
        assert _public(folder / "actor.key_secret") == _public(folder / "actor.key") == authorized[f"{name}.key"]
        assert stat.S_IMODE((folder / "actor.key_secret").stat().st_mode) == 0o600
    assert len(set(authorized.values())) == 3
    again = _make(tmp_path, "--name=box-7")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "not overwriting" in again.stderr


@pytest.mark.parametrize("name", ["learner", "authorized_actors", "../elsewhere", "a/b", ""])
def test_bad_names_are_one_line(tmp_path, name):
    result = _make(tmp_path, f"--name={name}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--name" in result.stderr
    assert not (tmp_path / "learner.key_secret").exists()


def _exchange(server, client, timeout_ms=20000) -> bool:
    """True when a message from `client` reaches `server` within the timeout."""
    client.send(b"hello")
    return bool(server.poll(timeout_ms)) and server.recv_multipart()[-1] == b"hello"


def test_revoking_a_pair_refuses_its_new_connections_without_a_restart(tmp_path):
    """What security.py's docstring and docs/distributed.md say about revocation."""
    security.generate(tmp_path, "box-1")
    security.generate(tmp_path, "box-2")
    context = zmq.Context()
    server = context.socket(zmq.ROUTER)
    auth = security.serve_securely(context, [server], str(tmp_path))
    sockets = [server]
    try:
        port = server.bind_to_random_port("tcp://127.0.0.1")

        def client(name):
            socket = context.socket(zmq.DEALER)
            sockets.append(socket)
            security.connect_securely(socket, str(tmp_path / name))
            socket.connect(f"tcp://127.0.0.1:{port}")
            return socket

        connected = client("box-1")
        assert _exchange(server, connected) and _exchange(server, client("box-2"))
        (tmp_path / "authorized_actors" / "box-1.key").unlink()
        refused_before = auth.provider.refused
        client("box-1").send(b"revoked")
        deadline = time.monotonic() + 60
        while auth.provider.refused == refused_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert auth.provider.refused > refused_before
        assert _exchange(server, client("box-2"))  # the others are still accepted
        assert _exchange(server, connected)  # an existing connection lasts until it breaks
        assert not server.poll(0)  # the refused client's message never arrived
    finally:
        for socket in sockets:
            socket.close(linger=0)
        auth.stop()
        context.term()
