"""Wire format between actors and learner over ZeroMQ.

A message is ONE ZeroMQ frame (docs/protocol.md):

  bytes [0, 4)      H, the header's length: uint32, little-endian
  bytes [4, 4+H)    msgpack header {"proto": "impala", "v": PROTOCOL_VERSION,
                    "kind": str, "task": int, "param_version": int, "meta": map,
                    "arrays": [[name, dtype, shape], ...]}
  then              each array's raw C-order little-endian bytes, in header order,
                    each starting at the next multiple of 8 (zero padding); the
                    frame ends where the last array ends.

One frame, because ZeroMQ's MAXMSGSIZE bounds each frame, not a multipart
message: with one frame per message the socket option bounds the whole message
at the transport. Offsets are not sent: the decoder derives them from the shapes,
so there is nothing to disagree with. Encoding copies the arrays once into the
frame (after which the caller may reuse them); decoding is zero-copy (read-only
numpy views of the received frame).

Receiving reads a message frame by frame and keeps at most the frames it
expects (1, or 2 behind a ROUTER's identity); a message of more frames is
drained one frame at a time and rejected, so a peer sending many frames costs
time per frame but no memory here. Nothing is ever pickled. Every malformed
input -- whatever the exception underneath -- raises WireError (a ValueError)
with a one-line reason.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import msgpack
import numpy as np
import zmq

PROTOCOL_VERSION = 2  # 2: one frame per message (1 had one frame per array)
PROTO_NAME = "impala"

MAX_HEADER_BYTES = 64 * 2**10
MAX_RANK = 8
MAX_META_DEPTH = 16
# Largest message decode() accepts unless told otherwise; the learner's sockets also
# cut off larger ones at the transport (ZMQ_MAXMSGSIZE, --max_message_mb).
DEFAULT_MAX_FRAME_BYTES = 256 * 2**20
ALIGNMENT = 8  # every array starts at a multiple of this (the largest itemsize)

_PREFIX = struct.Struct("<I")
_PADDING = bytes(ALIGNMENT)

# Canonical dtype names -> explicit little-endian dtypes. Only names are
# accepted on the wire, so byte order is never ambiguous ('>f4' is rejected).
_DTYPES: Mapping[str, np.dtype] = MappingProxyType(
    {
        "bool": np.dtype("?"),
        "uint8": np.dtype("u1"),
        "int8": np.dtype("i1"),
        "uint16": np.dtype("<u2"),
        "int16": np.dtype("<i2"),
        "int32": np.dtype("<i4"),
        "int64": np.dtype("<i8"),
        "float16": np.dtype("<f2"),
        "float32": np.dtype("<f4"),
        "float64": np.dtype("<f8"),
    }
)
_HEADER_KEYS = frozenset({"proto", "v", "kind", "task", "param_version", "meta", "arrays"})
# Limits for the header unpacker: a hostile header cannot make msgpack
# allocate much more than the (already bounded) header itself.
_UNPACK_LIMITS = dict(
    max_str_len=MAX_HEADER_BYTES,
    max_bin_len=0,
    max_array_len=4096,
    max_map_len=1024,
    max_ext_len=0,
)
_EMPTY: Mapping[str, np.ndarray] = MappingProxyType({})


class WireError(ValueError):
    """Malformed or unsupported message (either direction)."""


class RoutedWireError(WireError):
    """A bad payload that arrived via a ROUTER; `.identity` names the peer."""

    def __init__(self, message: str, identity: bytes) -> None:
        super().__init__(message)
        self.identity = identity


@dataclass(frozen=True)
class Message:
    kind: str
    task: int
    param_version: int
    meta: dict
    arrays: dict[str, np.ndarray]


def _short(value: Any, limit: int = 60) -> str:
    """repr() cut to one short line: peers choose these values."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_index(value: Any) -> bool:
    # bool is an int subclass; True must not pass as a task id or a dimension.
    return type(value) is int and value >= 0


def _check_plain(value: Any, where: str, depth: int = 0) -> None:
    """Raise WireError unless value is made of msgpack-native plain values."""
    if depth > MAX_META_DEPTH:
        raise WireError(f"{where} nested deeper than {MAX_META_DEPTH}")
    if value is None or type(value) in (str, int, float, bool):
        return
    if type(value) in (list, tuple):
        for item in value:
            _check_plain(item, where, depth + 1)
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise WireError(f"{where} has a non-str key {_short(key)}")
            _check_plain(item, where, depth + 1)
        return
    raise WireError(f"{where} holds a non-plain value of type {type(value).__name__}")


# dtype -> wire name by hash lookup: dtype.name is slow enough to matter per message.
_NAMES: Mapping[np.dtype, str] = MappingProxyType({dtype: name for name, dtype in _DTYPES.items()})


def _dtype_name(dtype: np.dtype) -> str:
    name = _NAMES.get(dtype)
    if name is not None:
        return name
    name = dtype.newbyteorder("<").name if dtype.byteorder == ">" else dtype.name
    if name not in _DTYPES:
        raise WireError(f"unsupported dtype {dtype.str!r}")
    return name


def encode(
    kind: str,
    arrays: Mapping[str, np.ndarray] = _EMPTY,
    *,
    task: int = 0,
    param_version: int = 0,
    meta: Mapping | None = None,
) -> list[bytes]:
    """The frames of one message: a list of one frame (for send_multipart).

    The arrays are copied once, into the frame; they may be changed afterwards."""
    if type(kind) is not str:
        raise WireError(f"kind must be str, got {type(kind).__name__}")
    if not _is_index(task):
        raise WireError(f"task must be an int >= 0, got {_short(task)}")
    if not _is_index(param_version):
        raise WireError(f"param_version must be an int >= 0, got {_short(param_version)}")
    meta = dict(meta or {})
    _check_plain(meta, "meta")

    specs, buffers = [], []
    for name, array in arrays.items():
        if type(name) is not str:
            raise WireError(f"array name must be str, got {_short(name)}")
        array = np.asarray(array)
        if array.ndim > MAX_RANK:
            raise WireError(f"array {name!r} has rank {array.ndim} > {MAX_RANK}")
        dtype_name = _dtype_name(array.dtype)
        # No copy when already C-contiguous little-endian (the common case).
        # (np.ascontiguousarray would turn 0-d arrays into 1-d ones.)
        array = np.asarray(array, dtype=_DTYPES[dtype_name])
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        specs.append([name, dtype_name, list(array.shape)])
        buffers.append(memoryview(array.reshape(-1).view(np.uint8)))

    try:
        header = msgpack.packb(
            {
                "proto": PROTO_NAME,
                "v": PROTOCOL_VERSION,
                "kind": kind,
                "task": task,
                "param_version": param_version,
                "meta": meta,
                "arrays": specs,
            },
            use_bin_type=True,
        )
    except (OverflowError, TypeError, ValueError) as exc:  # e.g. int beyond 64 bits
        raise WireError(f"header cannot be packed: {exc}") from None
    if len(header) > MAX_HEADER_BYTES:
        raise WireError(f"header is {len(header)} bytes > {MAX_HEADER_BYTES}")

    parts: list = [_PREFIX.pack(len(header)), header]
    end = _PREFIX.size + len(header)
    for buffer in buffers:
        padding = -end % ALIGNMENT
        parts.append(_PADDING[:padding])
        parts.append(buffer)
        end += padding + buffer.nbytes
    # bytes.join: the one copy of the arrays, straight into the frame (and without
    # the GIL for large frames).
    return [b"".join(parts)]


def _as_bytes_view(frame: Any, max_frame_bytes: int) -> memoryview:
    if isinstance(frame, zmq.Frame):
        frame = frame.buffer
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise WireError(f"frame has unsupported type {type(frame).__name__}")
    view = memoryview(frame)
    if not view.c_contiguous:
        raise WireError("frame is not contiguous")
    if view.nbytes > max_frame_bytes:
        raise WireError(f"message is {view.nbytes} bytes > limit {max_frame_bytes}")
    if view.format == "B" and view.ndim == 1:
        return view
    return view.cast("B")


def _unpack_header(view: memoryview) -> tuple[dict, int]:
    """(header, the byte where it ends)."""
    if view.nbytes < _PREFIX.size:
        raise WireError(f"message is {view.nbytes} bytes, shorter than its header length field")
    (size,) = _PREFIX.unpack_from(view)
    if size > MAX_HEADER_BYTES:
        raise WireError(f"header is {size} bytes > {MAX_HEADER_BYTES}")
    if _PREFIX.size + size > view.nbytes:
        raise WireError(f"header of {size} bytes runs past the message's end ({view.nbytes} bytes)")
    try:
        header = msgpack.unpackb(
            view[_PREFIX.size : _PREFIX.size + size],
            raw=False,
            strict_map_key=True,
            use_list=True,
            **_UNPACK_LIMITS,
        )
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise WireError(f"header is not valid msgpack ({type(exc).__name__})") from None
    if type(header) is not dict:
        raise WireError(f"header must be a map, got {type(header).__name__}")
    if header.get("proto") != PROTO_NAME:
        raise WireError(f"foreign protocol {_short(header.get('proto'))}, expected {PROTO_NAME!r}")
    if header.get("v") != PROTOCOL_VERSION or type(header.get("v")) is not int:
        raise WireError(f"protocol version mismatch: got {_short(header.get('v'))}, expected {PROTOCOL_VERSION}")
    if set(header) != _HEADER_KEYS:
        raise WireError(f"header keys {_short(sorted(map(str, header)), 200)} != {sorted(_HEADER_KEYS)}")
    return header, _PREFIX.size + size


def _parse_spec(spec: Any, index: int, max_bytes: int) -> tuple[str, np.dtype, tuple[int, ...], int]:
    """(name, dtype, shape, number of elements) of one array spec. The shape is
    bounded before numpy sees it: its non-zero dimensions must fit in `max_bytes`
    (the message's size), so an empty array cannot claim a shape like [0, 2**63]
    that numpy refuses."""
    if type(spec) is not list or len(spec) != 3:
        raise WireError(f"array spec {index} must be [name, dtype, shape]")
    name, dtype_name, shape = spec
    if type(name) is not str:
        raise WireError(f"array spec {index} name must be str")
    dtype = _DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        raise WireError(f"array {_short(name)} has unsupported dtype {_short(dtype_name)}")
    if type(shape) is not list or len(shape) > MAX_RANK:
        raise WireError(f"array {_short(name)} shape must be a list of rank <= {MAX_RANK}")
    count = nonzero = 1
    for d in shape:
        if type(d) is not int or d < 0:  # (not bool either)
            raise WireError(f"array {_short(name)} shape {_short(shape)} must hold ints >= 0")
        count *= d
        nonzero *= d or 1
    if nonzero * dtype.itemsize > max_bytes:
        raise WireError(f"array {_short(name)} shape {_short(shape)} is larger than the message")
    return name, dtype, tuple(shape), count


def _decode(frames: Any, max_frame_bytes: int, allowed_kinds: Collection[str] | None) -> Message:
    if isinstance(frames, (bytes, bytearray, memoryview, str)) or not isinstance(frames, Sequence):
        raise WireError(f"frames must be a sequence of frames, got {type(frames).__name__}")
    if len(frames) != 1:  # checked before touching any frame: a list may be huge
        raise WireError(f"message has {len(frames)} frames, expected 1")
    view = _as_bytes_view(frames[0], max_frame_bytes)
    header, end = _unpack_header(view)

    kind = header["kind"]
    if type(kind) is not str:
        raise WireError("kind must be a str")
    if allowed_kinds is not None and kind not in allowed_kinds:
        raise WireError(f"unexpected message kind {_short(kind)}")
    for field in ("task", "param_version"):
        if not _is_index(header[field]):
            raise WireError(f"{field} must be an int >= 0, got {_short(header[field])}")
    meta = header["meta"]
    if type(meta) is not dict:
        raise WireError("meta must be a map")
    _check_plain(meta, "meta")
    specs = header["arrays"]
    if type(specs) is not list:
        raise WireError("arrays must be a list")

    arrays: dict[str, np.ndarray] = {}
    if not view.readonly:  # (a bytearray given to decode): the arrays are read-only views
        view = view.toreadonly()
    for index, spec in enumerate(specs):
        name, dtype, shape, count = _parse_spec(spec, index, view.nbytes)
        if name in arrays:
            raise WireError(f"duplicate array name {_short(name)}")
        start = end + -end % ALIGNMENT
        end = start + count * dtype.itemsize
        if end > view.nbytes:
            raise WireError(
                f"array {_short(name)} of shape {list(shape)} {dtype.name} needs bytes "
                f"up to {end}, message has {view.nbytes}"
            )
        arrays[name] = np.frombuffer(view, dtype=dtype, count=count, offset=start).reshape(shape)
    if end != view.nbytes:
        raise WireError(f"message is {view.nbytes} bytes, its arrays end at byte {end}")
    return Message(kind, header["task"], header["param_version"], meta, arrays)


def decode(
    frames: Sequence[bytes | memoryview | zmq.Frame],
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    allowed_kinds: Collection[str] | None = None,
) -> Message:
    """Validate and decode one message (a sequence holding its one frame, of at
    most `max_frame_bytes`); arrays are zero-copy read-only views of the frame."""
    try:
        return _decode(frames, max_frame_bytes, allowed_kinds)
    except WireError:
        raise
    except Exception as exc:  # a check missed: still a bad message, never a crash
        raise WireError(f"undecodable message ({type(exc).__name__}: {_short(str(exc), 120)})") from None


def _recv_frames(socket: zmq.Socket, flags: int, keep: int) -> tuple[list[zmq.Frame], int]:
    """Reads one whole message; returns (its first `keep` frames, its number of frames).

    Frames beyond `keep` are read one at a time and dropped, so a message of
    millions of frames costs time but no memory here. (ZeroMQ delivers a message
    whole: once the first frame is read, the others are there.)"""
    frame = socket.recv(flags, copy=False)
    frames, count = [frame], 1
    while frame.more:
        frame = socket.recv(copy=False)
        count += 1
        if count <= keep:
            frames.append(frame)
    return frames, count


def send(
    socket: zmq.Socket,
    kind: str,
    arrays: Mapping[str, np.ndarray] = _EMPTY,
    *,
    flags: int = 0,
    **kw: Any,
) -> None:
    """Encode and send one message (the frame itself is not copied again)."""
    socket.send_multipart(encode(kind, arrays, **kw), flags=flags, copy=False)


def recv(socket: zmq.Socket, *, flags: int = 0, **decode_kw: Any) -> Message:
    """Receive and decode one message; raises WireError if it is malformed.

    `flags` apply to the first frame (zmq.NOBLOCK may raise zmq.Again)."""
    frames, count = _recv_frames(socket, flags, 1)
    if count != 1:
        raise WireError(f"message has {count} frames, expected 1")
    return decode(frames, **decode_kw)


def split_envelope(frames: Sequence[Any]) -> tuple[list, list]:
    """Split a ROUTER-received message into (identity_frames, payload_frames).

    This protocol only pairs ROUTER sockets with DEALER peers, which add no
    empty delimiter frame, so the envelope is exactly one identity frame.
    (REQ peers would add a delimiter; they are not supported.)
    """
    if len(frames) < 2:
        raise WireError(f"routed message needs identity + payload, got {len(frames)} frames")
    return list(frames[:1]), list(frames[1:])


def recv_routed(socket: zmq.Socket, *, flags: int = 0, **decode_kw: Any) -> tuple[bytes, Message]:
    """Receive on a ROUTER socket: (peer identity, message).

    A bad payload raises RoutedWireError carrying the identity, so the caller
    can account errors per peer and keep serving.
    """
    frames, count = _recv_frames(socket, flags, 2)
    identity = frames[0].bytes
    if count != 2:
        raise RoutedWireError(f"message has {count - 1} frames after the peer's identity, expected 1", identity)
    try:
        return identity, decode(frames[1:], **decode_kw)
    except WireError as exc:
        raise RoutedWireError(str(exc), identity) from None


def send_routed(
    socket: zmq.Socket,
    identity: bytes,
    kind: str,
    arrays: Mapping[str, np.ndarray] = _EMPTY,
    *,
    flags: int = 0,
    **kw: Any,
) -> None:
    """Send one message from a ROUTER socket to the peer named by identity."""
    socket.send_multipart([identity, *encode(kind, arrays, **kw)], flags=flags, copy=False)
