"""Checkpoints: atomic writes, keep the newest few, refuse a foreign network.

A checkpoint is one torch file `<logdir>/checkpoints/ckpt-<frames>.pt` holding the
network, the optimizer, the frame count and a signature of the network. It is
written to a temporary file and renamed into place, so a crash or a full disk
never leaves a half-written checkpoint behind (the previous one stays), and a
network with a non-finite parameter is never written (the last good one stays).
`load_agent` puts a checkpoint into an agent (the learner's, or evaluation's) after
checking that it was made for the same network.

Beside the checkpoint written at a clean stop, each learner rank writes its experience
replay state to `<logdir>/checkpoints/replay-rank<r>.pt` (`save_replay`, replaced each
time; about --replay_buffer_size x one column's bytes): a resume from the checkpoint of
the same frame count takes it back (impala/learner.py), any other resume ignores it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from impala.files import write_atomically

if TYPE_CHECKING:
    from impala.config import Config
    from impala.nets import Agent

_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line for the user."""


class NonFiniteError(ValueError):
    """A network with NaN or infinite parameters, refused before it is written."""


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

    Raises OSError (e.g. disk full) with no partial file left behind, and
    NonFiniteError, writing nothing, if `state['model']` holds a NaN or an infinity."""
    model = state.get("model", {})
    bad = [name for name, t in model.items() if torch.is_tensor(t) and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteError(f"non-finite values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    folder = directory(logdir)
    folder.mkdir(parents=True, exist_ok=True)
    path = write_atomically(folder / f"ckpt-{frames:013d}.pt", lambda f: torch.save(dict(state), f), binary=True)
    for old in list_checkpoints(logdir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a checkpoint without executing code from it (weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or not a checkpoint at all
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}".splitlines()[0])


def replay_path(logdir: str | os.PathLike, rank: int) -> Path:
    return directory(logdir) / f"replay-rank{rank}.pt"


def save_replay(logdir: str | os.PathLike, rank: int, state: Mapping[str, Any]) -> Path:
    """Writes learner rank `rank`'s replay `state` atomically, replacing the previous
    one; raises OSError (e.g. disk full) with the previous file left as it was."""
    directory(logdir).mkdir(parents=True, exist_ok=True)
    return write_atomically(replay_path(logdir, rank), lambda f: torch.save(dict(state), f), binary=True)


def load_replay(logdir: str | os.PathLike, rank: int) -> dict[str, Any] | None:
    """Rank `rank`'s replay state as `save_replay` wrote it, None if there is none;
    a one-line CheckpointError if it cannot be read."""
    path = replay_path(logdir, rank)
    return load(path) if path.is_file() else None


def check_signature(saved: Mapping[str, Any], current: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuses a checkpoint made for a different network or environment."""
    diffs = [f"{k}={saved.get(k)!r} (now {current.get(k)!r})" for k in current if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} is for a different network: {', '.join(diffs)}; "
            "use another --logdir or the original settings"
        )


def network_signature(config: Config, agent: Agent) -> dict:
    """What a checkpoint must match to be loaded into `agent`."""
    return {
        "observation_shape": list(agent.observation_shape),
        "num_actions": agent.num_actions,
        "network": agent.network,
        "use_lstm": agent.core is not None,
        "lstm_size": config.lstm_size if agent.core is not None else None,
        "mlp_sizes": list(config.hidden_sizes) if agent.network == "mlp" else None,
        # Only for agents that read instructions, so other checkpoints keep matching.
        **({"instruction_length": agent.instruction_length} if agent.instruction_length else {}),
    }


def load_agent(
    state: Mapping[str, Any],
    path: str | os.PathLike,
    config: Config,
    agent: Agent,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Loads checkpoint `state` (read from `path`) into `agent` (and `optimizer`),
    after checking its signature; a one-line CheckpointError if it does not fit."""
    check_signature(state.get("signature", {}), network_signature(config, agent), path)
    # Checkpoints from before --optimizer existed were all written by RMSProp.
    saved_optimizer = state.get("optimizer_name", "rmsprop")
    if optimizer is not None and saved_optimizer != config.optimizer:
        raise CheckpointError(
            f"checkpoint {path} was trained with --optimizer={saved_optimizer} (now {config.optimizer}); "
            "use another --logdir or the original settings"
        )
    try:
        agent.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this network: {str(e).splitlines()[0]}")
