"""Client-level differential privacy: the accountant, the clipping bound, the noise scale, the refusals."""

import json

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from helpers import assert_same_adapter

from fedzip import privacy
from fedzip.config import load_config
from fedzip.engine import run_experiment
from fedzip.engine.client import run_client
from fedzip.engine.runtime import build_runtime
from fedzip.engine.state import ClientStateStore
from fedzip.errors import ConfigError
from fedzip.methods import METHODS
from fedzip.wire import decode, encode

DP = ["privacy.mode=central", "privacy.clip=0.05", "privacy.noise_multiplier=1.0", "num_clients=8",
      "clients_per_round=4", "rounds=3"]


def test_a_runs_epsilon_is_dp_accountings_for_the_same_schedule(tmp_path, tiny_cfg):
    summary = run_experiment(load_config("quickstart", tiny_cfg + DP), tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    accountant = rdp.RdpAccountant()  # composed round by round here, as one self-composed event by fedzip
    for row in rows:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(4 / 8, dp_accounting.GaussianDpEvent(1.0)))
        assert row["epsilon"] == pytest.approx(accountant.get_epsilon(1 / 8), rel=1e-9)  # delta: 1 / num_clients
    assert rows[0]["epsilon"] < rows[-1]["epsilon"]
    assert summary["privacy"]["epsilon"] == rows[-1]["epsilon"]
    assert summary["privacy"] | {"sampling": "poisson", "clip": 0.05, "delta": 1 / 8} == summary["privacy"]


def test_a_target_epsilon_is_met_by_the_calibrated_noise(tiny_cfg):
    cfg = load_config("quickstart", tiny_cfg + ["privacy.mode=central", "privacy.target_epsilon=3", "rounds=50",
                                                "num_clients=100", "clients_per_round=5", "privacy.delta=1e-4"])
    z = privacy.noise_multiplier(cfg)

    def eps(noise):
        event = dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(noise))
        return rdp.RdpAccountant().compose(event, 50).get_epsilon(1e-4)

    assert 2.97 <= eps(z) <= 3.0 < eps(z * 0.99)  # the smallest noise that meets the target
    assert privacy.describe(cfg)["epsilon_after_all_rounds"] == pytest.approx(eps(z))


def test_poisson_cohorts_vary_in_size_around_the_expected_one():
    sizes = [len(privacy.poisson_cohort(0, rnd, 200, 0.05)) for rnd in range(1, 401)]
    assert len(set(sizes)) > 5 and abs(np.mean(sizes) - 10) < 0.6
    assert privacy.poisson_cohort(0, 7, 200, 0.05) == privacy.poisson_cohort(0, 7, 200, 0.05)


def round_replies(cfg, store_dir):
    """One round by hand: the server's messages, each sampled client's encoded reply, decoded on the server."""
    cls = METHODS[cfg.method]
    server = cls(cfg, build_runtime(cfg, cls))
    server.init_global()
    client = cls(cfg, server.rt)
    cids = privacy.poisson_cohort(cfg.seed, 1, cfg.num_clients, privacy.sampling_rate(cfg)) or [0]
    messages = server.configure(1, cids)
    replies = {}
    for cid in cids:
        up = run_client(client, ClientStateStore(store_dir), 1, cid, encode(messages[cid], server.wire_codec("down"))).up
        replies[cid] = decode(up, server.up_spec(cid, 1))
    return server, messages, replies


def update_norm(method: str, server, message, reply) -> float:
    if method == "flasc":
        return float(reply.tensors["delta"].double().norm())
    if method == "fedit_update":  # the reply is the update itself
        return privacy.l2_norm(reply.tensors)
    return privacy.l2_norm({n: reply.tensors[n] - message.tensors[n] for n in reply.tensors})


@pytest.mark.parametrize("method", ["fedit", "fedit_update", "flasc"])
def test_every_update_is_clipped_even_when_training_explodes(tmp_path, tiny_cfg, method):
    wild = tiny_cfg + DP + [f"method={method.removesuffix('_update')}", "train.lr=1000", "privacy.noise_multiplier=0"]
    if method == "flasc":
        wild.append("method_options={d_dl: 0.5, d_ul: 0.25, server_optimizer: sgd, server_lr: 1.0}")
    if method == "fedit_update":
        wild.append("method_options={upload: update}")
    server, messages, replies = round_replies(load_config("quickstart", wild), tmp_path / "a")
    for cid, reply in replies.items():
        assert update_norm(method, server, messages[cid], reply) <= 0.05 * (1 + 1e-5)
    # the same clients without DP: their updates are far beyond the bound, so the clipping above did work
    free = [x for x in wild if not x.startswith("privacy.")]
    _, messages, replies = round_replies(load_config("quickstart", free), tmp_path / "b")
    assert all(update_norm(method, None, messages[c], r) > 1.0 for c, r in replies.items())


def test_the_server_clips_a_client_that_does_not(tmp_path, tiny_cfg):
    cfg = load_config("quickstart", tiny_cfg + DP + ["privacy.noise_multiplier=0"])
    server, messages, replies = round_replies(cfg, tmp_path)
    before = {n: t.clone() for n, t in server.global_tensors().items()}
    for r in replies.values():  # a dishonest client: an update a million times the bound
        r.tensors = {n: t * 0 + 1e4 for n, t in r.tensors.items()}
    server.aggregate(1, replies)
    moved = privacy.l2_norm({n: server.global_tensors()[n] - before[n] for n in before})
    assert moved <= len(replies) * 0.05 / 4 * (1 + 1e-5)  # each counts at most C, over the expected cohort qN = 4


@pytest.mark.parametrize("mode,expected_std", [("central", 1.5 * 0.2 / 4), ("local", 1.5 * 0.2)])
def test_noise_has_the_configured_scale(tiny_cfg, mode, expected_std):
    cfg = load_config("quickstart", tiny_cfg + ["privacy.mode=" + mode, "privacy.clip=0.2",
                                                "privacy.noise_multiplier=1.5", "num_clients=8", "clients_per_round=4"])
    zero = {"w": torch.zeros(200_000)}
    if mode == "central":  # server noise on the sum, divided by the expected cohort (4)
        mean, _ = privacy.private_mean(cfg, [zero, zero, zero], rnd=1)
        sample = mean["w"]
    else:  # a client's own noise on its clipped update
        sample = privacy.private_update(cfg, zero, rnd=1, cid=3)[0]["w"]
    # with 200k draws the sample std is within 0.5% of the true one (std error 0.16%): a fixed-seed check
    assert float(sample.std()) == pytest.approx(expected_std, rel=5e-3) and abs(float(sample.mean())) < 1e-3
    replay = privacy.private_mean(cfg, [zero, zero, zero], rnd=1)[0]["w"] if mode == "central" else \
        privacy.private_update(cfg, zero, rnd=1, cid=3)[0]["w"]
    assert torch.equal(replay, sample)  # seeded by (seed, round, who): a resumed run draws the same noise


def test_methods_without_a_dp_guarantee_refuse_the_options(tiny_cfg):
    central = ["privacy.mode=central", "privacy.noise_multiplier=1"]
    for method in ("hafl", "cgfedllm", "fedbiot", "centralised"):
        with pytest.raises(ConfigError, match="does not support client-level DP"):
            load_config("quickstart", tiny_cfg + central + [f"method={method}"])
    with pytest.raises(ConfigError, match="local noise does not protect it"):
        load_config("quickstart", tiny_cfg + ["privacy.mode=local", "privacy.noise_multiplier=1", "method=flasc"])
    with pytest.raises(ConfigError, match="exactly one of noise_multiplier and target_epsilon"):
        load_config("quickstart", tiny_cfg + ["privacy.mode=central"])
    with pytest.raises(ConfigError, match="exactly one"):
        load_config("quickstart", tiny_cfg + central + ["privacy.target_epsilon=3"])
    with pytest.raises(ConfigError, match="privacy.clip"):
        load_config("quickstart", tiny_cfg + central + ["privacy.clip=0"])


def test_a_private_run_resumes_to_the_same_adapter(tmp_path, tiny_cfg):
    cfg = load_config("quickstart", tiny_cfg + DP)
    run_experiment(cfg, tmp_path / "whole", progress=False)
    assert run_experiment(cfg, tmp_path / "split", progress=False, stop_after=1)["interrupted_after"] == 1
    run_experiment(cfg, tmp_path / "split", resume=True, progress=False)
    assert_same_adapter(tmp_path / "whole", tmp_path / "split")


RECORDS = ["privacy.records.noise_multiplier=1.1", "privacy.records.clip=0.5", "rounds=2", "train.max_steps=4",
           "train.batch_size=8"]


def test_record_level_dp_sgd_reports_each_clients_epsilon_from_opacus(tmp_path, tiny_cfg):
    from opacus.accountants import RDPAccountant

    summary = run_experiment(load_config("quickstart", tiny_cfg + RECORDS), tmp_path / "run", progress=False)
    assert summary["rounds_completed"] == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for cid, eps in row["client_record_epsilon"].items():
            n = row["client_examples"][cid]
            accountant = RDPAccountant()  # 4 steps a round at rate 8 / n, every round so far, delta 1 / n
            accountant.history = [(1.1, 8 / n, 4 * row["round"])]
            assert eps == pytest.approx(accountant.get_epsilon(1 / n), rel=1e-9)
        assert row["record_epsilon_max"] == max(row["client_record_epsilon"].values())
    assert rows[1]["record_epsilon_max"] > rows[0]["record_epsilon_max"]


def test_dp_sgd_clips_each_examples_gradient_and_leaves_the_model_clean(tmp_path, tiny_cfg):
    """With no noise to speak of, a step moves the weights by at most lr * clip (the mean of clipped
    per-example gradients), however large the raw gradients; afterwards no Opacus hook is left behind."""
    cfg = load_config("quickstart", tiny_cfg + ["privacy.records.noise_multiplier=1e-9", "privacy.records.clip=1e-3",
                                                "train.max_steps=1", "train.optimizer=sgd", "train.momentum=0",
                                                "train.lr=1.0", "train.batch_size=64"])
    cls = METHODS[cfg.method]
    rt = build_runtime(cfg, cls)
    client = cls(cfg, rt)
    start = rt.view.get()
    from fedzip.methods.base import ClientContext
    from fedzip.wire import Message

    reply = client.fit(ClientContext(cid=0, round=1, indices=rt.parts[0], store=ClientStateStore(tmp_path), seed=1),
                       Message(tensors=start, meta={}))
    moved = privacy.l2_norm({n: reply.tensors[n] - start[n] for n in start})
    n, rate = len(rt.parts[0]), min(1.0, 64 / len(rt.parts[0]))
    assert 0 < moved <= 1e-3 * n * rate / 64 * 3  # the sum of at most ~n*rate clipped gradients over the expected batch
    assert not rt.model._forward_hooks and all(not m._forward_hooks for m in rt.model.modules())
    assert all(getattr(p, "grad_sample", None) is None for p in rt.view.params.values())


def test_record_level_dp_is_refused_where_clients_use_data_outside_dp_sgd(tiny_cfg):
    with pytest.raises(ConfigError, match="record-level DP does not hold"):
        load_config("quickstart", tiny_cfg + ["privacy.records.noise_multiplier=1", "method=hafl"])


@pytest.mark.parametrize("start,direction", [(1e-5, 1), (1e5, -1)])
def test_adaptive_clipping_moves_the_bound_towards_the_quantile(tmp_path, tiny_cfg, start, direction):
    """A bound far below every update norm grows each round, one far above shrinks; clients clip to the bound
    the server sent, and a resumed run ends where an uninterrupted one does."""
    overrides = tiny_cfg + DP + ["rounds=4", f"privacy.clip={start}", "privacy.clip_quantile=0.5",
                                 "privacy.clip_lr=1.0", "privacy.noise_multiplier=0.3"]
    cfg = load_config("quickstart", overrides)
    run_experiment(cfg, tmp_path / "whole", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    bounds = [r["dp_clip"] for r in rows if "dp_clip" in r]
    assert bounds[0] == start and len(bounds) >= 2
    assert all(direction * (b - a) > 0 for a, b in zip(bounds, bounds[1:]))
    described = json.loads((tmp_path / "whole" / "method.json").read_text())["privacy"]["adaptive_clip"]
    assert described["update_noise_multiplier"] > 0.3  # the count takes part of the budget: more noise on the update
    run_experiment(cfg, tmp_path / "split", progress=False, stop_after=2)
    run_experiment(cfg, tmp_path / "split", resume=True, progress=False)
    assert_same_adapter(tmp_path / "whole", tmp_path / "split")


def test_clip_max_caps_the_adaptive_bound_and_lets_it_fall(tiny_cfg):
    """Every update above the bound pushes it up, to clip_max and no further; every update below brings it down."""
    cfg = load_config("quickstart", tiny_cfg + DP + ["privacy.clip=0.5", "privacy.clip_quantile=0.5",
                                                     "privacy.clip_lr=1.0", "privacy.clip_max=0.6"])
    bound = privacy.ClipBound(cfg)
    cohort = [False] * cfg.clients_per_round
    for rnd in range(1, 6):
        bound.after_round(cohort, rnd)
        assert bound.value <= 0.6
    assert bound.value == 0.6
    for rnd in range(6, 9):
        before = bound.value
        bound.after_round([True] * cfg.clients_per_round, rnd)
        assert bound.value < before
    uncapped = privacy.ClipBound(load_config("quickstart", tiny_cfg + DP + [
        "privacy.clip=0.5", "privacy.clip_quantile=0.5", "privacy.clip_lr=1.0"]))
    for rnd in range(1, 6):
        uncapped.after_round(cohort, rnd)
    assert uncapped.value > 0.6  # the same rounds without the cap: the bound runs past it
    for bad, match in ((["privacy.clip_max=2"], "give clip_quantile"),
                       (["privacy.clip=1", "privacy.clip_quantile=0.5", "privacy.clip_max=0.5"], "below the starting")):
        with pytest.raises(ConfigError, match=match):
            load_config("quickstart", tiny_cfg + DP + bad)


def test_adaptive_clipping_is_refused_in_local_mode_and_a_bad_bound_in_a_message(tiny_cfg):
    with pytest.raises(ConfigError, match="adaptive clipping needs the server"):
        load_config("quickstart", tiny_cfg + ["privacy.mode=local", "privacy.noise_multiplier=1",
                                              "privacy.clip_quantile=0.5"])
    cfg = load_config("quickstart", tiny_cfg + DP + ["privacy.clip_quantile=0.5"])
    from fedzip.errors import PayloadError

    assert privacy.client_bound(cfg, {"dp_clip": 0.25}) == 0.25
    for bad in ({}, {"dp_clip": -1.0}, {"dp_clip": "big"}):
        with pytest.raises(PayloadError, match="dp_clip"):
            privacy.client_bound(cfg, bad)
