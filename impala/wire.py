"""Wire format between actors and learner over ZeroMQ.

A message is a multipart ZeroMQ message:

  frame 0:    msgpack header {"proto": "impala", "v": PROTOCOL_VERSION,
              "kind": str, "task": int, "param_version": int, "meta": map,
              "arrays": [[name, dtype, shape], ...]}
  frame 1..N: raw C-contiguous bytes of each array, in header order.

Arrays travel as separate frames so that large observation/parameter buffers
are never copied into (or parsed out of) msgpack, and are decoded as
zero-copy read-only views. Nothing is ever pickled: a peer can only make us
allocate bounded headers and interpret bytes as a whitelisted numeric dtype.
Every malformed input raises WireError (a ValueError) with a one-line reason.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import msgpack
import numpy as np
import zmq

PROTOCOL_VERSION = 1
PROTO_NAME = "impala"

MAX_HEADER_BYTES = 64 * 2**10
MAX_RANK = 8
MAX_META_DEPTH = 16
DEFAULT_MAX_FRAME_BYTES = 256 * 2**20

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
_HEADER_KEYS = frozenset(
    {"proto", "v", "kind", "task", "param_version", "meta", "arrays"}
)
# Limits for the header unpacker: a hostile header cannot make msgpack
# allocate much more than the (already bounded) frame itself.
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
                raise WireError(f"{where} has a non-str key {key!r}")
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


def _pack_header(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def encode(
    kind: str,
    arrays: Mapping[str, np.ndarray] = _EMPTY,
    *,
    task: int = 0,
    param_version: int = 0,
    meta: Mapping | None = None,
) -> list:
    """Build the frames of one message: [header, array bytes...]."""
    if type(kind) is not str:
        raise WireError(f"kind must be str, got {type(kind).__name__}")
    if not _is_index(task):
        raise WireError(f"task must be an int >= 0, got {task!r}")
    if not _is_index(param_version):
        raise WireError(f"param_version must be an int >= 0, got {param_version!r}")
    meta = dict(meta or {})
    _check_plain(meta, "meta")

    specs, buffers = [], []
    for name, array in arrays.items():
        if type(name) is not str:
            raise WireError(f"array name must be str, got {name!r}")
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
        header = _pack_header(
            {
                "proto": PROTO_NAME,
                "v": PROTOCOL_VERSION,
                "kind": kind,
                "task": task,
                "param_version": param_version,
                "meta": meta,
                "arrays": specs,
            }
        )
    except (OverflowError, TypeError, ValueError) as exc:  # e.g. int beyond 64 bits
        raise WireError(f"header cannot be packed: {exc}") from None
    if len(header) > MAX_HEADER_BYTES:
        raise WireError(f"header is {len(header)} bytes > {MAX_HEADER_BYTES}")
    return [header, *buffers]


def _as_bytes_view(frame: Any, index: int, max_frame_bytes: int) -> memoryview:
    if isinstance(frame, zmq.Frame):
        frame = frame.buffer
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise WireError(f"frame {index} has unsupported type {type(frame).__name__}")
    view = memoryview(frame)
    if not view.c_contiguous:
        raise WireError(f"frame {index} is not contiguous")
    if view.nbytes > max_frame_bytes:
        raise WireError(f"frame {index} is {view.nbytes} bytes > limit {max_frame_bytes}")
    if view.format == "B" and view.ndim == 1:
        return view
    try:
        return view.cast("B")
    except (TypeError, ValueError):
        raise WireError(f"frame {index} cannot be viewed as bytes") from None


def _unpack_header(view: memoryview) -> dict:
    if view.nbytes > MAX_HEADER_BYTES:
        raise WireError(f"header frame is {view.nbytes} bytes > {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(
            view, raw=False, strict_map_key=True, use_list=True, **_UNPACK_LIMITS
        )
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise WireError(f"header is not valid msgpack ({type(exc).__name__})") from None
    if type(header) is not dict:
        raise WireError(f"header must be a map, got {type(header).__name__}")
    if header.get("proto") != PROTO_NAME:
        raise WireError(f"foreign protocol {header.get('proto')!r}, expected {PROTO_NAME!r}")
    if header.get("v") != PROTOCOL_VERSION or type(header.get("v")) is not int:
        raise WireError(
            f"protocol version mismatch: got {header.get('v')!r}, expected {PROTOCOL_VERSION}"
        )
    if set(header) != _HEADER_KEYS:
        raise WireError(f"header keys {sorted(map(str, header))} != {sorted(_HEADER_KEYS)}")
    return header


def _parse_spec(spec: Any, index: int) -> tuple[str, np.dtype, tuple[int, ...]]:
    if type(spec) is not list or len(spec) != 3:
        raise WireError(f"array spec {index} must be [name, dtype, shape]")
    name, dtype_name, shape = spec
    if type(name) is not str:
        raise WireError(f"array spec {index} name must be str")
    if type(dtype_name) is not str or dtype_name not in _DTYPES:
        raise WireError(f"array {name!r} has unsupported dtype {dtype_name!r}")
    if type(shape) is not list or len(shape) > MAX_RANK:
        raise WireError(f"array {name!r} shape must be a list of rank <= {MAX_RANK}")
    if not all(_is_index(d) for d in shape):
        raise WireError(f"array {name!r} shape {shape!r} must hold ints >= 0")
    return name, _DTYPES[dtype_name], tuple(shape)


def decode(
    frames: Sequence[bytes | memoryview | zmq.Frame],
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    allowed_kinds: Collection[str] | None = None,
) -> Message:
    """Validate and decode frames; arrays are zero-copy read-only views."""
    if isinstance(frames, (bytes, bytearray, memoryview, str)) or not isinstance(
        frames, Sequence
    ):
        raise WireError(f"frames must be a sequence of frames, got {type(frames).__name__}")
    if len(frames) == 0:
        raise WireError("message has no frames")
    views = [_as_bytes_view(f, i, max_frame_bytes) for i, f in enumerate(frames)]
    header = _unpack_header(views[0])

    kind = header["kind"]
    if type(kind) is not str:
        raise WireError("kind must be a str")
    if allowed_kinds is not None and kind not in allowed_kinds:
        raise WireError(f"unexpected message kind {kind!r}")
    for field in ("task", "param_version"):
        if not _is_index(header[field]):
            raise WireError(f"{field} must be an int >= 0, got {header[field]!r}")
    meta = header["meta"]
    if type(meta) is not dict:
        raise WireError("meta must be a map")
    _check_plain(meta, "meta")
    specs = header["arrays"]
    if type(specs) is not list:
        raise WireError("arrays must be a list")
    if len(specs) != len(views) - 1:
        raise WireError(f"header lists {len(specs)} arrays but {len(views) - 1} frames follow")

    arrays: dict[str, np.ndarray] = {}
    for index, (spec, view) in enumerate(zip(specs, views[1:])):
        name, dtype, shape = _parse_spec(spec, index)
        if name in arrays:
            raise WireError(f"duplicate array name {name!r}")
        expected = math.prod(shape) * dtype.itemsize
        if view.nbytes != expected:
            raise WireError(
                f"array {name!r} frame is {view.nbytes} bytes, shape {list(shape)} "
                f"of {dtype.name} needs {expected}"
            )
        arrays[name] = np.frombuffer(view, dtype=dtype).reshape(shape)

    return Message(kind, header["task"], header["param_version"], meta, arrays)


def send(
    socket: zmq.Socket,
    kind: str,
    arrays: Mapping[str, np.ndarray] = _EMPTY,
    *,
    flags: int = 0,
    **kw: Any,
) -> None:
    """Encode and send one message (zero-copy for large array frames)."""
    socket.send_multipart(encode(kind, arrays, **kw), flags=flags, copy=False)


def recv(socket: zmq.Socket, *, flags: int = 0, **decode_kw: Any) -> Message:
    """Receive and decode one message; raises WireError if it is malformed."""
    return decode(socket.recv_multipart(flags=flags, copy=False), **decode_kw)


def split_envelope(frames: Sequence[Any]) -> tuple[list, list]:
    """Split a ROUTER-received message into (identity_frames, payload_frames).

    This protocol only pairs ROUTER sockets with DEALER peers, which add no
    empty delimiter frame, so the envelope is exactly one identity frame.
    (REQ peers would add a delimiter; they are not supported.)
    """
    if len(frames) < 2:
        raise WireError(f"routed message needs identity + payload, got {len(frames)} frames")
    return list(frames[:1]), list(frames[1:])


def _frame_bytes(frame: Any) -> bytes:
    return frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)


def recv_routed(
    socket: zmq.Socket, *, flags: int = 0, **decode_kw: Any
) -> tuple[bytes, Message]:
    """Receive on a ROUTER socket: (peer identity, message).

    A bad payload raises RoutedWireError carrying the identity, so the caller
    can account errors per peer and keep serving.
    """
    frames = socket.recv_multipart(flags=flags, copy=False)
    identity_frames, payload = split_envelope(frames)
    identity = _frame_bytes(identity_frames[0])
    try:
        return identity, decode(payload, **decode_kw)
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
