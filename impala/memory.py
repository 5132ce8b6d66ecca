"""Process-wide memory allocator setting shared by the actors and the learner."""

from __future__ import annotations

import ctypes


def reuse_freed_memory() -> None:
    """Keeps freed memory in this process instead of returning it to the kernel.

    Without this, glibc serves each large tensor of a forward or backward pass
    (1.8 MB for the uint8 -> float32 conversion of 16 Atari observations; 19 MB
    for a 32 x 21 learner batch) with fresh mmap'd pages and unmaps them
    afterwards, and the page faults on those fresh pages cost as much as the
    convolutions. Measured on 2 cores (docs/results.md): the shallow network's
    forward pass at batch 32 took 160 µs a row without this and 80 with it; the
    learner step went from ~1,930 to ~2,110 samples/s."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: mmap only above 32 MiB
        libc.mallopt(-1, 128 * 2**20)  # M_TRIM_THRESHOLD: keep up to 128 MiB of free heap
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
