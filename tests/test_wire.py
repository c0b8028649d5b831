import json
import struct

import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from fedzip.errors import PayloadError
from fedzip.wire import Message, decode, encode
from fedzip.wire.payload import MAX_HEADER_BYTES, PREFIX


def sample(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Message(tensors={"layer.lora_A.weight": torch.randn(4, 16, generator=g),
                            "layer.lora_B.weight": torch.randn(32, 4, generator=g),
                            "head.bias": torch.randn(3, generator=g)},
                   meta={"round": 3, "num_examples": 17})


def body_bytes(data: bytes) -> int:
    _, header_len = PREFIX.unpack_from(data)
    return len(data) - PREFIX.size - header_len


@pytest.mark.parametrize("codec,tol", [("fp32", 0.0), ("fp16", 1e-3), ("bf16", 1e-2)])
def test_round_trip(codec, tol):
    msg = sample()
    out = decode(encode(msg, codec), {n: tuple(t.shape) for n, t in msg.tensors.items()})
    assert out.meta == msg.meta
    for n, t in msg.tensors.items():
        assert out.tensors[n].dtype == torch.float32
        assert torch.allclose(out.tensors[n], t, atol=tol * t.abs().max().item(), rtol=tol)
    if codec == "fp32":
        assert all(torch.equal(out.tensors[n], t) for n, t in msg.tensors.items())


def test_fp16_halves_dense_bytes():
    msg = sample()
    n = sum(t.numel() for t in msg.tensors.values())
    b32, b16 = body_bytes(encode(msg, "fp32")), body_bytes(encode(msg, "fp16"))
    assert b32 == 4 * n and b16 == 2 * n and b16 * 2 == b32
    assert body_bytes(encode(msg, "bf16")) == 2 * n


def test_per_tensor_codec_mapping():
    msg = sample()
    data = encode(msg, {"layer.lora_A.weight": "fp16", "layer.lora_B.weight": "fp32", "head.bias": "bf16"})
    assert [e["codec"] for e in header_of(data)["tensors"]] == ["fp16", "fp32", "bf16"]
    assert set(decode(data).tensors) == set(msg.tensors)


def test_every_truncation_raises_typed_error():
    data = encode(sample(), "fp16")
    for cut in range(len(data)):
        with pytest.raises(PayloadError):
            decode(data[:cut])


def test_trailing_garbage_rejected():
    with pytest.raises(PayloadError, match="declares"):
        decode(encode(sample()) + b"\x00")


def test_corrupted_bytes_raise_typed_error_or_change_exactly_the_flipped_value():
    msg = sample()
    data = bytearray(encode(msg, "fp32"))
    expect = {n: tuple(t.shape) for n, t in msg.tensors.items()}
    body_start = len(data) - body_bytes(bytes(data))
    original = torch.cat([t.flatten() for t in msg.tensors.values()])
    decoded = 0
    for pos in range(0, len(data), 7):
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        try:
            out = decode(bytes(bad), expect)
        except PayloadError:
            continue
        decoded += 1
        # Only a flip inside the fp32 values can decode, and it changes that one value and nothing else.
        assert pos >= body_start
        changed = torch.nonzero(torch.cat([out.tensors[n].flatten() for n in msg.tensors]) != original).flatten()
        assert changed.tolist() == [(pos - body_start) // 4]
        assert out.meta == msg.meta
    assert decoded > 0


def test_receiver_expectations_enforced():
    msg = sample()
    data = encode(msg)
    with pytest.raises(PayloadError, match="unexpected tensor"):
        decode(data, {"layer.lora_A.weight": (4, 16), "layer.lora_B.weight": (32, 4)})
    with pytest.raises(PayloadError, match="shape"):
        decode(data, {"layer.lora_A.weight": (16, 4), "layer.lora_B.weight": (32, 4), "head.bias": (3,)})
    with pytest.raises(PayloadError, match="missing"):
        decode(data, {**{n: tuple(t.shape) for n, t in msg.tensors.items()}, "extra": (2,)})


def test_non_finite_values_rejected():
    with pytest.raises(PayloadError, match="NaN"):
        decode(encode(Message({"x": torch.tensor([1.0, float("nan")])})))
    with pytest.raises(PayloadError, match="NaN or infinite"):
        decode(encode(Message({"x": torch.tensor([float("inf")])}), "fp16"))


def header_of(data: bytes) -> dict:
    raw = data[PREFIX.size:PREFIX.size + PREFIX.unpack_from(data)[1]]
    return json.loads(zstandard.ZstdDecompressor().decompress(raw) if data[:4] == b"FZP2" else raw)


def _forge(header: dict, body: bytes = b"", magic: bytes = b"FZP2") -> bytes:
    h = json.dumps(header).encode()
    if magic == b"FZP2":
        h = zstandard.ZstdCompressor().compress(h)
    return struct.pack("<4sI", magic, len(h)) + h + body


def test_header_is_compressed_and_plain_headers_still_read():
    """Long module names repeat in every entry: compressed, the header of a small message stops dominating it."""
    names = [f"base_model.model.encoder.layer.{i}.attention.self.{m}.lora_A.parametrizations.weight.0.R"
             for i in range(6) for m in ("query", "key", "value")]
    msg = Message({n: torch.randn(16, 16) for n in names}, {"round": 1})
    data = encode(msg, "int8")
    plain = json.dumps(header_of(data), separators=(",", ":")).encode()
    assert PREFIX.unpack_from(data)[1] < len(plain) / 5
    # the same message with its header as plain JSON (FZP1) decodes to the same tensors
    old = _forge(header_of(data), data[PREFIX.size + PREFIX.unpack_from(data)[1]:], magic=b"FZP1")
    for n, t in decode(old).tensors.items():
        assert torch.equal(t, decode(data).tensors[n])


def test_header_bomb_and_broken_zstd_rejected():
    def framed(h: bytes) -> bytes:
        return struct.pack("<4sI", b"FZP2", len(h)) + h

    bomb = zstandard.ZstdCompressor().compress(b" " * (MAX_HEADER_BYTES + 10))
    with pytest.raises(PayloadError, match="at most"):
        decode(framed(bomb))
    sizeless = zstandard.ZstdCompressor(write_content_size=False).compress(b'{"meta":{},"tensors":[]}')
    with pytest.raises(PayloadError, match="declared size"):
        decode(framed(sizeless))
    with pytest.raises(PayloadError, match="zstd"):
        decode(framed(b"notzstd!"))
    honest = zstandard.ZstdCompressor().compress(b'{"meta":{},"tensors":[]}')
    assert decode(framed(honest)).tensors == {}
    with pytest.raises(PayloadError, match="zstd"):  # bytes smuggled after the frame, inside the header's length
        decode(framed(honest + b"extra"))


@pytest.mark.parametrize("header,body", [
    ({"meta": {}, "tensors": [{"name": "x", "shape": [2], "codec": "fp32", "params": {}, "nbytes": 4}]}, b"\0" * 4),
    ({"meta": {}, "tensors": [{"name": "x", "shape": [-1], "codec": "fp32", "params": {}, "nbytes": 4}]}, b"\0" * 4),
    ({"meta": {}, "tensors": [{"name": "x", "shape": [1], "codec": "pickle", "params": {}, "nbytes": 4}]}, b"\0" * 4),
    ({"meta": {}, "tensors": [{"name": "x", "shape": [1], "codec": "fp32", "params": {"a": 1}, "nbytes": 4}]}, b"\0" * 4),
    ({"meta": {}, "tensors": [{"name": "x", "shape": [1 << 40], "codec": "fp32", "params": {}, "nbytes": 4}]}, b"\0" * 4),
    ({"meta": [], "tensors": []}, b""),
    ({"meta": {}, "tensors": [{"name": "x"}]}, b""),
    ({"meta": {}, "tensors": [], "extra": 1}, b""),
])
@pytest.mark.parametrize("magic", [b"FZP2", b"FZP1"])
def test_forged_headers_rejected(header, body, magic):
    with pytest.raises(PayloadError):
        decode(_forge(header, body, magic))


def test_size_limit_and_magic():
    data = encode(sample())
    with pytest.raises(PayloadError, match="exceeds"):
        decode(data, max_bytes=len(data) - 1)
    with pytest.raises(PayloadError, match="magic"):
        decode(b"PK\x03\x04" + data[4:])


@settings(max_examples=60, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=0, max_size=4),
       codec=st.sampled_from(["fp32", "fp16", "bf16"]), seed=st.integers(0, 2**16))
def test_property_round_trip_and_size(shapes, codec, seed):
    g = torch.Generator().manual_seed(seed)
    msg = Message({f"t{i}": torch.randn(tuple(s), generator=g) for i, s in enumerate(shapes)}, {"k": seed})
    data = encode(msg, codec)
    width = 4 if codec == "fp32" else 2
    assert body_bytes(data) == width * sum(t.numel() for t in msg.tensors.values())
    out = decode(data, {n: tuple(t.shape) for n, t in msg.tensors.items()})
    assert list(out.tensors) == list(msg.tensors) and out.meta == msg.meta
    wire_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[codec]
    for n, t in msg.tensors.items():  # exactly the values rounded to the wire format, nothing else
        assert torch.equal(out.tensors[n], t.to(wire_dtype).float())


def test_ledger_tag_is_bookkeeping_that_never_travels():
    msg = sample()
    tagged = Message(msg.tensors, msg.meta, ledger_tag="update+compressed_model")
    assert encode(tagged) == encode(msg)  # not one byte of it is sent or counted
    assert decode(encode(tagged)).ledger_tag == "update"
