"""Codecs turn one tensor into bytes and back.

A codec is any object with a ``name``, ``encode(tensor) -> (bytes, params)`` and
``decode(buffer, shape, params) -> tensor``. ``params`` is a small JSON-able dict that travels in
the payload header (so its bytes are counted too). Decoders must validate what they read and raise
:class:`~fedzip.errors.PayloadError`, never anything else, on bad input: they face the network.

Dense codecs live here; sparse, quantised and learned codecs register themselves the same way, and
``fedzip.wire.stages.get_codec`` finds a codec by name or parses a chain of stages.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import torch

from fedzip.errors import PayloadError


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


register_codec(DenseCodec("fp32", torch.float32))
register_codec(DenseCodec("fp16", torch.float16))
register_codec(DenseCodec("bf16", torch.bfloat16))
