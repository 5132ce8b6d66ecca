"""Who may talk to the learner: CurveZMQ keys (authentication + encryption).

Make keys once, then copy each file where it is needed:

    python -m impala.security --keys_dir=keys

    keys/learner.key_secret          learner box only
    keys/authorized_actors/*.key     learner box: public keys of the actors it accepts
    keys/actor.key_secret            actor boxes
    keys/learner.key                 actor boxes: the learner's public key

Both jobs then take `--keys_dir=keys`. A learner bound to anything but loopback
refuses to start without keys unless `--insecure` is given.
"""

from __future__ import annotations

import ipaddress
import os
import socket as socket_lib
import sys
from pathlib import Path

import zmq
import zmq.auth
from absl import logging
from zmq.auth.thread import ThreadAuthenticator

LEARNER, ACTOR, AUTHORIZED = "learner", "actor", "authorized_actors"


class KeysError(ValueError):
    """Missing or unreadable keys; one line for the user."""


def generate(keys_dir: str | os.PathLike) -> None:
    """Creates a learner and an actor key pair and authorizes the actor's key."""
    keys_dir = Path(keys_dir)
    authorized = keys_dir / AUTHORIZED
    authorized.mkdir(parents=True, exist_ok=True)
    for name in (LEARNER, ACTOR):
        if (keys_dir / f"{name}.key_secret").exists():
            raise KeysError(f"{keys_dir / (name + '.key_secret')} exists; not overwriting keys")
    zmq.auth.create_certificates(str(keys_dir), LEARNER)
    public, _ = zmq.auth.create_certificates(str(keys_dir), ACTOR)
    (authorized / f"{ACTOR}.key").write_bytes(Path(public).read_bytes())
    for secret in keys_dir.glob("*.key_secret"):
        secret.chmod(0o600)


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise KeysError(f"cannot read key {path}: {e}")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and names that resolve only there (localhost)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket_lib.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


class _AllowedActors:
    """ZAP credentials callback: accepts the authorized public keys, logs refusals."""

    def __init__(self, keys_dir: Path):
        self.folder = keys_dir / AUTHORIZED
        self.refused = 0

    def callback(self, domain: str, client_key: bytes) -> bool:
        allowed = {_load(p)[0] for p in self.folder.glob("*.key")}  # re-read: keys can be added live
        if client_key in allowed:
            return True
        self.refused += 1
        logging.warning("Refused a connection with an unknown CurveZMQ key %s (%d refused so far).",
                        client_key.decode(errors="replace"), self.refused)
        return False


def serve_securely(context: zmq.Context, sockets: list[zmq.Socket], keys_dir: str) -> ThreadAuthenticator:
    """Makes `sockets` CurveZMQ servers that accept only authorized actor keys.
    Call before bind. Returns the authenticator thread (stop it on close)."""
    keys = Path(keys_dir)
    public, secret = _load(keys / f"{LEARNER}.key_secret")
    if secret is None:
        raise KeysError(f"{keys / (LEARNER + '.key_secret')} holds no secret key")
    if not (keys / AUTHORIZED).is_dir():
        raise KeysError(f"{keys / AUTHORIZED} is missing: no actor could connect")
    auth = ThreadAuthenticator(context, log=logging.get_absl_logger())
    auth.start()
    provider = _AllowedActors(keys)
    auth.configure_curve_callback(domain="*", credentials_provider=provider)
    auth.provider = provider  # so the learner can report refusals
    for s in sockets:
        s.curve_secretkey, s.curve_publickey, s.curve_server = secret, public, True
    return auth


def connect_securely(socket: zmq.Socket, keys_dir: str) -> None:
    """Makes `socket` a CurveZMQ client of the learner. Call before connect."""
    keys = Path(keys_dir)
    public, secret = _load(keys / f"{ACTOR}.key_secret")
    server_public, _ = _load(keys / f"{LEARNER}.key")
    if secret is None:
        raise KeysError(f"{keys / (ACTOR + '.key_secret')} holds no secret key")
    socket.curve_secretkey, socket.curve_publickey, socket.curve_serverkey = secret, public, server_public


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m impala.security", description="Make CurveZMQ keys.")
    parser.add_argument("--keys_dir", required=True, help="folder to create the keys in")
    args = parser.parse_args(argv)
    try:
        generate(args.keys_dir)
    except (KeysError, OSError) as e:
        print(f"impala: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"Keys written to {args.keys_dir}. Learner box: learner.key_secret and {AUTHORIZED}/. "
          "Actor boxes: actor.key_secret and learner.key. Pass --keys_dir to both jobs.")


if __name__ == "__main__":
    main(sys.argv[1:])
