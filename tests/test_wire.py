"""Tests for impala.wire: round trips, zero-copy, validation, zmq transport."""

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from impala import wire
from impala.wire import PROTOCOL_VERSION, WireError, decode, encode

DTYPES = ["uint8", "int8", "int16", "uint16", "int32", "int64",
          "float16", "float32", "float64", "bool"]


def _header(frames):
    return msgpack.unpackb(frames[0], raw=False)


def _with_header(frames, **changes):
    header = _header(frames)
    header.update(changes)
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


def _as_bytes(frames):
    return [bytes(f) for f in frames]


def _sample():
    return _as_bytes(encode("rollout", {"obs": np.zeros((2, 3), np.float32),
                                        "act": np.arange(4, dtype=np.int64)}))


# -- round trips --------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 4), (2, 3, 4)])
def test_round_trip_dtypes_and_shapes(dtype, shape):
    rng = np.random.default_rng(0)
    array = (rng.integers(0, 100, size=shape) % 2 == 0 if dtype == "bool"
             else rng.integers(0, 100, size=shape).astype(dtype))
    message = decode(_as_bytes(encode("x", {"a": array})))
    out = message.arrays["a"]
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    np.testing.assert_array_equal(out, array)


def test_round_trip_header_fields_and_meta():
    meta = {"level": "Pong", "ok": True, "r": 1.5, "n": None, "xs": [1, [2, {"y": 3}]]}
    arrays = {"a": np.ones((2, 2), np.float32), "b": np.array(7, np.int32)}
    frames = encode("params", arrays, task=3, param_version=42, meta=meta)
    assert len(frames) == 3
    m = decode(_as_bytes(frames), allowed_kinds={"params"})
    assert (m.kind, m.task, m.param_version, m.meta) == ("params", 3, 42, meta)
    assert list(m.arrays) == ["a", "b"] and m.arrays["b"].shape == ()
    assert decode(encode("ping")).arrays == {}


def test_header_layout():
    header = _header(encode("x", {"a": np.zeros((2, 3), np.uint8)}))
    assert header == {"proto": "impala", "v": PROTOCOL_VERSION, "kind": "x",
                      "task": 0, "param_version": 0, "meta": {},
                      "arrays": [["a", "uint8", [2, 3]]]}


def test_non_contiguous_and_big_endian_are_normalised():
    source = np.arange(24, dtype=">f4").reshape(4, 6)[:, ::2]
    out = decode(_as_bytes(encode("x", {"a": source}))).arrays["a"]
    assert out.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(out, source)


def test_encode_is_zero_copy_and_decode_is_zero_copy():
    array = np.arange(1000, dtype=np.float32)
    frames = encode("x", {"a": array})
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), array)
    raw = _as_bytes(frames)
    out = decode(raw).arrays["a"]
    assert np.shares_memory(out, np.frombuffer(raw[1], np.uint8))
    assert not out.flags.writeable


@pytest.mark.parametrize("bad", [
    dict(kind=3), dict(task=-1), dict(task=True), dict(param_version=1.0),
    dict(meta={"a": np.int64(1)}), dict(meta={"a": b"bytes"}), dict(meta={1: 2}),
    dict(arrays={"a": np.zeros(2, object)}), dict(arrays={"a": np.zeros(2, complex)}),
    dict(arrays={"a": np.zeros((1,) * 9)}), dict(arrays={1: np.zeros(2)}),
    dict(task=2**70),
])
def test_encode_rejects_bad_input(bad):
    kw = dict(kind="x", arrays={}, task=0, param_version=0, meta=None) | bad
    with pytest.raises(WireError):
        encode(kw.pop("kind"), kw.pop("arrays"), **kw)


# -- validation failures -------------------------------------------------------

@pytest.mark.parametrize("mutate, reason", [
    (lambda f: _with_header(f, v=PROTOCOL_VERSION + 1), "version"),
    (lambda f: _with_header(f, v=True), "version"),
    (lambda f: _with_header(f, proto="other"), "protocol"),
    (lambda f: _with_header(f, kind=1), "kind"),
    (lambda f: _with_header(f, task=-1), "task"),
    (lambda f: _with_header(f, task=1.0), "task"),
    (lambda f: _with_header(f, param_version="1"), "param_version"),
    (lambda f: _with_header(f, meta=[1]), "meta"),
    (lambda f: _with_header(f, extra=1), "keys"),
    (lambda f: _with_header(f, arrays=[["obs", "object", [2, 3]], ["act", "int64", [4]]]), "dtype"),
    (lambda f: _with_header(f, arrays=[["obs", ">f4", [2, 3]], ["act", "int64", [4]]]), "dtype"),
    (lambda f: _with_header(f, arrays=[["obs", "<f4", [2, 3]], ["act", "int64", [4]]]), "dtype"),
    (lambda f: _with_header(f, arrays=[["obs", "float32", [3, 3]], ["act", "int64", [4]]]), "bytes"),
    (lambda f: _with_header(f, arrays=[["obs", "float32", [2, -3]], ["act", "int64", [4]]]), "shape"),
    (lambda f: _with_header(f, arrays=[["obs", "float32", [1] * 9], ["act", "int64", [4]]]), "shape"),
    (lambda f: _with_header(f, arrays=[["obs", "float32", [2, 3]], ["obs", "int64", [4]]]), "duplicate"),
    (lambda f: _with_header(f, arrays=[["obs", "float32"], ["act", "int64", [4]]]), "spec"),
    (lambda f: _with_header(f, arrays=[[1, "float32", [2, 3]], ["act", "int64", [4]]]), "name"),
    (lambda f: _with_header(f, arrays="nope"), "list"),
    (lambda f: [f[0][:-3], *f[1:]], "msgpack"),
    (lambda f: [b"", *f[1:]], "msgpack"),
    (lambda f: [msgpack.packb([1, 2]), *f[1:]], "map"),
    (lambda f: [msgpack.packb({1: 2}), *f[1:]], "msgpack"),  # strict_map_key
    (lambda f: [f[0] + b"\x00", *f[1:]], "msgpack"),  # trailing garbage
    (lambda f: f[:2], "frames"),
    (lambda f: [*f, b""], "frames"),
    (lambda f: [f[0], f[1][:-1], f[2]], "bytes"),
    (lambda f: [], "no frames"),
    (lambda f: [f[0], "text", f[2]], "type"),
])
def test_decode_rejects(mutate, reason):
    with pytest.raises(WireError, match=reason):
        decode(mutate(_sample()))


def test_decode_rejects_oversized_frame_and_header():
    frames = _sample()
    with pytest.raises(WireError, match="limit"):
        decode(frames, max_frame_bytes=20)
    big = msgpack.packb({"pad": "x" * (wire.MAX_HEADER_BYTES + 1)})
    with pytest.raises(WireError, match="header"):
        decode([big])


def test_decode_rejects_kind_not_allowed_and_non_plain_meta():
    with pytest.raises(WireError, match="kind"):
        decode(_sample(), allowed_kinds={"params"})
    ext = msgpack.packb(msgpack.ExtType(5, b"abc"))
    header = _header(_sample())
    header["meta"] = {"x": 1}
    good = msgpack.packb(header)
    evil = good.replace(b"\xa1x\x01", b"\xa1x" + ext)
    with pytest.raises(WireError, match="msgpack|non-plain"):
        decode([evil, *_sample()[1:]])


def test_decode_rejects_non_sequence():
    with pytest.raises(WireError):
        decode(b"frame")
    with pytest.raises(WireError):
        decode(None)


def test_deeply_nested_meta_is_rejected_cleanly():
    header = _header(_sample())
    nested = 1
    for _ in range(100):
        nested = [nested]
    header["meta"] = {"x": nested}
    with pytest.raises(WireError):
        decode([msgpack.packb(header), *_sample()[1:]])


# -- property-based -----------------------------------------------------------

_fuzz = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@_fuzz
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_random_frames_only_raise_wire_error(frames):
    try:
        decode(frames)
    except WireError:
        pass


@_fuzz
@given(st.data())
def test_mutated_valid_header_decodes_consistently_or_raises(data):
    frames = _sample()
    header = bytearray(frames[0])
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(header) - 1))
        header[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(header)))
    mutated = [bytes(header[:cut]), *frames[1:]]
    try:
        message = decode(mutated)
    except WireError:
        return
    # Anything that decodes must be self-consistent with its own header.
    assert len(message.arrays) == len(frames) - 1
    for array, frame in zip(message.arrays.values(), mutated[1:]):
        assert array.nbytes == len(frame)
    assert message.task >= 0 and message.param_version >= 0


@_fuzz
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
                    | st.floats(allow_nan=False) | st.text(max_size=10),
                    lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                    max_leaves=10))
def test_meta_round_trip(value):
    assert decode(encode("m", meta={"v": value})).meta == {"v": value}


# -- zmq transport -------------------------------------------------------------

@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_send_recv_over_inproc(context):
    pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    pull.bind("inproc://wire-test")
    push.connect("inproc://wire-test")
    big = np.arange(100_000, dtype=np.float32)  # above pyzmq's copy threshold
    wire.send(push, "rollout", {"obs": big, "r": np.array(1.5)}, task=1,
              param_version=9, meta={"actor": 4})
    assert pull.poll(2000)
    message = wire.recv(pull, allowed_kinds={"rollout"})
    assert (message.kind, message.task, message.param_version) == ("rollout", 1, 9)
    assert message.meta == {"actor": 4}
    np.testing.assert_array_equal(message.arrays["obs"], big)
    assert message.arrays["r"] == 1.5
    push.send_multipart([b"garbage"])
    assert pull.poll(2000)
    with pytest.raises(WireError):
        wire.recv(pull)
    wire.send(push, "ping", flags=zmq.NOBLOCK)
    assert pull.poll(2000) and wire.recv(pull).kind == "ping"


def test_router_dealer_routed_helpers(context):
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"actor-7")
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    wire.send(dealer, "hello", {"x": np.arange(3, dtype=np.int32)}, task=2)
    assert router.poll(5000)
    identity, message = wire.recv_routed(router)
    assert identity == b"actor-7" and message.kind == "hello" and message.task == 2
    np.testing.assert_array_equal(message.arrays["x"], [0, 1, 2])

    wire.send_routed(router, identity, "params", {"w": np.ones(4, np.float16)},
                     param_version=3)
    assert dealer.poll(5000)
    reply = wire.recv(dealer)
    assert reply.kind == "params" and reply.param_version == 3
    np.testing.assert_array_equal(reply.arrays["w"], np.ones(4))

    dealer.send_multipart([b"\xc1not msgpack"])
    assert router.poll(5000)
    with pytest.raises(wire.RoutedWireError) as info:
        wire.recv_routed(router)
    assert info.value.identity == b"actor-7" and isinstance(info.value, WireError)


def test_split_envelope():
    identity, payload = wire.split_envelope([b"id", b"h", b"a"])
    assert identity == [b"id"] and payload == [b"h", b"a"]
    with pytest.raises(WireError):
        wire.split_envelope([b"id"])
