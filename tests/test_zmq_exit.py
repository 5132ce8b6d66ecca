"""impala.experiment.release_zmq: no zero-copy frame is still lent to libzmq when pyzmq's
garbage collector stops at interpreter exit (the cause of `Assertion failed: pfd.revents &
POLLIN (src/signaler.cpp:238)` when actors got SIGTERM)."""

from __future__ import annotations

import subprocess
import sys

import zmq

from tests.cli import ROOT

# What an actor does on SIGTERM while an unroll is in flight to a learner that reads slowly:
# a zero-copy send bigger than the socket buffers, the socket closed with linger 0, exit.
# The atexit hook, registered after pyzmq's, runs before pyzmq's gc stops.
SENDER = """
import atexit, sys, time
import numpy as np, zmq
from zmq.utils.garbage import gc
from impala.experiment import release_zmq
atexit.register(lambda: print("lent at exit:", len(gc.refs)))
socket = zmq.Context.instance().socket(zmq.DEALER)
socket.setsockopt(zmq.SNDBUF, 4096)
socket.connect(sys.argv[1])
socket.send_multipart([b"unroll", np.ones(20_000_000, np.uint8)], copy=False)
time.sleep(0.2)
socket.close(linger=0)
release_zmq()
"""


def test_no_frame_is_lent_to_libzmq_when_the_process_exits():
    context = zmq.Context()
    stalled = context.socket(zmq.ROUTER)  # a learner that takes nothing
    stalled.setsockopt(zmq.RCVBUF, 4096)
    stalled.setsockopt(zmq.RCVHWM, 1)
    port = stalled.bind_to_random_port("tcp://127.0.0.1")
    try:
        for _ in range(3):
            out = subprocess.run(
                [sys.executable, "-c", SENDER, f"tcp://127.0.0.1:{port}"],
                cwd=ROOT,
                check=False,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 0, out.stderr
            assert "lent at exit: 0" in out.stdout, out.stdout + out.stderr
    finally:
        context.destroy(linger=0)
