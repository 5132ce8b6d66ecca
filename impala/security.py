"""Who may talk to the learner: CurveZMQ keys (authentication + encryption).

Make keys once, then copy each file where it is needed:

    python -m impala.security --keys_dir=keys

    keys/learner.key_secret          learner box only
    keys/authorized_actors/*.key     learner box: public keys of the actors it accepts
    keys/actor.key_secret            actor boxes
    keys/learner.key                 actor boxes: the learner's public key

Both jobs then take `--keys_dir=keys`. A learner bound to anything but loopback
refuses to start without keys unless `--insecure` is given.

More actor pairs, each revocable on its own, are made by name into the same folder
(the learner pair is made once and reused):

    python -m impala.security --keys_dir=keys --name=box-7

    keys/box-7/                      an actor box's whole --keys_dir: actor.key_secret,
                                     actor.key and a copy of learner.key
    keys/authorized_actors/box-7.key its public key, accepted by the learner

To revoke a pair, delete its public key from the learner's authorized_actors/. The
learner reads that folder at every connection handshake, so it refuses the pair's
new connections at once, without a restart; a connection made before the deletion
lasts until it breaks, so restart the learner to cut it off now (actors with a
valid key reconnect by themselves).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket as socket_lib
import sys
import tempfile
from pathlib import Path

import zmq
import zmq.auth
from absl import logging
from zmq.auth.thread import ThreadAuthenticator

LEARNER, ACTOR, AUTHORIZED = "learner", "actor", "authorized_actors"


class KeysError(ValueError):
    """Missing or unreadable keys; one line for the user."""


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def generate(keys_dir: str | os.PathLike, name: str = ACTOR) -> Path:
    """Makes an actor key pair and authorizes its public key; makes the learner pair
    too when `keys_dir` has none. Returns the folder to give actors as --keys_dir:
    `keys_dir` itself for the default name, `keys_dir/<name>` for another name (it
    holds the pair as actor.key/actor.key_secret and a copy of learner.key).
    Never overwrites a key (KeysError)."""
    keys_dir = Path(keys_dir)
    if not NAME.fullmatch(name) or name in (LEARNER, AUTHORIZED):
        raise KeysError(f"--name={name!r}: use letters, digits, '.', '_' or '-' (not {LEARNER!r} or {AUTHORIZED!r})")
    authorized = keys_dir / AUTHORIZED
    actor_dir = keys_dir if name == ACTOR else keys_dir / name
    for path in (actor_dir / f"{ACTOR}.key_secret", authorized / f"{name}.key"):
        if path.exists():
            raise KeysError(f"{path} exists; not overwriting keys (choose another --name)")
    learner_secret, learner_public = keys_dir / f"{LEARNER}.key_secret", keys_dir / f"{LEARNER}.key"
    if learner_secret.exists() and not learner_public.exists():
        raise KeysError(f"{learner_public} is missing next to {learner_secret}")
    authorized.mkdir(parents=True, exist_ok=True)
    actor_dir.mkdir(exist_ok=True)
    if not learner_secret.exists():
        zmq.auth.create_certificates(str(keys_dir), LEARNER)
        learner_secret.chmod(0o600)
    if actor_dir != keys_dir:
        (actor_dir / f"{LEARNER}.key").write_bytes(learner_public.read_bytes())
    public, secret = zmq.auth.create_certificates(str(actor_dir), ACTOR)
    Path(secret).chmod(0o600)
    (authorized / f"{name}.key").write_bytes(Path(public).read_bytes())
    return actor_dir


LOCAL_KEYS = "keys"  # <logdir>/keys: the automatic keys of jobs on one machine


def local_keys(logdir: str | os.PathLike) -> str:
    """The automatic keys of a learner and its actors on one machine (loopback, no
    --keys_dir): `<logdir>/keys`, made by whichever job starts first, in a directory
    only this user can read (mode 0700). Returns the folder, a --keys_dir for both jobs.

    Made in a private temporary folder and renamed into place, so two jobs starting
    at once end up with the same keys (the loser of the rename uses the winner's)."""
    keys = Path(logdir) / LOCAL_KEYS
    if (keys / f"{LEARNER}.key_secret").exists():
        return str(keys)
    try:
        Path(logdir).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".keys-", dir=logdir))  # mode 0700
        try:
            generate(staging)
            os.rename(staging, keys)
        except OSError:
            if not (keys / f"{LEARNER}.key_secret").exists():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as e:
        raise KeysError(f"cannot make the automatic keys in {keys}: {e.strerror or e}")
    return str(keys)


def _load(path: Path) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        folder = "" if path.parent.is_dir() else f" (no folder {path.parent})"
        raise KeysError(
            f"no key file {path}{folder}: make keys with `python -m impala.security "
            "--keys_dir=DIR` (docs/distributed.md says which files go to which box)"
        )
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
        allowed = set()
        for path in self.folder.glob("*.key"):  # re-read: keys can be added and revoked live
            try:
                allowed.add(_load(path)[0])
            except KeysError as e:  # e.g. a key being copied in; the others still count
                logging.warning("Skipping an authorized key: %s", e)
        if client_key in allowed:
            return True
        self.refused += 1
        logging.warning(
            "Refused a connection with an unknown CurveZMQ key %s (%d refused so far).",
            client_key.decode(errors="replace"),
            self.refused,
        )
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

    parser = argparse.ArgumentParser(
        prog="python -m impala.security",
        description="Make CurveZMQ keys: the learner pair (once) and an actor pair whose public key the "
        "learner accepts. See impala/security.py for what goes where and how to revoke a pair.",
    )
    parser.add_argument("--keys_dir", required=True, help="folder to create the keys in (made if missing)")
    parser.add_argument(
        "--name",
        default=ACTOR,
        help=f"name of the actor pair (default {ACTOR}: written to KEYS_DIR itself); another "
        "name makes KEYS_DIR/NAME/, a ready --keys_dir for that actor box, and "
        f"KEYS_DIR/{AUTHORIZED}/NAME.key, so pairs can be revoked one by one",
    )
    args = parser.parse_args(argv)
    try:
        actor_dir = generate(args.keys_dir, args.name)
    except (KeysError, OSError) as e:
        print(f"impala: error: {e}".replace("\n", " "), file=sys.stderr)
        sys.exit(2)
    print(
        f"Keys written to {args.keys_dir}. Learner box: {LEARNER}.key_secret and {AUTHORIZED}/. "
        f"Actor boxes: {actor_dir}/ ({ACTOR}.key_secret and {LEARNER}.key) as --keys_dir. "
        f"Revoke this pair by deleting {Path(args.keys_dir) / AUTHORIZED / (args.name + '.key')}."
    )


if __name__ == "__main__":
    main(sys.argv[1:])
