"""The payload: the only thing that crosses between a server and a client.

Layout (all integers little-endian)::

    b"FZP2" | u32 header_length | zstd(header, UTF-8 JSON) | buffer_0 | buffer_1 | ...

The header is ``{"meta": {...}, "tensors": [{"name", "shape", "codec", "params", "nbytes"}, ...]}``;
buffers follow in the order of ``tensors``. The header is compressed because its long, repetitive tensor
names would otherwise be a third of a small method's message (Fed-SB's r x r matrices, FedKSeed's scalars);
``b"FZP1"`` payloads, with the header as plain JSON, are still read. Nothing is ever unpickled.
:func:`decode` checks every declared size against the bytes actually present (the header decompresses to
at most ``MAX_HEADER_BYTES``), the names and shapes the receiver expects, and that decoded values are
finite, and raises :class:`PayloadError` on any mismatch.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import zstandard

from fedzip.errors import PayloadError
from fedzip.wire.codecs import numel
from fedzip.wire.stages import get_codec, read_zstd_frame

MAGIC = b"FZP2"  # the header zstd-compressed
PLAIN_MAGIC = b"FZP1"  # the header as plain JSON: read, no longer written
HEADER_ZSTD_LEVEL = 10  # a 5 kB header: 0.02 ms; level 19 saves 8 more bytes for 1.3 ms
# with a checksum (4 bytes): a corrupted header is an error, never a different valid header
PREFIX = struct.Struct("<4sI")
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSOR_ELEMENTS = 2**31


@dataclass
class Message:
    """Named float tensors plus JSON metadata: what a method sends or replies."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    # What the sender's ledger files this message under ("update", or e.g. FedBiOT's one-time
    # "update+compressed_model"). Bookkeeping on the sending side: never encoded, so never sent or counted.
    ledger_tag: str = "update"
    # Simulation-only diagnostics a client returns beside its reply (e.g. CG-FedLLM's true update next to its
    # compressed form). Never encoded: an in-process simulation hands them to the server's ``aggregate``
    # on the decoded reply; a deployment drops them on the node.
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


def encode(message: Message, codec: str | Mapping[str, str] = "fp32") -> bytes:
    """Serialise a message. ``codec`` is one codec name, or a per-tensor mapping of names."""
    entries, buffers = [], []
    for name, tensor in message.tensors.items():
        c = get_codec(codec if isinstance(codec, str) else codec[name])
        # Bytes are made on the CPU (a no-op for CPU tensors), so a tensor left on a GPU encodes the same.
        buf, params = c.encode(tensor.detach().cpu())
        entries.append({"name": name, "shape": list(tensor.shape), "codec": c.name, "params": params, "nbytes": len(buf)})
        buffers.append(buf)
    header = json.dumps({"meta": message.meta, "tensors": entries}, separators=(",", ":"), allow_nan=False).encode()
    header = zstandard.ZstdCompressor(level=HEADER_ZSTD_LEVEL, write_checksum=True).compress(header)
    return b"".join([PREFIX.pack(MAGIC, len(header)), header, *buffers])


def _header_text(magic: bytes, raw: bytes) -> bytes:
    """The header's JSON bytes: for FZP2, one zstd frame of at most MAX_HEADER_BYTES, nothing after it."""
    return raw if magic == PLAIN_MAGIC else read_zstd_frame(raw, "payload header", MAX_HEADER_BYTES)


def decode(
    data: bytes,
    expect: Mapping[str, tuple[int, ...]] | None = None,
    *,
    require_all: bool = True,
    max_bytes: int | None = None,
) -> Message:
    """Parse and validate a payload.

    ``expect`` maps the tensor names the receiver accepts to their shapes; any other name, a wrong
    shape, or (with ``require_all``) a missing name is an error.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < PREFIX.size:
        raise PayloadError(f"payload truncated: {len(data)} bytes, the prefix alone is {PREFIX.size}")
    magic, header_len = PREFIX.unpack_from(data)
    if magic not in (MAGIC, PLAIN_MAGIC):
        raise PayloadError(f"not a fedzip payload (magic {magic!r})")
    if header_len > MAX_HEADER_BYTES or PREFIX.size + header_len > len(data):
        raise PayloadError(f"header length {header_len} does not fit in a payload of {len(data)} bytes")
    text = _header_text(magic, data[PREFIX.size : PREFIX.size + header_len])
    try:
        header = json.loads(text.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, nesting too deep, an integer of 4,300+ digits
        raise PayloadError(f"payload header is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict) or set(header) != {"meta", "tensors"}:
        raise PayloadError("payload header must be an object with exactly 'meta' and 'tensors'")
    meta, entries = header["meta"], header["tensors"]
    if not isinstance(meta, dict) or not isinstance(entries, list):
        raise PayloadError("payload 'meta' must be an object and 'tensors' a list")

    body = memoryview(data)[PREFIX.size + header_len :]
    declared = 0
    tensors: dict[str, torch.Tensor] = {}
    for i, entry in enumerate(entries):
        name, shape, codec_name, params, nbytes = _check_entry(i, entry)
        if name in tensors:
            raise PayloadError(f"tensor {name!r} appears twice")
        if expect is not None:
            if name not in expect:
                raise PayloadError(f"unexpected tensor {name!r}")
            if tuple(expect[name]) != shape:
                raise PayloadError(f"tensor {name!r} has shape {list(shape)}, expected {list(expect[name])}")
        if declared + nbytes > len(body):
            raise PayloadError(
                f"payload truncated: tensor {name!r} declares {nbytes} bytes at offset {declared}, "
                f"body has {len(body)}"
            )
        try:
            codec = get_codec(codec_name)
        except Exception:
            raise PayloadError(f"tensor {name!r} uses unknown codec {codec_name!r}") from None
        try:
            tensor = codec.decode(bytes(body[declared : declared + nbytes]), shape, params)
        except PayloadError:
            raise
        except Exception as exc:  # a codec bug must still surface as a payload error, not a crash
            raise PayloadError(f"tensor {name!r}: codec {codec_name} failed: {exc}") from None
        if tuple(tensor.shape) != shape:
            raise PayloadError(f"tensor {name!r} decoded to shape {list(tensor.shape)}, declared {list(shape)}")
        if not torch.isfinite(tensor).all():
            raise PayloadError(f"tensor {name!r} contains NaN or infinite values")
        tensors[name] = tensor
        declared += nbytes
    if declared != len(body):
        raise PayloadError(f"payload body has {len(body)} bytes but the header declares {declared}")
    if expect is not None and require_all:
        missing = sorted(set(expect) - set(tensors))
        if missing:
            raise PayloadError(f"payload is missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return Message(tensors=tensors, meta=meta)


def _no_constant(name: str):
    """JSON has no NaN or Infinity; Python's parser accepts them unless told otherwise."""
    raise ValueError(f"{name} is not a JSON number")


def _check_entry(i: int, entry: Any) -> tuple[str, tuple[int, ...], str, dict, int]:
    keys = {"name", "shape", "codec", "params", "nbytes"}
    if not isinstance(entry, dict) or set(entry) != keys:
        raise PayloadError(f"tensor entry {i} must be an object with keys {sorted(keys)}")
    name, shape, codec, params, nbytes = (entry[k] for k in ("name", "shape", "codec", "params", "nbytes"))
    if not isinstance(name, str) or not name:
        raise PayloadError(f"tensor entry {i} has an invalid name")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape
    ):
        raise PayloadError(f"tensor {name!r} has an invalid shape {shape!r}")
    if numel(tuple(shape)) > MAX_TENSOR_ELEMENTS:
        raise PayloadError(f"tensor {name!r} declares too many elements")
    if not isinstance(codec, str) or not isinstance(params, dict):
        raise PayloadError(f"tensor {name!r} has an invalid codec or params")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise PayloadError(f"tensor {name!r} has an invalid byte count {nbytes!r}")
    return name, tuple(shape), codec, params, nbytes
