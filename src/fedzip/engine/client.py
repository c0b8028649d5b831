"""The client side of a round, shared by every engine: the bytes the server sent in, the reply's bytes out.

The in-process engine and the Flower ClientApp both call :func:`run_client`, so a method's client code
runs the same way in a laptop simulation and on a SuperNode.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from fedzip import privacy
from fedzip.errors import ClientFailure, PayloadError
from fedzip.methods import ClientContext
from fedzip.wire import Message, decode, encode


def client_seed(seed: int, rnd: int, cid: int) -> int:
    return int(np.random.default_rng([seed, rnd, cid, 0xC1]).integers(2**31))


@dataclass
class ClientResult:
    up: bytes  # the encoded reply: all that leaves the client
    diagnostics: dict[str, torch.Tensor]  # the reply's simulation-only diagnostics, never encoded or sent


def run_client(method, store, rnd: int, cid: int, down: bytes, timing: dict[str, float] | None = None) -> ClientResult:
    """Decode the server's message, train client ``cid`` on its partition, encode the reply.

    ``method`` is a client-side instance (never the server's): all a client knows comes from its
    config, its data, its own state ``store`` and the bytes it received."""
    timing = timing if timing is not None else {}
    cfg, rt = method.cfg, method.rt
    t0 = time.time()
    spec = method.down_spec(cid, rnd)
    received = decode(down, spec, max_bytes=cfg.wire.max_payload_bytes, require_all=False)
    missing = sorted(set(spec) - set(received.tensors) - method.down_optional(cid, rnd))
    if missing:
        raise PayloadError(f"message from the server lacks tensor(s) {', '.join(missing[:5])}")
    t1 = time.time()
    ctx = ClientContext(cid=cid, round=rnd, indices=rt.parts[cid], store=store, seed=client_seed(cfg.seed, rnd, cid))
    reply = method.fit(ctx, received)
    check_reply(reply)
    reply.meta = privacy.released_reply_meta(cfg, reply.meta)
    t2 = time.time()
    up = encode(reply, method.wire_codec("up"))
    t3 = time.time()
    for key, dt in (("decode_s", t1 - t0), ("compute_s", t2 - t1), ("encode_s", t3 - t2)):
        timing[key] = timing.get(key, 0.0) + dt
    return ClientResult(up, reply.diagnostics)


def _finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


def check_reply(reply: Message) -> None:
    """A reply that training made non-finite (a diverging client: NaN or inf in its tensors or its loss) is a
    failed client with a reason, not a payload the encoder refuses with a bare error."""
    bad = [n for n, t in reply.tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ClientFailure(f"training diverged: tensor {bad[0]!r} has NaN or infinite values"
                            f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}")
    if not _finite(reply.meta):
        where = sorted(k for k, v in reply.meta.items() if not _finite(v))
        raise ClientFailure(f"training diverged: reply meta {', '.join(where)} is not finite "
                            f"({', '.join(repr(reply.meta[k]) for k in where[:3])})")
