"""Wire format: payloads of named tensors, and the codecs that compress them."""

from fedzip.wire.codecs import CODECS, Codec, DenseCodec, register_codec
from fedzip.wire.payload import Message, decode, encode
from fedzip.wire.stages import get_codec

__all__ = ["CODECS", "Codec", "DenseCodec", "Message", "decode", "encode", "get_codec", "register_codec"]
