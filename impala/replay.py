"""Experience replay for the learner (--replay_proportion, --replay_buffer_size): the
option the IMPALA paper evaluated beside V-trace (its study of off-policy corrections
compares agents with and without experience replay), with RLlib's semantics: replayed batches in a p:1 proportion to
fresh ones. V-trace corrects for the older behaviour policy of what is replayed.

  - `ReplayBuffer`: a ring of the last N env-columns of the fresh batches. A column is
    one environment's unroll: every time-major field's [T+1] steps and its core state
    before step 0 (the layout of impala/unroll.py). `add` copies a batch's columns in
    (the learner's batches live in reused buffers, impala/transfer.py), `sample` draws
    a batch of whole columns, uniformly without replacement.
  - `replays_due`: how many replayed batches follow the k-th fresh one. Deterministic,
    so every data-parallel rank takes the same number of updates (they all-reduce in
    each one).

Memory: the ring is allocated whole at the first `add`, on the batch's device:
N x one column's bytes (learner.unroll_bytes of one env; the --replay_buffer_size help
gives Pong's), and nothing more is allocated by `add`.

Saving: `state_dict` / `load_state_dict` (torch's names) carry the ring and its position
across a clean stop (the learner writes them beside its final checkpoint, impala/checkpoint.py),
so that a resumed run replays what it had instead of its first fresh batches again.

Threads: owned by the learner's training thread; nothing else touches it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

Batch = dict[str, torch.Tensor]  # [T+1, B, ...] tensors (core states [B, ...]), see impala/unroll.py


def replays_due(fresh_batches: int, proportion: float) -> int:
    """Replayed batches owed after the `fresh_batches`-th fresh one: floor(k p) -
    floor((k - 1) p), so k fresh batches are followed by floor(k p) replayed ones in
    all (p = 0.5: one after every second; p = 1: one after each; p = 2: two)."""
    return math.floor(fresh_batches * proportion) - math.floor((fresh_batches - 1) * proportion)


def generator(seed: int, rank: int) -> torch.Generator:
    """The sampling stream of learner rank `rank` (CPU; docs/design.md, Seeds)."""
    return torch.Generator().manual_seed(seed + rank)


class ReplayBuffer:
    """The last `capacity` env-columns added, batches of whole columns sampled from them.

    `spec` is the unroll layout (unroll.unroll_spec: name -> (dtype, shape, time-major?)):
    a batch's time-major tensors hold columns on axis 1, the others (core states) on axis 0.
    """

    def __init__(self, spec: Mapping, capacity: int):
        if capacity < 1:
            raise ValueError(f"a replay buffer needs a capacity of at least 1, got {capacity}")
        self.capacity = capacity
        self._axis = {name: 1 if time_major else 0 for name, (_, _, time_major) in spec.items()}
        # The ring's shape and dtype per field: a column's shape with the capacity on its axis.
        self._layout = {
            name: (
                (shape[0], capacity, *shape[1:]) if time_major else (capacity, *shape),
                torch.from_numpy(np.empty(0, dtype)).dtype,
            )
            for name, (dtype, shape, time_major) in spec.items()
        }
        self._ring: Batch | None = None
        self._next = 0  # the slot the next column goes to
        self._size = 0  # columns stored

    def __len__(self) -> int:
        return self._size

    def add(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Copies every column of `batch` ([T+1, B, ...], core states [B, H]) into the
        ring, evicting the oldest; `batch` may be reused afterwards."""
        if set(batch) != set(self._axis):
            raise ValueError(f"batch fields {sorted(batch)} are not the replay buffer's {sorted(self._axis)}")
        columns = batch["reward"].shape[1]
        if self._ring is None:  # the whole ring at once, on the batch's device: bounded memory
            device = batch["reward"].device
            self._ring = {
                name: torch.empty(shape, dtype=dtype, device=device) for name, (shape, dtype) in self._layout.items()
            }
        # The newest `capacity` columns of the batch, written from slot _next on, wrapping once.
        skip = max(0, columns - self.capacity)
        start, count = self._next, columns - skip
        first = min(count, self.capacity - start)
        with torch.no_grad():
            for name, t in batch.items():
                ring, axis = self._ring[name], self._axis[name]
                ring.narrow(axis, start, first).copy_(t.narrow(axis, skip, first))
                if count > first:
                    ring.narrow(axis, 0, count - first).copy_(t.narrow(axis, skip + first, count - first))
        self._next = (start + count) % self.capacity
        self._size = min(self.capacity, self._size + count)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """A new batch of `batch_size` stored columns, drawn uniformly without
        replacement with `generator` (CPU), in the layout `add` takes."""
        if not 1 <= batch_size <= self._size:
            raise ValueError(f"cannot sample {batch_size} columns from a replay buffer holding {self._size}")
        slots = torch.randperm(self._size, generator=generator)[:batch_size]
        slots = slots.to(next(iter(self._ring.values())).device)
        return {name: ring.index_select(self._axis[name], slots) for name, ring in self._ring.items()}

    def state_dict(self) -> dict[str, Any]:
        """The capacity, the ring's position and its columns (on the CPU; None before
        the first `add`): what `load_state_dict` takes back."""
        ring = None if self._ring is None else {name: t.cpu() for name, t in self._ring.items()}
        return {"capacity": self.capacity, "next": self._next, "size": self._size, "ring": ring}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        """Takes back a `state_dict` of a buffer of the same capacity and unroll layout,
        its ring onto `device`; a ValueError, changing nothing, for any other."""
        if state["capacity"] != self.capacity:
            raise ValueError(f"it holds {state['capacity']} columns, not --replay_buffer_size={self.capacity}")
        ring, position, size = state["ring"], int(state["next"]), int(state["size"])
        if not (0 <= position < self.capacity and 0 <= size <= self.capacity and (size == 0) == (ring is None)):
            raise ValueError(f"its position {position} and size {size} do not fit a ring of {self.capacity}")
        if ring is not None:
            if set(ring) != set(self._layout):
                raise ValueError(f"its fields {sorted(ring)} are not the replay buffer's {sorted(self._layout)}")
            for name, t in ring.items():
                if (tuple(t.shape), t.dtype) != self._layout[name]:
                    raise ValueError(f"its {name} is {t.dtype} {tuple(t.shape)}, not {self._layout[name]}")
            ring = {name: t.to(device) for name, t in ring.items()}
        self._ring, self._next, self._size = ring, position, size
