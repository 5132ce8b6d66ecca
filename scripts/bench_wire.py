"""The wire on loopback: impala's messages against bare pyzmq sends of the same bytes.

    python scripts/bench_wire.py [--seconds 5] [--envs 1]

A sender process pushes Pong-sized unrolls (T = 20, 4 x 84 x 84 uint8 frames,
`--envs` environments per unroll) over TCP on loopback to this process, twice:
  bare:  the unroll's arrays as raw frames, DEALER -> ROUTER, received with copy=False;
  wire:  the same arrays through impala.wire (msgpack header, validation, zero-copy
         numpy views) and impala.unroll.validate, as the learner receives them.
Each is measured --repeats times, alternating; prints the medians of unrolls/s and
MB/s and their ratio; then the CPU time receiving one unroll takes each way over
inproc (steadier on a busy machine) and through the learner's whole receive path
(impala/receiver.py), and what encoding one unroll costs the sender.

    python scripts/bench_wire.py --hostile

instead sends the two messages of issue 18, finding 3 (6 frames of 60 MiB under a
64 MiB limit; 2 million empty frames) to a learner-like ROUTER and prints what
receiving and rejecting each cost: the memory ZeroMQ held before the first frame
could be read, the receiver's peak memory, and its CPU time.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import resource
import sys
import time
import timeit
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from impala import unroll, wire  # noqa: E402
from impala.metrics import Stopwatch  # noqa: E402
from impala.receiver import ActorBook, UnrollReceiver  # noqa: E402

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
    if mode == "bare":
        socket.send_multipart([b"stop"])
    else:
        wire.send(socket, "stop")
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
        target=_sender, args=(f"tcp://127.0.0.1:{port}", mode, num_envs, seconds)
    )
    process.start()
    count, start = 0, None
    warmup_end = time.monotonic() + 1.0
    while True:
        if mode == "bare":
            frames = socket.recv_multipart(copy=False)
            if len(frames) == 2:
                break
            _ = [np.frombuffer(f.buffer, np.uint8) for f in frames[1:]]
        else:  # as the learner receives
            _, message = wire.recv_routed(socket, allowed_kinds=("unroll", "stop"))
            if message.kind == "stop":
                break
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


_INPROC = itertools.count()


def receive_cpu(mode: str, num_envs: int, count: int = 50) -> float:
    """CPU seconds of this thread per unroll received (and decoded and validated, for
    "wire"), over inproc: no I/O thread and no sender share the measured time, so it
    holds up better than unrolls/s on a busy machine."""
    spec, arrays = pong_unroll(num_envs)
    context = zmq.Context.instance()
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    for socket in (router, dealer):
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.setsockopt(zmq.SNDHWM, 0)
    address = f"inproc://bench-{next(_INPROC)}"
    router.bind(address)
    dealer.connect(address)
    if mode == "bare":
        frames = [memoryview(np.ascontiguousarray(a)).cast("B") for a in arrays.values()]
    else:
        frames = wire.encode("unroll", arrays, task=0, param_version=1, meta={"level": "ALE/Pong-v5"})
    # "receiver": the learner's whole receive path (impala/receiver.py: decode, layout and
    # value checks, the actor book, batch assembly), one batch per unroll.
    receiver = UnrollReceiver(
        spec,
        1,
        ACTIONS,
        ActorBook(ACTIONS, 4),
        Stopwatch(),
        default_level="ALE/Pong-v5",
        run_id="bench",
        param_version=lambda: 1,
        max_queued_batches=count + 1,
    )
    for _ in range(count):
        dealer.send_multipart(frames, copy=False)
    router.poll()
    start = time.thread_time()
    for _ in range(count):
        if mode == "bare":
            _ = [np.frombuffer(f.buffer, np.uint8) for f in router.recv_multipart(copy=False)[1:]]
        elif mode == "receiver":
            receiver.receive(*wire.recv_routed(router, allowed_kinds=("unroll",)))
        else:
            unroll.validate(wire.recv_routed(router, allowed_kinds=("unroll",))[1].arrays, spec)
    elapsed = time.thread_time() - start
    router.close(linger=0)
    dealer.close(linger=0)
    return elapsed / count


def report(seconds: float, num_envs: int, repeats: int = 3) -> float:
    """Alternates the two measurements `repeats` times and keeps each one's median,
    so that a burst of other load on the machine does not decide the ratio."""
    runs = {"bare": [], "wire": []}
    # Progress on stderr (the results go to stdout): the whole takes minutes.
    print(
        f"bench_wire.py: measuring bare pyzmq and impala's wire {repeats} times each, {seconds:g} s "
        "apiece after a 1 s warm-up",
        file=sys.stderr,
        flush=True,
    )
    for repeat in range(1, repeats + 1):
        for mode in runs:
            runs[mode].append(measure(mode, num_envs, seconds))
            print(
                f"bench_wire.py: {mode} {repeat}/{repeats}: {runs[mode][-1][0]:,.0f} unrolls/s",
                file=sys.stderr,
                flush=True,
            )
    bare, ours = (sorted(runs[m])[len(runs[m]) // 2] for m in ("bare", "wire"))
    size = sum(a.nbytes for a in pong_unroll(num_envs)[1].values()) / 1e6
    print(f"wire on loopback: Pong unrolls of {num_envs} env(s) x {UNROLL_LENGTH + 1} steps, {size:.2f} MB each")
    print(f"{'bare pyzmq (same bytes, raw frames)':48s} {bare[0]:10,.0f} unrolls/s {bare[1]:10,.0f} MB/s")
    print(f"{'impala wire (header, decode, validate)':48s} {ours[0]:10,.0f} unrolls/s {ours[1]:10,.0f} MB/s")
    print(f"{'ratio':48s} {ours[0] / bare[0]:10.1%}")
    cpu = {m: sorted(receive_cpu(m, num_envs) for _ in range(2 * repeats + 1))[repeats] for m in (*runs, "receiver")}
    for mode, what in (("bare", "bare pyzmq"), ("wire", "impala wire"), ("receiver", "learner's receiver")):
        print(f"{what + ', receive CPU (inproc, median)':48s} {cpu[mode] * 1e6:10,.0f} us/unroll")
    arrays = pong_unroll(num_envs)[1]
    encode = (
        min(timeit.repeat(lambda: wire.encode("unroll", arrays, meta={"level": "ALE/Pong-v5"}), number=200, repeat=5))
        / 200
    )
    print(f"{'wire.encode, sender side (best of 5 x 200)':48s} {encode * 1e6:10,.0f} us/unroll")
    return ours[0] / bare[0]


HOSTILE = {"6 frames of 60 MiB, limit 64 MiB": (6, 60 * 2**20), "2,000,000 empty frames": (2_000_000, 0)}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _hostile_sender(address: str, count: int, size: int) -> None:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.connect(address)
    socket.send_multipart([b"\0" * size] * count)
    socket.close(linger=60000)
    zmq.Context.instance().term()


def _hostile_receiver(count: int, size: int, results: multiprocessing.Queue) -> None:
    socket = zmq.Context.instance().socket(zmq.ROUTER)
    socket.setsockopt(zmq.MAXMSGSIZE, 64 * 2**20)  # the learner's default --max_message_mb
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    base = _rss_mb()
    sender = multiprocessing.get_context("spawn").Process(
        target=_hostile_sender, args=(f"tcp://127.0.0.1:{port}", count, size)
    )
    sender.start()
    socket.poll()
    buffered = _rss_mb() - base  # the whole message, held by ZeroMQ before frame 1 is readable
    start = time.process_time()
    try:
        wire.recv_routed(socket)
        outcome = "accepted"
    except wire.WireError as e:
        outcome = f"rejected: {e}"
    cpu = time.process_time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10 - base
    sender.join()
    results.put((buffered, peak, cpu, outcome))


def hostile() -> None:
    """Each message in a fresh receiving process, so that its peak memory is its own."""
    context = multiprocessing.get_context("spawn")
    for name, (count, size) in HOSTILE.items():
        results = context.Queue()
        receiver = context.Process(target=_hostile_receiver, args=(count, size, results))
        receiver.start()
        buffered, peak, cpu, outcome = results.get()
        receiver.join()
        print(
            f"{name}: held by ZeroMQ before reading {buffered:,.0f} MB; receiver's peak "
            f"{peak:,.0f} MB over its start; {cpu:.2f} s CPU to receive; {outcome[:100]}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=5.0,
        help="seconds each measurement receives for, after a 1 s warm-up (default 5)",
    )
    parser.add_argument("--envs", type=int, default=1, help="environments per unroll (default 1)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measurements of each kind, alternating; the medians are reported (default 3)",
    )
    parser.add_argument(
        "--hostile", action="store_true", help="measure rejecting issue 18's oversized and many-frame messages instead"
    )
    args = parser.parse_args()
    if args.hostile:
        hostile()
    else:
        report(args.seconds, args.envs, args.repeats)


if __name__ == "__main__":
    main()
