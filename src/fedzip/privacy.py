"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018), with Google's ``dp-accounting``.

The mechanism, per round t (``privacy.mode`` central; ALGORITHMS-style box):
    server: sample each client independently with probability q = clients_per_round / num_clients (Poisson)
    client k: Delta_k <- its update (what the method sends, after any top-k);  Delta_k <- Delta_k * min(1, C / ||Delta_k||)
    server: Delta_k <- clipped again to C (whatever the codec or a dishonest client did to the bound)
            update = (sum_k Delta_k + N(0, (z C)^2 I)) / (q N)        -- a fixed denominator: the expected cohort
Adding or removing one client changes the sum by at most C, so each round is the sampled Gaussian mechanism
with noise multiplier z; the accountant composes T of them and reports epsilon at delta after every round.
Client weights by example count are dropped (uniform), since a client's count would move the sensitivity.
A round whose cohort is empty (or whose every reply failed) still adds the noise: what it releases must not
say that no one took part.

``privacy.mode`` local: each client adds N(0, (z C)^2 I) to its own clipped update before it leaves, so the
guarantee holds against the server too. The server knows whom it sampled, so sampling amplifies nothing and
the accountant counts every round (q = 1); the average carries sqrt(q N) times the central noise.

Randomness. The guarantee holds only if no one can reproduce the cohort or the noise. By default every draw
comes from a 256-bit key taken from the operating system's entropy (``secrets``): the server's key (the cohort,
its noise, the count noise) is minted at a fresh start and kept in its checkpoint, which never leaves the
server, so a resumed run draws what the uninterrupted one would; each client's key (its local noise, its
DP-SGD batches and noise) is minted by the client and kept in its own state store, never sent.
``privacy.reproducible: true`` derives every draw from the run's seed instead: runs repeat bit for bit, and
anyone holding the config can replay the noise and subtract it, so such a run is labelled NOT PRIVATE in
``method.json``, ``summary.json`` and the report. It is for research on the mechanism, never the default.

What a private run releases (``metrics.jsonl``, ``summary.json``, the adapter, the report) leaves out the
cohort and every statistic computed from clients' updates without noise (:data:`UNPROTECTED_ROW_KEYS`); they
go to the server's own ``server_private.jsonl``, beside the ledger (which names each round's clients) and the
checkpoints. docs/explanation/threat-model.md says who is trusted with what.

This module holds only what every method shares: clipping, noise, randomness, the accountant and the
calibration of z to a target epsilon.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import secrets
import struct
from dataclasses import dataclass

import numpy as np
import torch

from fedzip.errors import ConfigError


def enabled(cfg) -> bool:
    return cfg.privacy.mode != "off"


def any_enabled(cfg) -> bool:
    """Client-level DP or record-level DP-SGD: a run whose randomness must stay secret."""
    return enabled(cfg) or cfg.privacy.records.noise_multiplier is not None


def is_private(cfg) -> bool:
    """True when the run's DP guarantee holds: DP is on and its randomness is not derived from the config."""
    return any_enabled(cfg) and not cfg.privacy.reproducible


def sampling_rate(cfg) -> float:
    return cfg.clients_per_round / cfg.num_clients


def accounted_rate(cfg) -> float:
    """The sampling rate the accountant may use. Central: q (the server's sampling hides who took part from
    whoever sees only the model). Local: 1, because the server, which the guarantee must hold against, knows
    whom it sampled: every round counts as if the client took part (a worst-case bound)."""
    return sampling_rate(cfg) if cfg.privacy.mode == "central" else 1.0


def default_delta(population: int) -> float:
    """delta when none is given: two orders of magnitude below 1 / population, and at most 1e-5.

    A mechanism may fail its epsilon bound with probability delta for each member; one that simply published
    a random member's data with probability delta would be (0, delta)-DP. At delta = 1 / N one member of N is
    expected to be exposed that way; at 0.01 / N, one in a hundred runs. 1e-5 caps it for small populations,
    the usual ceiling in the DP-SGD literature."""
    return min(1e-5, 0.01 / max(population, 1))


def target_delta(cfg) -> float:
    """The delta epsilon is stated at: ``privacy.delta``, else :func:`default_delta` of the population."""
    return cfg.privacy.delta if cfg.privacy.delta is not None else default_delta(cfg.num_clients)


# -- randomness ------------------------------------------------------------------------------------------
class Randomness:
    """The draws a DP guarantee rests on, one independent stream per (round, who, purpose).

    Keyed (the default): from a 256-bit secret key. Seeded (``privacy.reproducible``): from the run's seed,
    which is in the config: anyone can replay them."""

    def __init__(self, key: bytes | None, seed: int = 0):
        if key is not None and len(key) != 32:
            raise ValueError("a randomness key has 32 bytes")
        self.key, self.seed = key, seed

    @classmethod
    def fresh(cls, cfg) -> "Randomness":
        """A new key from the operating system's entropy, or the run's seed under ``privacy.reproducible``."""
        return cls(None if cfg.privacy.reproducible else secrets.token_bytes(32), cfg.seed)

    @property
    def seeded(self) -> bool:
        return self.key is None

    def _digest(self, rnd: int, who: int, stream: int, size: int) -> bytes:
        assert self.key is not None  # keyed draws only
        return hashlib.blake2b(struct.pack("<qqq", rnd, who, stream), key=self.key, digest_size=size).digest()

    def generator(self, rnd: int, who: int, stream: int) -> torch.Generator:
        """A torch generator for round ``rnd``, party ``who`` (-1: the server) and purpose ``stream``."""
        g = torch.Generator()
        if self.seeded:
            g.manual_seed(int(np.random.default_rng([self.seed, rnd, who + 1, stream]).integers(2**63)))
        else:
            g.manual_seed(int.from_bytes(self._digest(rnd, who, stream, 8), "little") & (2**63 - 1))
        return g

    def numpy(self, rnd: int, who: int, stream: int) -> np.random.Generator:
        if self.seeded:  # the server's as seeded runs drew them before keys existed, so that those runs repeat
            return np.random.default_rng([self.seed, rnd, stream] if who == -1 else [self.seed, rnd, who + 1, stream])
        return np.random.default_rng(int.from_bytes(self._digest(rnd, who, stream, 32), "little"))

    def int_seed(self, rnd: int, who: int, stream: int) -> int:
        """A 63-bit seed (for a library that takes one, e.g. Opacus's noise generator)."""
        return int(self.numpy(rnd, who, stream).integers(2**63))

    def cohort(self, rnd: int, num_clients: int, q: float) -> list[int]:
        """Each client independently with probability q: the sampling the accountant assumes."""
        return poisson_cohort(self.numpy(rnd, -1, COHORT), num_clients, q)


# streams: one per purpose, so that no two draws share randomness
COHORT, NOISE, COUNT_NOISE, DP_SGD = 0xD9, 0xD7, 0xD8, 0xDA


def poisson_cohort(rng: np.random.Generator, num_clients: int, q: float) -> list[int]:
    return [int(c) for c in np.flatnonzero(rng.random(num_clients) < q)]


def client_randomness(cfg, client) -> Randomness:
    """A client's own draws: from the key in its state store (made on first use, never sent), or the seed."""
    if cfg.privacy.reproducible:
        return Randomness(None, cfg.seed)
    return Randomness(client.store.secret(client.cid), cfg.seed)


# What a private run keeps out of metrics.jsonl (and so out of the summary, the report and compact results):
# the cohort, and statistics of the clients' updates, data and replies computed without noise. They go to the
# server's own ``server_private.jsonl``.
UNPROTECTED_ROW_KEYS = ("clients", "client_examples", "client_record_epsilon", "record_epsilon_max", "train_loss",
                        "rejected", "failed", "client_steps", "client_compute_s", "client_memory",
                        "dp_clipped_share", "dp_update_norm")


def split_row(cfg, row: dict) -> tuple[dict, dict]:
    """(what metrics.jsonl may hold, what only the server keeps) of a round's row. Without DP: (row, {}).
    Personalised evaluation's scores (``personal_*``) are clients' accuracy on their own data, without noise."""
    if not any_enabled(cfg):
        return row, {}
    private = {k: v for k, v in row.items() if k in UNPROTECTED_ROW_KEYS or k.startswith("personal_")}
    public = {k: v for k, v in row.items() if k not in private}
    return public, ({"round": row["round"], **private} if private else {})


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


def _eps_or_inf(q: float, z: float, rounds: int, delta: float, kind: str) -> float:
    try:
        return epsilon(q, z, rounds, delta, kind)
    except (OverflowError, ValueError):  # the accountant gives up where epsilon is astronomically large
        return math.inf


@functools.lru_cache(maxsize=64)
def calibrate(q: float, rounds: int, target_epsilon: float, delta: float, kind: str = "rdp") -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` rounds is at most ``target_epsilon``.

    RDP first, over z in [1e-3, 1e3]: its epsilon is cheap at any z, and is an upper bound of the PLD's, so its
    answer is an upper end for the PLD search. The PLD is then searched only between a quarter of that and it
    (halving the lower end while it still meets the target): at very small z a PLD needs gigabytes."""
    import dp_accounting
    from dp_accounting.mechanism_calibration import NoBracketIntervalFoundError

    low, high = 1e-3, 1e3
    if _eps_or_inf(q, high, rounds, delta, "rdp") > target_epsilon:
        raise ConfigError(f"privacy.target_epsilon {target_epsilon:g}: unreachable at delta {delta:g} over {rounds} "
                          f"rounds at sampling rate {q:g}, even with noise multiplier {high:g}")
    if _eps_or_inf(q, low, rounds, delta, "rdp") <= target_epsilon:
        raise ConfigError(f"privacy.target_epsilon {target_epsilon:g}: met with almost no noise (multiplier {low:g}); "
                          "give privacy.noise_multiplier instead")

    def search(make, lo: float, hi: float) -> float:
        try:
            return float(dp_accounting.calibrate_dp_mechanism(
                make, lambda z: _event(q, z, rounds), target_epsilon, delta,
                dp_accounting.ExplicitBracketInterval(lo, hi), tol=1e-4))
        except (ValueError, NoBracketIntervalFoundError) as exc:
            raise ConfigError(f"privacy.target_epsilon {target_epsilon:g}: no noise multiplier found ({exc})") from None

    z = search(lambda: _accountant("rdp"), low, high)
    if kind == "rdp":
        return z
    lo = z / 4
    while lo > 0.05 and _eps_or_inf(q, lo, rounds, delta, "pld") <= target_epsilon:
        lo /= 2  # rare: the PLD's answer is below a quarter of the RDP's
    return search(lambda: _accountant("pld"), lo, z * 1.001)


def noise_multiplier(cfg) -> float:
    """``privacy.noise_multiplier``, or the one calibrated to ``privacy.target_epsilon`` over the whole run
    (deterministic: server and clients compute the same number from the config alone)."""
    p = cfg.privacy
    if p.noise_multiplier is not None:
        return float(p.noise_multiplier)
    return calibrate(accounted_rate(cfg), cfg.rounds, float(p.target_epsilon), target_delta(cfg), p.accountant)


NOT_PRIVATE = ("NOT PRIVATE: privacy.reproducible derives the cohort and every noise draw from the run's seed, "
               "which is in the config; anyone holding it can replay and subtract the noise")


def describe(cfg) -> dict:
    """What a run records about its guarantee (``method.json``, ``summary.json``)."""
    z = noise_multiplier(cfg)
    return {"mode": cfg.privacy.mode, "unit": "client", "private": is_private(cfg),
            "randomness": NOT_PRIVATE if cfg.privacy.reproducible else
            "operating-system entropy (keys kept by the server and by each client, never sent)",
            "clip": cfg.privacy.clip, "noise_multiplier": z,
            "adaptive_clip": {"quantile": cfg.privacy.clip_quantile, "lr": cfg.privacy.clip_lr, "max": cfg.privacy.clip_max,
                              "count_noise": count_noise(cfg), "count_sensitivity": 0.5,
                              "update_noise_multiplier": update_noise_multiplier(cfg)}
            if adaptive(cfg) else None,
            "sampling": "poisson", "sampling_rate": sampling_rate(cfg), "delta": target_delta(cfg),
            "accountant": cfg.privacy.accountant, "target_epsilon": cfg.privacy.target_epsilon,
            "accounted_rate": accounted_rate(cfg),
            "epsilon_after_all_rounds": run_epsilon(cfg, cfg.rounds),
            "released_unprotected": ["the number of clients sampled and that replied each round",
                                     "bytes per round (they depend on the cohort's size and, with entropy coding, "
                                     "on the updates)", "timings"]}


def describe_records(cfg) -> dict:
    """What a run records about record-level DP-SGD (``method.json``, ``summary.json``)."""
    rec = cfg.privacy.records
    return {"unit": "record", "noise_multiplier": rec.noise_multiplier, "clip": rec.clip, "private": is_private(cfg),
            "delta": rec.delta if rec.delta is not None else "min(1e-5, 0.01 / the client's example count)",
            "randomness": NOT_PRIVATE if cfg.privacy.reproducible else
            "each client's own key (operating-system entropy, never sent)"}


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


def adaptive(cfg) -> bool:
    return cfg.privacy.clip_quantile is not None


def count_noise(cfg) -> float:
    """Std of the noise on the count of unclipped updates: ``privacy.clip_count_noise``, else the expected
    cohort / 20 (Andrew et al. 2021's suggestion)."""
    p = cfg.privacy
    return p.clip_count_noise if p.clip_count_noise is not None else sampling_rate(cfg) * cfg.num_clients / 20


def update_noise_multiplier(cfg) -> float:
    """The noise multiplier of the update itself. With adaptive clipping part of the privacy budget goes to
    the count. The count sums centred bits b - 1/2 (sensitivity 1/2), so its noise sigma_b is a multiplier of
    2 sigma_b, and the two Gaussian mechanisms compose like one with z = (z_u^-2 + (2 sigma_b)^-2)^-1/2
    (Andrew et al. 2021, Thm. 1): z_u is what is left of the accounted z."""
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
        b = (sum_k (1[||Delta_k|| <= C] - 1/2) + N(0, sigma_b^2)) / (q N) + 1/2
        C <- C * exp(-clip_lr * (b - quantile))
    The bits are centred, so one client moves the sum by at most 1/2: the sensitivity the budget split in
    :func:`update_noise_multiplier` assumes (as in TF-Privacy's quantile estimator).
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

    def noised_count(self, below_bits: list, rnd: int, randomness: Randomness) -> float:
        """The released count: the centred bits' sum plus its noise (anything but True counts as above)."""
        g = randomness.generator(rnd, -1, COUNT_NOISE)
        noise = float(torch.randn((), generator=g, dtype=torch.float64)) * count_noise(self.cfg)
        return sum(0.5 if b is True else -0.5 for b in below_bits) + noise

    def after_round(self, below_bits: list, rnd: int, randomness: Randomness) -> dict:
        """``below_bits``: each reply's ``dp_below``."""
        if not adaptive(self.cfg):
            return {}
        p, used = self.cfg.privacy, self.value
        share = self.noised_count(below_bits, rnd, randomness) / (sampling_rate(self.cfg) * self.cfg.num_clients) + 0.5
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


def private_update(cfg, update: dict[str, torch.Tensor], client, received_meta: dict | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    """A client's side: its update clipped to the round's bound (``client_bound`` of the server's message meta),
    with its own noise in local mode, and the reply meta DP adds: with adaptive clipping, whether the update was
    within the bound before clipping (``dp_below``: the bit the server's noised count sums; only the client
    knows it). ``client``: the :class:`~fedzip.methods.base.ClientContext` (its id, round and key store)."""
    bound = client_bound(cfg, received_meta or {})
    clipped, norm = clip(update, bound)
    if cfg.privacy.mode == "local":
        std = noise_multiplier(cfg) * bound
        noise = gaussian(clipped, std, client_randomness(cfg, client).generator(client.round, client.cid, NOISE))
        clipped = {n: t + noise[n] for n, t in clipped.items()}
    return clipped, ({"dp_below": norm <= bound} if adaptive(cfg) else {})


def private_mean(cfg, updates: list[dict[str, torch.Tensor]], like: dict[str, torch.Tensor], rnd: int,
                 randomness: Randomness, clip_bound: ClipBound | None = None, reply_metas: list[dict] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """The server's side: every update clipped to the bound (again), summed, noised in central mode, and
    divided by the expected cohort q N; ``clip_bound`` (adaptive clipping) then moves for the next round.
    ``like``: the names, shapes and dtypes of an update, so that a round with no update still adds the noise.
    Returns the mean and the round's numbers (noised ones for ``metrics.jsonl``, the others server-private:
    :data:`UNPROTECTED_ROW_KEYS`)."""
    bound = clip_bound.value if clip_bound is not None else float(cfg.privacy.clip)
    m = sampling_rate(cfg) * cfg.num_clients
    if cfg.privacy.mode == "local":  # the noise is in the updates: clipping it again would bias the average
        clipped, norms = updates, [l2_norm(u) for u in updates]
    else:
        pairs = [clip(u, bound) for u in updates]
        clipped, norms = [p[0] for p in pairs], [p[1] for p in pairs]
    total = {n: sum((u[n] for u in clipped), torch.zeros_like(t)) for n, t in like.items()}
    if cfg.privacy.mode == "central":
        noise = gaussian(total, update_noise_multiplier(cfg) * bound, randomness.generator(rnd, -1, NOISE))
        total = {n: t + noise[n] for n, t in total.items()}
    stats = {"dp_clipped_share": float(np.mean([n > bound for n in norms])) if norms else 0.0,
             "dp_update_norm": float(np.median(norms)) if norms else 0.0}
    if clip_bound is not None:
        stats |= clip_bound.after_round([m.get("dp_below") for m in reply_metas or []], rnd, randomness)
    return {n: t / m for n, t in total.items()}, stats


def released_reply_meta(cfg, meta: dict) -> dict:
    """A reply's meta as it may leave a client. Where the guarantee holds against the server (local mode,
    record-level DP-SGD), the training loss, computed from the client's data without noise, stays home."""
    if cfg.privacy.mode == "local" or cfg.privacy.records.noise_multiplier is not None:
        return {k: v for k, v in meta.items() if k != "train_loss"}
    return meta


# -- record level (DP-SGD on each client, Opacus) ----------------------------------------------------------
@dataclass(frozen=True)
class DPSGD:
    """What a client's DP-SGD steps need: ``privacy.records`` and a seed for its Poisson batches and its
    noise, from the client's own key (or, under ``privacy.reproducible``, the run's seed)."""

    noise_multiplier: float
    clip: float
    seed: int


def records(cfg, client) -> DPSGD | None:
    """Record-level DP-SGD for ``client`` when ``privacy.records`` is on, else None (what ``train_locally`` takes)."""
    rec = cfg.privacy.records
    if rec.noise_multiplier is None:
        return None
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise ConfigError("privacy.records needs Opacus: pip install 'fedzip[dp]'") from None
    return DPSGD(rec.noise_multiplier, rec.clip, client_randomness(cfg, client).int_seed(client.round, client.cid, DP_SGD))


def record_delta(cfg, num_examples: int) -> float:
    rec = cfg.privacy.records
    return rec.delta if rec.delta is not None else default_delta(num_examples)


def record_epsilon(cfg, num_examples: int, steps: int, rnd: int) -> float:
    """A client's record-level epsilon after round ``rnd``, by Opacus's RDP accountant, bounded as if it had
    trained in every round so far (``steps`` DP-SGD steps at rate batch_size / n each time): the client keeps
    no count of its rounds, and the server's sampling gives no amplification against the server."""
    from opacus.accountants import RDPAccountant

    rec = cfg.privacy.records
    accountant = RDPAccountant()
    accountant.history = [(rec.noise_multiplier, min(1.0, cfg.train.batch_size / num_examples), steps * rnd)]
    return float(accountant.get_epsilon(record_delta(cfg, num_examples)))


def record_meta(cfg, num_examples: int, steps: int, rnd: int) -> dict:
    """What a reply says about its client's record-level guarantee (nothing when DP-SGD is off)."""
    return {"record_epsilon": record_epsilon(cfg, num_examples, steps, rnd)} \
        if cfg.privacy.records.noise_multiplier is not None else {}
