"""The codec stack: sparsifiers, position coding, blockwise quantisation, zstd, chains; and a fuzz test."""

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedzip.config import load_config
from fedzip.errors import ConfigError, PayloadError
from fedzip.wire import Message, decode, encode, get_codec
from fedzip.wire.stages import decode_positions, encode_positions, position_floor_bits


def topk_reference(t: torch.Tensor, k: int) -> torch.Tensor:
    flat = t.flatten()
    out = torch.zeros_like(flat)
    idx = torch.topk(flat.abs(), k).indices
    out[idx] = flat[idx]
    return out.reshape(t.shape)


@pytest.mark.parametrize("density", [1 / 4, 1 / 16, 1 / 64])
def test_positions_within_ten_percent_of_the_floor(density):
    n = 200_000
    rng = np.random.default_rng(1)
    k = int(density * n)
    idx = np.sort(rng.choice(n, size=k, replace=False))
    buf, mode, m = encode_positions(idx, n)
    floor_bytes = position_floor_bits(n, k) / 8
    assert len(buf) <= 1.10 * floor_bytes, (mode, len(buf), floor_bytes)
    assert np.array_equal(decode_positions(buf, mode, m, k, n), idx)


def test_floor_matches_hand_computation():
    assert position_floor_bits(10, 3) == pytest.approx(math.log2(120))
    assert position_floor_bits(5, 0) == 0 and position_floor_bits(5, 5) == 0


def test_bitmap_chosen_when_dense():
    idx = np.arange(0, 1000, 2)
    buf, mode, _ = encode_positions(idx, 1000)
    assert mode == "bitmap" and len(buf) == 125


@pytest.mark.parametrize("spec", ["topk(0.1)", "topk(0.1)+fp16", "topk(0.3)+zstd", "nonzero+bf16+zstd(level=9)"])
def test_sparse_round_trip_keeps_exactly_the_top_k(spec):
    t = torch.randn(64, 33, generator=torch.Generator().manual_seed(3))
    c = get_codec(spec)
    buf, params = c.encode(t)
    out = c.decode(buf, tuple(t.shape), params)
    if spec.startswith("topk"):
        k = math.ceil(float(spec[5:8]) * t.numel())
        assert params["k"] == k
        ref = topk_reference(t, k)
    else:
        ref = t
    tol = 0 if spec == "topk(0.1)" or spec == "topk(0.3)+zstd" else 1e-2
    assert torch.equal(out != 0, ref != 0)
    assert torch.allclose(out, ref, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("bits,block", [(8, 64), (4, 32), (8, 7), (4, 1)])
def test_blockwise_quantisation_error_bound(bits, block):
    t = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1e-3
    c = get_codec(f"int{bits}(block={block})")
    buf, params = c.encode(t)
    nb = math.ceil(1000 / block)
    assert len(buf) == 4 * nb + (1000 if bits == 8 else 500)
    out = c.decode(buf, (1000,), params)
    levels = 127 if bits == 8 else 7
    padded = torch.zeros(nb * block)
    padded[:1000] = t
    s = padded.view(nb, block).abs().amax(1) / levels
    bound = s.repeat_interleave(block)[:1000] / 2 + 1e-9
    assert ((out - t).abs() <= bound).all()


def test_stochastic_rounding_is_unbiased_and_deterministic():
    t = torch.full((20000,), 0.3035) * torch.tensor([1.0, -1.0]).repeat(10000)
    t[0] = 1.0  # scale = 1/127 per block: 0.3035 sits between levels 38 and 39
    c = get_codec("int8(block=20000,stochastic=1)")
    b1, p = c.encode(t)
    assert b1 == c.encode(t)[0]
    out = c.decode(b1, (20000,), p)
    assert abs(out[2::2].mean().item() - 0.3035) < 2e-4
    det = get_codec("int8(block=20000)")
    assert abs(det.decode(det.encode(t)[0], (20000,), {})[2::2].mean().item() - 0.3035) > 2e-3


def test_stochastic_rounding_is_unbiased_for_a_value_sent_again_and_again():
    """A full model state sent every round repeats most values: their rounding must not repeat with them."""
    c = get_codec("int4(block=64,stochastic=1)")
    decoded = []
    for rnd in range(400):
        t = torch.zeros(64)
        t[0] = 1.0  # the block's scale: 1/7
        t[1] = 0.1  # between levels 0 and 1
        t[2] = rnd * 1e-6  # the rest of the state moves a little each round
        decoded.append(c.decode(c.encode(t)[0], (64,), {})[1].item())
    assert abs(sum(decoded) / len(decoded) - 0.1) < 0.01  # deterministic rounding would give 1/7 every time


def test_zstd_shrinks_redundant_data_and_counts_its_bytes():
    t = torch.zeros(10000)
    t[::100] = 1.0
    dense = encode(Message({"x": t}), "fp32")
    packed = encode(Message({"x": t}), "fp32+zstd")
    assert len(packed) < len(dense) / 20
    assert torch.equal(decode(packed).tensors["x"], t)


def test_zstd_never_makes_a_tensor_bigger():
    """int4 values of a random tensor do not compress: the stage sends them as they are, not in a larger frame."""
    t = torch.randn(256, generator=torch.Generator().manual_seed(0))
    plain, packed = get_codec("int4"), get_codec("int4+zstd")
    buf, params = packed.encode(t)
    assert len(buf) == len(plain.encode(t)[0]) == params["raw"]
    assert torch.equal(packed.decode(buf, (256,), params), plain.decode(plain.encode(t)[0], (256,), {}))
    z = torch.zeros(256)
    buf, params = packed.encode(z)
    assert len(buf) < params["raw"] and torch.equal(packed.decode(buf, (256,), params), z)


def test_a_zstd_bomb_is_refused_before_it_is_decompressed():
    """A frame of a few kB that declares 256 MB: refused from its declaration, whatever the header's raw says."""
    import resource

    import zstandard

    bomb = zstandard.ZstdCompressor().compress(b"\0" * (1 << 28))
    codec = get_codec("fp32+zstd")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(PayloadError, match="declares"):
        codec.decode(bomb, (64,), {"raw": 256})
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing near 256 MB
    good, params = codec.encode(torch.zeros(64))
    with pytest.raises(PayloadError, match="zstd"):  # bytes after the frame
        codec.decode(good + b"tail", (64,), params)


def test_config_accepts_chains_as_lists_and_rejects_bad_specs():
    cfg = load_config(None, ["wire.up=[topk(0.05), int8, zstd]"])
    assert cfg.wire.up == "topk(0.05)+int8(block=64)+zstd(level=3)"
    for bad in ["topk(2)", "zstd+int8", "int8+int4", "lzma", "topk(x)", "int8(block=0)"]:
        with pytest.raises(ConfigError):
            load_config(None, [f"wire.up={bad}"])


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 3000), density=st.floats(0.001, 1.0), seed=st.integers(0, 10_000),
       values=st.sampled_from(["", "+fp16", "+int8", "+int4(block=16)"]), z=st.booleans())
def test_property_chain_round_trip_and_accounting(n, density, seed, values, z):
    t = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    spec = f"topk({density:.4f}){values}{'+zstd' if z else ''}"
    c = get_codec(spec)
    buf, params = c.encode(t)
    out = c.decode(buf, (n,), params)
    k = params["k"]
    assert k == min(n, math.ceil(float(f"{density:.4f}") * n))
    assert int((out != 0).sum()) <= k
    if not z:  # without the entropy stage the bytes are exactly positions + values
        val = {"": 4 * k, "+fp16": 2 * k, "+int8": 4 * math.ceil(k / 64) + k,
               "+int4(block=16)": 4 * math.ceil(k / 16) + (k + 1) // 2}[values]
        assert len(buf) == params["np"] + val
    if values == "":
        assert torch.equal(out, topk_reference(t, k))


def test_fuzz_every_decoder_with_mutated_and_random_payloads():
    """Thousands of hostile payloads: each decodes to the declared shapes or raises PayloadError."""
    rng = random.Random(0)
    t = {"a": torch.randn(40, 8, generator=torch.Generator().manual_seed(0)), "b": torch.randn(17)}
    expect = {k: tuple(v.shape) for k, v in t.items()}
    specs = ["fp32", "fp16", "bf16", "int8", "int4(block=8)", "topk(0.1)", "topk(0.6)", "topk(0.2)+int8+zstd",
             "fp16+zstd", "nonzero+int4"]
    seeds = [encode(Message(t, {"round": 1}), s) for s in specs]
    checked = 0
    for _i in range(4000):
        data = bytearray(rng.choice(seeds))
        op = rng.randrange(5)
        if op == 0:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1:
            data = data[: rng.randrange(len(data))]
        elif op == 2:
            pos = rng.randrange(len(data))
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 3:
            data = bytearray(rng.randbytes(rng.randint(0, 300)))
        else:  # mutate a header digit: sizes, shapes and params lie
            digits = [j for j, ch in enumerate(data[:400]) if 48 <= ch <= 57]
            if digits:
                data[rng.choice(digits)] = rng.randrange(48, 58)
        try:
            out = decode(bytes(data), expect, max_bytes=1 << 20)
        except PayloadError:
            continue
        assert {k: tuple(v.shape) for k, v in out.tensors.items()} == expect
        assert all(torch.isfinite(v).all() for v in out.tensors.values())
        checked += 1
    assert checked > 0  # some mutations (inside value bytes) legitimately decode
