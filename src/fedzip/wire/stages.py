"""Composable codecs: an optional sparsifier, a value coder, an optional entropy stage.

A chain is named by a spec string, e.g. ``topk(0.05)+int8+zstd``, ``nonzero+fp16``, ``int4(block=32)``:

* sparsifier (first, optional): ``topk(d)`` keeps the ``ceil(d * n)`` largest magnitudes of the tensor;
  ``nonzero`` keeps the entries a method left non-zero (e.g. after a global top-k mask). Positions are
  sent as a bitmap or as Rice-coded gaps, whichever is smaller for that tensor, chosen and counted.
* value coder (optional, default ``fp32``): ``fp32``, ``fp16``, ``bf16``, or blockwise ``int8`` / ``int4``
  with one float32 scale per block (``block=64`` default; ``stochastic=1`` for stochastic rounding).
* entropy stage (last, optional): ``zstd`` or ``zstd(level=N)`` over the tensor's final bytes, kept only
  where it makes them smaller.

The spec string travels in the payload header, so a receiver rebuilds the same chain. Decoders treat
every byte and parameter as hostile: bounded parsing, exact lengths, typed errors only.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedzip.errors import ConfigError, PayloadError
from fedzip.wire.codecs import CODECS, DenseCodec, numel

MAX_SPEC = 200
_STAGE = re.compile(r"^([a-z0-9]+)(?:\(([a-z0-9_.=,\s-]*)\))?$")
DENSE = {"fp32": DenseCodec("fp32", torch.float32), "fp16": DenseCodec("fp16", torch.float16),
         "bf16": DenseCodec("bf16", torch.bfloat16)}


# --- positions ----------------------------------------------------------------------------------
def position_floor_bits(n: int, k: int) -> float:
    """The information floor for which ``k`` of ``n`` positions are kept: log2(C(n, k)) bits."""
    if k <= 0 or k >= n:
        return 0.0
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def _rice_bits(gaps: np.ndarray, m: int) -> int:
    return int(((gaps - 1) >> m).sum()) + len(gaps) * (m + 1)


def encode_positions(idx: np.ndarray, n: int) -> tuple[bytes, str, int]:
    """Sorted unique positions -> (bytes, mode, rice parameter). Picks the smaller of bitmap and Rice gaps."""
    k = len(idx)
    if k == n:
        return b"", "all", 0
    if k == 0:
        return b"", "none", 0
    bitmap_bytes = (n + 7) // 8
    gaps = np.diff(np.concatenate([[-1], idx])).astype(np.int64)  # >= 1
    mean = float(gaps.mean())
    centre = max(0, int(round(math.log2(max(mean * math.log(2), 1.0)))))
    m = min(range(max(0, centre - 2), centre + 3), key=lambda mm: _rice_bits(gaps, mm))
    rice_bytes = (_rice_bits(gaps, m) + 7) // 8
    if bitmap_bytes <= rice_bytes:
        bits = np.zeros(n, dtype=np.uint8)
        bits[idx] = 1
        return np.packbits(bits).tobytes(), "bitmap", 0
    # Two streams so that decoding vectorises: unary quotients (q ones, then a zero), then m-bit remainders.
    v = gaps - 1
    q, r = v >> m, v & ((1 << m) - 1)
    ends = np.cumsum(q + 1) - 1  # where each quotient's terminating zero sits
    unary = np.ones(int(ends[-1]) + 1, dtype=np.uint8)
    unary[ends] = 0
    rem = ((r[:, None] >> np.arange(m - 1, -1, -1)) & 1).astype(np.uint8).ravel() if m else np.zeros(0, np.uint8)
    return np.packbits(unary).tobytes() + np.packbits(rem).tobytes(), "rice", m


def decode_positions(buf: bytes, mode: str, m: int, k: int, n: int) -> np.ndarray:
    if mode == "all":
        if buf or k != n:
            raise PayloadError("positions mode 'all' needs k == n and no position bytes")
        return np.arange(n)
    if mode == "none":
        if buf or k != 0:
            raise PayloadError("positions mode 'none' needs k == 0 and no position bytes")
        return np.zeros(0, dtype=np.int64)
    if mode == "bitmap":
        if len(buf) != (n + 7) // 8:
            raise PayloadError(f"bitmap has {len(buf)} bytes, {n} positions need {(n + 7) // 8}")
        bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8))
        if bits[n:].any():
            raise PayloadError("bitmap has bits set past the tensor's end")
        idx = np.flatnonzero(bits[:n])
        if len(idx) != k:
            raise PayloadError(f"bitmap marks {len(idx)} positions, header says {k}")
        return idx
    if mode != "rice" or not 0 <= m <= 40:
        raise PayloadError(f"unknown positions mode {mode!r} (m={m})")
    rem_bytes = (k * m + 7) // 8
    if len(buf) < rem_bytes + 1:
        raise PayloadError("Rice-coded positions are too short")
    unary = np.unpackbits(np.frombuffer(buf[: len(buf) - rem_bytes], dtype=np.uint8))
    ends = np.flatnonzero(unary == 0)
    if len(ends) < k or (int(ends[k - 1]) // 8) + 1 != len(buf) - rem_bytes or unary[int(ends[k - 1]) + 1:].any():
        raise PayloadError("Rice-coded positions: quotient stream does not hold exactly k codes")
    q = np.diff(np.concatenate([[-1], ends[:k]])) - 1
    rem_bits = np.unpackbits(np.frombuffer(buf[len(buf) - rem_bytes:], dtype=np.uint8))
    if rem_bits[k * m:].any():
        raise PayloadError("Rice-coded positions have trailing bits")
    r = (rem_bits[: k * m].reshape(k, m).astype(np.int64) << np.arange(m - 1, -1, -1)).sum(1) if m else np.zeros(k, np.int64)
    idx = np.cumsum((q.astype(np.int64) << m) + r + 1) - 1
    if idx[-1] >= n:
        raise PayloadError(f"position {int(idx[-1])} is outside a tensor of {n} elements")
    return idx


# --- zstd, read from a hostile sender -----------------------------------------------------------------
def read_zstd_frame(buf: bytes, what: str, size: int, exact: bool = False) -> bytes:
    """One zstd frame that declares its decompressed size, at most ``size`` bytes (exactly, with ``exact``), and
    nothing after it. python-zstandard decompresses a frame to the size it declares whatever ``max_output_size``
    says, so the declaration is checked first: a few kB cannot make the receiver allocate gigabytes."""
    import zstandard

    try:
        declared = zstandard.frame_content_size(buf)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"{what}: not a zstd frame: {exc}") from None
    if declared < 0:
        raise PayloadError(f"{what}: the zstd frame has no declared size")
    if declared > size or (exact and declared != size):
        raise PayloadError(f"{what}: the zstd frame declares {declared} bytes, "
                           f"{'the header says' if exact else 'at most'} {size}")
    try:
        return zstandard.ZstdDecompressor().decompress(buf, max_output_size=declared, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"{what}: zstd: {exc}") from None


# --- blockwise quantisation -------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockQuant:
    bits: int  # 8 or 4
    block: int = 64
    stochastic: bool = False

    @property
    def levels(self) -> int:
        return 127 if self.bits == 8 else 7

    def encode(self, v: torch.Tensor) -> tuple[bytes, dict]:
        v = v.detach().float().flatten()
        nb = math.ceil(len(v) / self.block)
        padded = torch.zeros(nb * self.block)
        padded[: len(v)] = v
        blocks = padded.view(nb, self.block)
        scale = blocks.abs().amax(dim=1) / self.levels
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        x = blocks / safe[:, None]
        if self.stochastic:
            # seeded by the tensor itself: the same update gives the same bytes, and the dither differs from one
            # tensor (and round) to the next, so a value sent again and again is not rounded the same way each time
            g = torch.Generator().manual_seed(zlib.crc32(v.cpu().numpy().tobytes()))
            x = torch.floor(x + torch.rand(x.shape, generator=g))
        else:
            x = torch.round(x)
        q = x.clamp(-self.levels, self.levels).to(torch.int8).flatten()[: len(v)].numpy()
        if self.bits == 8:
            body = q.tobytes()
        else:
            nib = (q.astype(np.int16) + 8).astype(np.uint8)
            if len(nib) % 2:
                nib = np.concatenate([nib, np.array([8], dtype=np.uint8)])
            body = (nib[0::2] << 4 | nib[1::2]).astype(np.uint8).tobytes()
        return scale.numpy().astype("<f4").tobytes() + body, {}

    def decode(self, buf: bytes, count: int) -> torch.Tensor:
        nb = math.ceil(count / self.block)
        body_len = count if self.bits == 8 else (count + 1) // 2
        if len(buf) != 4 * nb + body_len:
            raise PayloadError(f"int{self.bits}: {len(buf)} bytes, {count} values need {4 * nb + body_len}")
        scale = np.frombuffer(buf[: 4 * nb], dtype="<f4").astype(np.float32)
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise PayloadError(f"int{self.bits}: invalid block scales")
        body = np.frombuffer(buf[4 * nb:], dtype=np.uint8)
        if self.bits == 8:
            q = body.view(np.int8).astype(np.float32)
        else:
            nib = np.empty(2 * len(body), dtype=np.int16)
            nib[0::2], nib[1::2] = body >> 4, body & 0x0F
            q = (nib[:count] - 8).astype(np.float32)
        return torch.from_numpy(q * np.repeat(scale, self.block)[:count])


# --- the chain --------------------------------------------------------------------------------------
def _args(text: str | None) -> tuple[list[str], dict[str, str]]:
    if not text:
        return [], {}
    pos, kw = [], {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if "=" in part:
            k, v = part.split("=", 1)
            kw[k.strip()] = v.strip()
        else:
            pos.append(part)
    return pos, kw


class ChainCodec:
    """sparsifier? -> value coder -> zstd?, named by its canonical spec string."""

    def __init__(self, spec: str):
        if len(spec) > MAX_SPEC:
            raise ConfigError(f"codec spec longer than {MAX_SPEC} characters")
        self.sparsifier: tuple[str, float] | None = None
        self.values: Any = DENSE["fp32"]
        self.values_name = "fp32"
        self.zstd_level: int | None = None
        order = -1  # stages come in the order sparsifier, values, entropy, each at most once
        names = []
        for raw in spec.replace(" ", "").split("+"):
            m = _STAGE.match(raw)
            if not m:
                raise ConfigError(f"codec stage {raw!r} is not of the form name or name(args)")
            name, (pos, kw) = m.group(1), _args(m.group(2))
            try:
                if name in ("topk", "nonzero"):
                    stage_order = 0
                    density = float(pos[0] if pos else kw.get("density", "1")) if name == "topk" else 1.0
                    if not 0 < density <= 1:
                        raise ConfigError(f"topk density must be in (0, 1], got {density}")
                    self.sparsifier = (name, density)
                    names.append(f"topk({density:g})" if name == "topk" else "nonzero")
                elif name in DENSE:
                    stage_order = 1
                    self.values, self.values_name = DENSE[name], name
                    names.append(name)
                elif name in ("int8", "int4"):
                    stage_order = 1
                    block = int(kw.get("block", pos[0] if pos else 64))
                    stochastic = kw.get("stochastic", "0") in ("1", "true")
                    if not 1 <= block <= 1 << 20:
                        raise ConfigError(f"{name} block must be in [1, 2^20], got {block}")
                    self.values = BlockQuant(int(name[3:]), block, stochastic)
                    self.values_name = name
                    names.append(f"{name}(block={block}{',stochastic=1' if stochastic else ''})")
                elif name == "zstd":
                    stage_order = 2
                    self.zstd_level = int(kw.get("level", pos[0] if pos else 3))
                    if not 1 <= self.zstd_level <= 22:
                        raise ConfigError(f"zstd level must be in [1, 22], got {self.zstd_level}")
                    names.append(f"zstd(level={self.zstd_level})")
                else:
                    raise ConfigError(f"unknown codec stage {name!r}")
            except (ValueError, IndexError):
                raise ConfigError(f"codec stage {raw!r} has invalid arguments") from None
            if stage_order <= order:
                raise ConfigError(f"codec stages must be ordered sparsifier + values + zstd: {spec!r}")
            order = stage_order
        self.name = "+".join(names)

    # bytes layout before the entropy stage: positions | values
    def encode(self, tensor: torch.Tensor) -> tuple[bytes, dict[str, Any]]:
        flat = tensor.detach().float().flatten()
        n = flat.numel()
        params: dict[str, Any] = {}
        if self.sparsifier is not None:
            kind, density = self.sparsifier
            if kind == "topk":
                k = min(n, math.ceil(density * n))
                idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values.numpy() if k else np.zeros(0, np.int64)
            else:
                idx = torch.nonzero(flat).flatten().numpy()
            pos_bytes, mode, m = encode_positions(idx, n)
            values = flat[torch.from_numpy(idx)] if len(idx) else flat[:0]
            params.update({"k": int(len(idx)), "pos": mode, "m": m, "np": len(pos_bytes)})
        else:
            pos_bytes, values = b"", flat
        val_bytes, _ = self.values.encode(values)  # BlockQuant and DenseCodec share encode's signature
        raw = pos_bytes + val_bytes
        if self.zstd_level is not None:
            import zstandard

            params["raw"] = len(raw)
            packed = zstandard.ZstdCompressor(level=self.zstd_level).compress(raw)
            # a frame costs about 9 bytes: a small or incompressible tensor (int4 values look random) goes as it
            # is, which the receiver reads from its length, equal to the declared raw size only then
            raw = packed if len(packed) < len(raw) else raw
        return raw, params

    def decode(self, buffer: bytes, shape: tuple[int, ...], params: dict[str, Any]) -> torch.Tensor:
        n = numel(shape)
        expected = ({"k", "pos", "m", "np"} if self.sparsifier else set()) | ({"raw"} if self.zstd_level else set())
        if set(params) != expected:
            raise PayloadError(f"codec {self.name}: params {sorted(params)} do not match {sorted(expected)}")
        for key in ("k", "m", "np", "raw"):
            if key in params and (not isinstance(params[key], int) or isinstance(params[key], bool) or params[key] < 0):
                raise PayloadError(f"codec {self.name}: param {key!r} must be a non-negative integer")
        if self.zstd_level is not None:
            limit = 16 * n + (n + 7) // 8 + 1024  # no honest tensor needs more: refuse decompression bombs
            if params["raw"] > limit:
                raise PayloadError(f"codec {self.name}: declared size {params['raw']} is implausible for {n} values")
            if len(buffer) != params["raw"]:  # equal: sent as it is (zstd would not have made it smaller)
                buffer = read_zstd_frame(buffer, f"codec {self.name}", params["raw"], exact=True)
        if self.sparsifier is not None:
            k, npos = params["k"], params["np"]
            if k > n or npos > len(buffer):
                raise PayloadError(f"codec {self.name}: k={k} or position bytes {npos} out of range")
            idx = decode_positions(buffer[:npos], str(params["pos"]), params["m"], k, n)
            values = self._decode_values(buffer[npos:], k)
            out = torch.zeros(n)
            if k:
                out[torch.from_numpy(np.ascontiguousarray(idx))] = values
            return out.reshape(shape)
        return self._decode_values(buffer, n).reshape(shape)

    def _decode_values(self, buf: bytes, count: int) -> torch.Tensor:
        if isinstance(self.values, BlockQuant):
            return self.values.decode(buf, count)
        return self.values.decode(buf, (count,), {})


def get_codec(name: str):
    """A registered codec (``fp16``), or a chain parsed from its spec (``topk(0.05)+int8+zstd``)."""
    if name in CODECS:
        return CODECS[name]
    if not isinstance(name, str):
        raise ConfigError(f"codec name must be a string, got {type(name).__name__}")
    return _chain(name)


@functools.lru_cache(maxsize=256)  # bounded: names arrive from the network too
def _chain(spec: str) -> ChainCodec:
    return ChainCodec(spec)
