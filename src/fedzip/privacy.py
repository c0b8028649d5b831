"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018), with Google's ``dp-accounting``.

The mechanism, per round t (``privacy.mode`` central; ALGORITHMS-style box):
    server: sample each client independently with probability q = clients_per_round / num_clients (Poisson)
    client k: Delta_k <- its update (what the method sends, after any top-k);  Delta_k <- Delta_k * min(1, C / ||Delta_k||)
    server: Delta_k <- clipped again to C (whatever the codec or a dishonest client did to the bound)
            update = (sum_k Delta_k + N(0, (z C)^2 I)) / (q N)        -- a fixed denominator: the expected cohort
Adding or removing one client changes the sum by at most C, so each round is the sampled Gaussian mechanism
with noise multiplier z; the accountant composes T of them and reports epsilon at delta after every round.
Client weights by example count are dropped (uniform), since a client's count would move the sensitivity.

``privacy.mode`` local: each client adds N(0, (z C)^2 I) to its own clipped update before it leaves, so the
guarantee holds against the server too. The server knows whom it sampled, so sampling amplifies nothing and
the accountant counts every round (q = 1); the average carries sqrt(q N) times the central noise.

Threat model and scope are in the README ("Differential privacy"). This module holds only what every
method shares: clipping, noise, the accountant and the calibration of z to a target epsilon.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import numpy as np
import torch

from fedzip.errors import ConfigError


def enabled(cfg) -> bool:
    return cfg.privacy.mode != "off"


def sampling_rate(cfg) -> float:
    return cfg.clients_per_round / cfg.num_clients


def accounted_rate(cfg) -> float:
    """The sampling rate the accountant may use. Central: q (the server's sampling hides who took part from
    whoever sees only the model). Local: 1, because the server, which the guarantee must hold against, knows
    whom it sampled: every round counts as if the client took part (a worst-case bound)."""
    return sampling_rate(cfg) if cfg.privacy.mode == "central" else 1.0


def target_delta(cfg) -> float:
    """The delta epsilon is stated at: ``privacy.delta``, else 1 / num_clients (the population size)."""
    return cfg.privacy.delta if cfg.privacy.delta is not None else 1.0 / cfg.num_clients


def poisson_cohort(seed: int, rnd: int, num_clients: int, q: float) -> list[int]:
    """Each client independently with probability q: the sampling the accountant assumes."""
    rng = np.random.default_rng([seed, rnd, 0xD9])
    return [int(c) for c in np.flatnonzero(rng.random(num_clients) < q)]


# -- accounting ------------------------------------------------------------------------------------------
class _ExcludedOrders(logging.Filter):
    """dp-accounting's RDP accountant logs a warning each time it leaves out an order whose series does not
    converge (small orders at small noise); it leaves them out either way, and calibration asks dozens of times
    a run, so the warnings would bury the run's own log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_ExcludedOrders())


def _accountant(kind: str):
    from dp_accounting import pld, rdp

    if kind == "pld":
        return pld.PLDAccountant()
    return rdp.RdpAccountant()


def _event(q: float, z: float, rounds: int):
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)


def epsilon(q: float, z: float, rounds: int, delta: float, kind: str = "rdp") -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds of the Poisson-sampled Gaussian mechanism."""
    if rounds <= 0:
        return 0.0
    if z <= 0:
        return math.inf
    return float(_accountant(kind).compose(_event(q, z, rounds)).get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def calibrate(q: float, rounds: int, target_epsilon: float, delta: float, kind: str = "rdp") -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` rounds is at most ``target_epsilon``."""
    import dp_accounting

    try:
        z = dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(kind), lambda z: _event(q, z, rounds), target_epsilon, delta,
            dp_accounting.ExplicitBracketInterval(1e-3, 1e3), tol=1e-4)
    except (ValueError, dp_accounting.NoBracketIntervalFoundError) as exc:
        raise ConfigError(f"privacy.target_epsilon {target_epsilon}: no noise multiplier up to 1000 reaches it "
                          f"({exc})") from None
    return float(z)


def noise_multiplier(cfg) -> float:
    """``privacy.noise_multiplier``, or the one calibrated to ``privacy.target_epsilon`` over the whole run
    (deterministic: server and clients compute the same number from the config alone)."""
    p = cfg.privacy
    if p.noise_multiplier is not None:
        return float(p.noise_multiplier)
    return calibrate(accounted_rate(cfg), cfg.rounds, float(p.target_epsilon), target_delta(cfg), p.accountant)


def describe(cfg) -> dict:
    """What a run records about its guarantee (``method.json``, ``summary.json``)."""
    z = noise_multiplier(cfg)
    return {"mode": cfg.privacy.mode, "unit": "client", "clip": cfg.privacy.clip, "noise_multiplier": z,
            "adaptive_clip": {"quantile": cfg.privacy.clip_quantile, "lr": cfg.privacy.clip_lr, "max": cfg.privacy.clip_max,
                              "count_noise": count_noise(cfg), "update_noise_multiplier": update_noise_multiplier(cfg)}
            if adaptive(cfg) else None,
            "sampling": "poisson", "sampling_rate": sampling_rate(cfg), "delta": target_delta(cfg),
            "accountant": cfg.privacy.accountant, "target_epsilon": cfg.privacy.target_epsilon,
            "accounted_rate": accounted_rate(cfg),
            "epsilon_after_all_rounds": run_epsilon(cfg, cfg.rounds)}


def run_epsilon(cfg, rounds: int) -> float:
    """Epsilon at the run's delta after ``rounds`` rounds of this run's mechanism."""
    return epsilon(accounted_rate(cfg), noise_multiplier(cfg), rounds, target_delta(cfg), cfg.privacy.accountant)


# -- the mechanism -----------------------------------------------------------------------------------------
def l2_norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def clip(update: dict[str, torch.Tensor], bound: float) -> tuple[dict[str, torch.Tensor], float]:
    """``update`` scaled to L2 norm at most ``bound`` (all tensors together); returns it and the norm before."""
    norm = l2_norm(update)
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {n: t * scale for n, t in update.items()}, norm


def gaussian(like: dict[str, torch.Tensor], std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {n: torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.dtype) * std
            for n, t in like.items()}


def noise_generator(seed: int, rnd: int, who: int, stream: int = 0xD7) -> torch.Generator:
    """Seeded noise (reproducible runs, resumable); ``who`` is -1 for the server, else the client id.
    A deployment that wants noise no one can replay sets ``privacy.secure_noise`` (OS entropy)."""
    g = torch.Generator()
    g.manual_seed(int(np.random.default_rng([seed, rnd, who + 1, stream]).integers(2**63)))
    return g


def adaptive(cfg) -> bool:
    return cfg.privacy.clip_quantile is not None


def count_noise(cfg) -> float:
    """Std of the noise on the count of unclipped updates: ``privacy.clip_count_noise``, else the expected
    cohort / 20 (Andrew et al. 2021's suggestion)."""
    p = cfg.privacy
    return p.clip_count_noise if p.clip_count_noise is not None else sampling_rate(cfg) * cfg.num_clients / 20


def update_noise_multiplier(cfg) -> float:
    """The noise multiplier of the update itself. With adaptive clipping part of the privacy budget goes to
    the count: two Gaussian mechanisms with multipliers z_u and 2 sigma_b compose like one with
    z = (z_u^-2 + (2 sigma_b)^-2)^-1/2 (Andrew et al. 2021, Thm. 1), so z_u is what is left of the accounted z."""
    z = noise_multiplier(cfg)
    if not adaptive(cfg) or z == 0:
        return z
    twice = 2 * count_noise(cfg)
    if twice <= z:
        raise ConfigError(f"privacy.clip_count_noise {count_noise(cfg):g} must exceed half the noise multiplier "
                          f"({z:.3g}) for adaptive clipping to leave noise for the update")
    return (z ** -2 - twice ** -2) ** -0.5


class ClipBound:
    """The server's L2 bound for the round: fixed (``privacy.clip``), or, with ``privacy.clip_quantile``,
    moved each round towards that quantile of the clients' update norms by a geometric step on a noised
    count (Andrew et al., "Differentially private learning with adaptive clipping", 2021):
        b = (#{k : ||Delta_k|| <= C} + N(0, sigma_b^2)) / (q N);   C <- C * exp(-clip_lr * (b - quantile))
    ``privacy.clip_max`` caps C: the noise grows with C, and a model the noise degrades has larger updates,
    so at small epsilon an uncapped C can chase its own noise upwards (B5, epsilon 3). The cap is applied to
    the already-noised estimate, so it costs no privacy. Clients learn each round's bound from the server's
    message (``dp_clip``)."""

    def __init__(self, cfg):
        self.cfg, self.value = cfg, float(cfg.privacy.clip)

    def meta(self) -> dict:
        return {"dp_clip": self.value} if adaptive(self.cfg) else {}

    def facts(self) -> dict:
        return {"dp_clip": self.value} if adaptive(self.cfg) else {}

    def load(self, facts: dict) -> None:
        if adaptive(self.cfg):
            self.value = float(facts["dp_clip"])

    def after_round(self, below_bits: list, rnd: int) -> dict:
        """``below_bits``: each reply's ``dp_below``; anything but True counts as above the bound."""
        if not adaptive(self.cfg):
            return {}
        p, used = self.cfg.privacy, self.value
        g = _generator(self.cfg, rnd, -1, stream=0xD8)  # the server's count noise: a stream of its own
        noise = float(torch.randn((), generator=g, dtype=torch.float64)) * count_noise(self.cfg)
        below = sum(b is True for b in below_bits) + noise
        share = below / (sampling_rate(self.cfg) * self.cfg.num_clients)
        self.value = used * math.exp(-p.clip_lr * (share - p.clip_quantile))
        if p.clip_max is not None:
            self.value = min(self.value, p.clip_max)
        return {"dp_clip": used, "dp_unclipped_share_noised": share}


def client_bound(cfg, meta: dict) -> float:
    """The bound a client clips to: the server's of this round with adaptive clipping, else ``privacy.clip``."""
    if not adaptive(cfg):
        return float(cfg.privacy.clip)
    bound = meta.get("dp_clip")
    if not isinstance(bound, float) or not 0 < bound < 1e12:
        from fedzip.errors import PayloadError

        raise PayloadError(f"message meta 'dp_clip' must be a positive number, got {bound!r}")
    return bound


def private_update(cfg, update: dict[str, torch.Tensor], rnd: int, cid: int,
                   received_meta: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """A client's side: its update clipped to the round's bound (``client_bound`` of the server's message meta),
    with its own noise in local mode, and the reply meta DP adds: with adaptive clipping, whether the update was
    within the bound before clipping (``dp_below``: the bit the server's noised count sums; only the client
    knows it)."""
    bound = client_bound(cfg, received_meta or {})
    clipped, norm = clip(update, bound)
    if cfg.privacy.mode == "local":
        std = noise_multiplier(cfg) * bound
        noise = gaussian(clipped, std, _generator(cfg, rnd, cid))
        clipped = {n: t + noise[n] for n, t in clipped.items()}
    return clipped, ({"dp_below": norm <= bound} if adaptive(cfg) else {})


def private_mean(cfg, updates: list[dict[str, torch.Tensor]], rnd: int, clip_bound: ClipBound | None = None,
                 reply_metas: list[dict] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The server's side: every update clipped to the bound (again), summed, noised in central mode, and
    divided by the expected cohort q N; ``clip_bound`` (adaptive clipping) then moves for the next round.
    Returns the mean and the round's numbers for ``metrics.jsonl``."""
    bound = clip_bound.value if clip_bound is not None else float(cfg.privacy.clip)
    m = sampling_rate(cfg) * cfg.num_clients
    if cfg.privacy.mode == "local":  # the noise is in the updates: clipping it again would bias the average
        clipped, norms = updates, [l2_norm(u) for u in updates]
    else:
        pairs = [clip(u, bound) for u in updates]
        clipped, norms = [p[0] for p in pairs], [p[1] for p in pairs]
    total = {n: sum(u[n] for u in clipped) for n in updates[0]} if updates else {}
    if cfg.privacy.mode == "central" and total:
        noise = gaussian(total, update_noise_multiplier(cfg) * bound, _generator(cfg, rnd, -1))
        total = {n: t + noise[n] for n, t in total.items()}
    stats = {"dp_clipped_share": float(np.mean([n > bound for n in norms])) if norms else 0.0,
             "dp_update_norm": float(np.median(norms)) if norms else 0.0}
    if clip_bound is not None:
        stats |= clip_bound.after_round([m.get("dp_below") for m in reply_metas or []], rnd)
    return {n: t / m for n, t in total.items()}, stats


def _generator(cfg, rnd: int, who: int, stream: int = 0xD7) -> torch.Generator:
    if cfg.privacy.secure_noise:
        g = torch.Generator()
        g.manual_seed(int.from_bytes(os.urandom(8), "little") & (2**63 - 1))
        return g
    return noise_generator(cfg.seed, rnd, who, stream)


# -- record level (DP-SGD on each client, Opacus) ----------------------------------------------------------
def records(cfg):
    """``privacy.records`` when record-level DP-SGD is on, else None (what ``train_locally`` takes)."""
    if cfg.privacy.records.noise_multiplier is None:
        return None
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise ConfigError("privacy.records needs Opacus: pip install 'fedzip[dp]'") from None
    return cfg.privacy.records


def record_epsilon(cfg, num_examples: int, steps: int, rnd: int) -> float:
    """A client's record-level epsilon after round ``rnd``, by Opacus's RDP accountant, bounded as if it had
    trained in every round so far (``steps`` DP-SGD steps at rate batch_size / n each time): the client keeps
    no count of its rounds, and the server's sampling gives no amplification against the server."""
    from opacus.accountants import RDPAccountant

    rec = cfg.privacy.records
    accountant = RDPAccountant()
    accountant.history = [(rec.noise_multiplier, min(1.0, cfg.train.batch_size / num_examples), steps * rnd)]
    return float(accountant.get_epsilon(rec.delta if rec.delta is not None else 1.0 / num_examples))


def record_meta(cfg, num_examples: int, steps: int, rnd: int) -> dict:
    """What a reply says about its client's record-level guarantee (nothing when DP-SGD is off)."""
    return {"record_epsilon": record_epsilon(cfg, num_examples, steps, rnd)} if records(cfg) is not None else {}
