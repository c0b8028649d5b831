"""Codecs turn one tensor into bytes and back.

A codec is any object with a ``name``, ``encode(tensor) -> (bytes, params)`` and
``decode(buffer, shape, params) -> tensor``. ``params`` is a small JSON-able dict that travels in
the payload header (so its bytes are counted too). Decoders must validate what they read and raise
:class:`~fedzip.errors.PayloadError`, never anything else, on bad input: they face the network.

Dense codecs live here; sparse, quantised and learned codecs register themselves the same way.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Protocol

import numpy as np
import torch

from fedzip.errors import ConfigError, PayloadError


class Codec(Protocol):
    name: str

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, dict[str, Any]]: ...

    def decode(self, buffer: bytes, shape: tuple[int, ...], params: dict[str, Any]) -> torch.Tensor: ...


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


class DenseCodec:
    """Every element, little-endian, in one floating-point format (decoded to float32)."""

    def __init__(self, name: str, wire_dtype: torch.dtype):
        self.name = name
        self.wire_dtype = wire_dtype
        self.itemsize = torch.empty((), dtype=wire_dtype).element_size()

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, dict[str, Any]]:
        t = tensor.detach().to("cpu", self.wire_dtype).contiguous()
        if self.wire_dtype == torch.bfloat16:  # numpy has no bfloat16: ship the raw 16 bits
            t = t.view(torch.int16)
        return t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes(), {}

    def decode(self, buffer: bytes, shape: tuple[int, ...], params: dict[str, Any]) -> torch.Tensor:
        if params:
            raise PayloadError(f"codec {self.name} takes no parameters, got {sorted(params)}")
        expected = numel(shape) * self.itemsize
        if len(buffer) != expected:
            raise PayloadError(
                f"codec {self.name}: buffer has {len(buffer)} bytes, shape {list(shape)} needs {expected}"
            )
        if self.wire_dtype == torch.bfloat16:
            raw = torch.from_numpy(np.frombuffer(buffer, dtype="<i2").copy()).view(torch.bfloat16)
        else:
            np_dtype = {torch.float32: "<f4", torch.float16: "<f2"}[self.wire_dtype]
            raw = torch.from_numpy(np.frombuffer(buffer, dtype=np_dtype).copy())
        return raw.to(torch.float32).reshape(shape)


CODECS: dict[str, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    """Make a codec available by name to configs and decoders."""
    CODECS[codec.name] = codec
    return codec


def get_codec(name: str) -> Codec:
    """A registered codec, or a chain parsed from its spec (``topk(0.05)+int8+zstd``)."""
    if name in CODECS:
        return CODECS[name]
    if not isinstance(name, str):
        raise ConfigError(f"codec name must be a string, got {type(name).__name__}")
    return _chain(name)


@functools.lru_cache(maxsize=256)  # bounded: names arrive from the network too
def _chain(spec: str) -> Codec:
    from fedzip.wire.stages import ChainCodec

    return ChainCodec(spec)


register_codec(DenseCodec("fp32", torch.float32))
register_codec(DenseCodec("fp16", torch.float16))
register_codec(DenseCodec("bf16", torch.bfloat16))
