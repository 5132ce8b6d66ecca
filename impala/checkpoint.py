"""Checkpoints: atomic writes, keep the newest few, refuse a foreign network.

A checkpoint is one torch file `<logdir>/checkpoints/ckpt-<frames>.pt` holding the
network, the optimizer, the frame count and a signature of the network. It is
written to a temporary file and renamed into place, so a crash or a full disk
never leaves a half-written checkpoint behind (the previous one stays).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line for the user."""


def directory(logdir: str | os.PathLike) -> Path:
    return Path(logdir) / "checkpoints"


def list_checkpoints(logdir: str | os.PathLike) -> list[Path]:
    """Checkpoints in `logdir`, oldest first."""
    folder = directory(logdir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(logdir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(logdir)
    return found[-1] if found else None


def save(logdir: str | os.PathLike, state: Mapping[str, Any], frames: int, keep: int = 3) -> Path:
    """Writes `state` atomically and prunes all but the newest `keep` checkpoints.

    Raises OSError (e.g. disk full) with no partial file left behind."""
    folder = directory(logdir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ckpt-{frames:013d}.pt"
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in list_checkpoints(logdir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a checkpoint without executing code from it (weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or not a checkpoint at all
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}".splitlines()[0])


def check_signature(saved: Mapping[str, Any], current: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuses a checkpoint made for a different network or environment."""
    diffs = [f"{k}={saved.get(k)!r} (now {current.get(k)!r})" for k in current if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} is for a different network: {', '.join(diffs)}; "
            "use another --logdir or the original settings"
        )
