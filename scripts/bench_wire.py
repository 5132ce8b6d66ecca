"""The wire on loopback: impala's messages against bare pyzmq sends of the same bytes.

    python scripts/bench_wire.py [--seconds 5] [--envs 1]

A sender process pushes Pong-sized unrolls (T = 20, 4 x 84 x 84 uint8 frames,
`--envs` environments per unroll) over TCP on loopback to this process, twice:
  bare:  the unroll's arrays as raw frames, DEALER -> ROUTER, received with copy=False;
  wire:  the same arrays through impala.wire (msgpack header, validation, zero-copy
         numpy views) and impala.unroll.validate, as the learner receives them.
Each is measured --repeats times, alternating; prints the medians of unrolls/s and
MB/s and their ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from impala import unroll, wire  # noqa: E402

UNROLL_LENGTH, OBSERVATION, ACTIONS = 20, (4, 84, 84), 6


def pong_unroll(num_envs: int) -> tuple[dict, unroll.Unroll]:
    spec = unroll.unroll_spec(UNROLL_LENGTH, OBSERVATION, np.uint8, ACTIONS)
    arrays = unroll.new_unroll(spec, num_envs)
    arrays["observation"][:] = np.random.default_rng(0).integers(0, 255, arrays["observation"].shape)
    return spec, arrays


def _sender(address: str, mode: str, num_envs: int, seconds: float) -> None:
    _, arrays = pong_unroll(num_envs)
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.SNDHWM, 4)
    socket.connect(address)
    bare = [memoryview(np.ascontiguousarray(a)).cast("B") for a in arrays.values()]
    deadline = time.monotonic() + seconds + 2.0
    while time.monotonic() < deadline:
        if mode == "bare":
            socket.send_multipart(bare, copy=False)
        else:
            wire.send(socket, "unroll", arrays, task=0, param_version=1, meta={"level": "ALE/Pong-v5"})
    socket.send_multipart([b"stop"])
    socket.close(linger=30000)
    # Wait for zero-copy sends to finish before the arrays they point into are freed.
    zmq.Context.instance().term()


def measure(mode: str, num_envs: int, seconds: float) -> tuple[float, float]:
    """Returns (unrolls/s, MB/s) received after a 1 s warm-up."""
    spec, arrays = pong_unroll(num_envs)
    size = sum(a.nbytes for a in arrays.values())
    socket = zmq.Context.instance().socket(zmq.ROUTER)
    socket.setsockopt(zmq.RCVHWM, 4)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    process = multiprocessing.get_context("spawn").Process(
        target=_sender, args=(f"tcp://127.0.0.1:{port}", mode, num_envs, seconds))
    process.start()
    count, start = 0, None
    warmup_end = time.monotonic() + 1.0
    while True:
        if mode == "bare":
            frames = socket.recv_multipart(copy=False)
            if len(frames) == 2:
                break
            _ = [np.frombuffer(f.buffer, np.uint8) for f in frames[1:]]
        else:
            frames = socket.recv_multipart(copy=False)
            if len(frames) == 2:
                break
            message = wire.decode(wire.split_envelope(frames)[1], allowed_kinds=("unroll",))
            unroll.validate(message.arrays, spec)
        now = time.monotonic()
        if start is None and now >= warmup_end:
            start, count = now, 0
        elif start is not None:
            count += 1
    elapsed = time.monotonic() - start
    process.join()
    socket.close(linger=0)
    return count / elapsed, count * size / elapsed / 1e6


def report(seconds: float, num_envs: int, repeats: int = 3) -> float:
    """Alternates the two measurements `repeats` times and keeps each one's median,
    so that a burst of other load on the machine does not decide the ratio."""
    runs = {"bare": [], "wire": []}
    # Progress on stderr (the results go to stdout): the whole takes minutes.
    print(f"bench_wire.py: measuring bare pyzmq and impala's wire {repeats} times each, {seconds:g} s "
          "apiece after a 1 s warm-up", file=sys.stderr, flush=True)
    for repeat in range(1, repeats + 1):
        for mode in runs:
            runs[mode].append(measure(mode, num_envs, seconds))
            print(f"bench_wire.py: {mode} {repeat}/{repeats}: {runs[mode][-1][0]:,.0f} unrolls/s",
                  file=sys.stderr, flush=True)
    bare, ours = (sorted(runs[m])[len(runs[m]) // 2] for m in ("bare", "wire"))
    size = sum(a.nbytes for a in pong_unroll(num_envs)[1].values()) / 1e6
    print(f"wire on loopback: Pong unrolls of {num_envs} env(s) x {UNROLL_LENGTH + 1} steps, {size:.2f} MB each")
    print(f"{'bare pyzmq (same bytes, raw frames)':48s} {bare[0]:10,.0f} unrolls/s {bare[1]:10,.0f} MB/s")
    print(f"{'impala wire (header, decode, validate)':48s} {ours[0]:10,.0f} unrolls/s {ours[1]:10,.0f} MB/s")
    print(f"{'ratio':48s} {ours[0] / bare[0]:10.1%}")
    return ours[0] / bare[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="seconds each measurement receives for, after a 1 s warm-up (default 5)")
    parser.add_argument("--envs", type=int, default=1, help="environments per unroll (default 1)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measurements of each kind, alternating; the medians are reported (default 3)")
    args = parser.parse_args()
    report(args.seconds, args.envs, args.repeats)


if __name__ == "__main__":
    main()
