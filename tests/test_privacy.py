"""Client-level differential privacy: the accountant, the clipping bound, the noise scale, the refusals."""

import json

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from helpers import adapter_tensors, assert_same_adapter

from fedzip import privacy
from fedzip.config import load_config
from fedzip.engine import run_experiment
from fedzip.engine.client import run_client
from fedzip.engine.runtime import build_runtime
from fedzip.engine.state import ClientStateStore
from fedzip.errors import ConfigError
from fedzip.methods import METHODS
from fedzip.methods.base import ClientContext
from fedzip.rundir import RunDir
from fedzip.wire import decode, encode

DP = ["privacy.mode=central", "privacy.clip=0.05", "privacy.noise_multiplier=1.0", "num_clients=8",
      "clients_per_round=4", "rounds=3"]
SEEDED = ["privacy.reproducible=true"]  # research mode, not private: runs that repeat bit for bit


def test_a_runs_epsilon_is_dp_accountings_for_the_same_schedule(tmp_path, tiny_cfg):
    summary = run_experiment(load_config("quickstart", tiny_cfg + DP), tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    accountant = rdp.RdpAccountant()  # composed round by round here, as one self-composed event by fedzip
    for row in rows:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(4 / 8, dp_accounting.GaussianDpEvent(1.0)))
        assert row["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)  # default delta: 1e-5 here
    assert rows[0]["epsilon"] < rows[-1]["epsilon"]
    assert summary["privacy"]["epsilon"] == rows[-1]["epsilon"]
    assert summary["privacy"] | {"sampling": "poisson", "clip": 0.05, "delta": 1e-5, "private": True} == summary["privacy"]


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
    keyed = privacy.Randomness(bytes(range(32)))
    sizes = [len(keyed.cohort(rnd, 200, 0.05)) for rnd in range(1, 401)]
    assert len(set(sizes)) > 5 and abs(np.mean(sizes) - 10) < 0.6
    assert keyed.cohort(7, 200, 0.05) == keyed.cohort(7, 200, 0.05)  # the same key: the same cohort (resume)


def round_replies(cfg, store_dir):
    """One round by hand: the server's messages, each sampled client's encoded reply, decoded on the server."""
    cls = METHODS[cfg.method]
    server = cls(cfg, build_runtime(cfg, cls))
    server.init_global()
    client = cls(cfg, server.rt)
    cids = privacy.Randomness(None, cfg.seed).cohort(1, cfg.num_clients, privacy.sampling_rate(cfg)) or [0]
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
def test_noise_has_the_configured_scale(tmp_path, tiny_cfg, mode, expected_std):
    cfg = load_config("quickstart", tiny_cfg + ["privacy.mode=" + mode, "privacy.clip=0.2",
                                                "privacy.noise_multiplier=1.5", "num_clients=8", "clients_per_round=4"])
    zero = {"w": torch.zeros(200_000)}
    randomness = privacy.Randomness.fresh(cfg)
    client = ClientContext(cid=3, round=1, indices=np.arange(4), store=ClientStateStore(tmp_path), seed=0)

    def draw():
        if mode == "central":  # server noise on the sum, divided by the expected cohort (4)
            return privacy.private_mean(cfg, [zero, zero, zero], zero, 1, randomness)[0]["w"]
        return privacy.private_update(cfg, zero, client)[0]["w"]  # a client's own noise on its clipped update

    sample = draw()
    # 200k draws from fresh keys: the sample std's standard error is 0.16%, the mean's std / 447; six of each
    assert float(sample.std()) == pytest.approx(expected_std, rel=1e-2)
    assert abs(float(sample.mean())) < 6 * expected_std / 200_000 ** 0.5
    assert torch.equal(draw(), sample)  # keyed by (key, round, who): a resumed run draws the same noise


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


def fixed_keys(monkeypatch, *keys):
    """Randomness.fresh hands out these keys in turn: runs that would otherwise each draw their own."""
    it = iter(keys)
    monkeypatch.setattr(privacy.Randomness, "fresh", classmethod(lambda cls, cfg: cls(next(it), cfg.seed)))


def test_a_private_run_resumes_to_the_same_adapter(tmp_path, tiny_cfg, monkeypatch):
    """The resumed part draws with the key the checkpoint kept, not a new one: the same noise as unbroken."""
    cfg = load_config("quickstart", tiny_cfg + DP)
    key, other = bytes(range(32)), bytes(range(1, 33))
    fixed_keys(monkeypatch, key, key, other, other)  # a resume that minted a key would get `other`
    run_experiment(cfg, tmp_path / "whole", progress=False)
    assert run_experiment(cfg, tmp_path / "split", progress=False, stop_after=1)["interrupted_after"] == 1
    run_experiment(cfg, tmp_path / "split", resume=True, progress=False)
    assert_same_adapter(tmp_path / "whole", tmp_path / "split")


def released_rows(run_dir):
    return RunDir(run_dir).rows()


def server_rows(run_dir):
    """metrics.jsonl with what the server kept to itself (server_private.jsonl) merged back in, round by round."""
    return RunDir(run_dir).server_rows()


@pytest.mark.parametrize("mode", ["central", "local", "records"])
def test_the_noise_and_the_cohort_cannot_be_derived_from_the_config(tmp_path, tiny_cfg, mode):
    """Two private runs of one config (seed included) draw different cohorts and noise: whoever holds the config
    cannot replay them. Under privacy.reproducible they repeat, and the run says it is not private."""
    dp = ["privacy.records.noise_multiplier=1.0", "privacy.records.clip=0.5"] if mode == "records" else \
        DP + [f"privacy.mode={mode}"]
    overrides = tiny_cfg + dp + ["rounds=2", "num_clients=16", "clients_per_round=8"]
    runs = [run_experiment(load_config("quickstart", overrides), tmp_path / f"p{i}", progress=False) for i in (0, 1)]
    a, b = (adapter_tensors(tmp_path / f"p{i}") for i in (0, 1))
    assert any(not torch.equal(a[n], b[n]) for n in a)
    described = "record_privacy" if mode == "records" else "privacy"
    assert all(r[described]["private"] for r in runs)
    if mode != "records":  # record-level DP does not sample clients by Poisson: its cohort is not a secret
        cohorts = [[r["clients"] for r in server_rows(tmp_path / f"p{i}")] for i in (0, 1)]
        assert cohorts[0] != cohorts[1]

    seeded = [run_experiment(load_config("quickstart", overrides + SEEDED), tmp_path / f"s{i}", progress=False)
              for i in (0, 1)]
    assert_same_adapter(tmp_path / "s0", tmp_path / "s1")
    for run, name in zip(seeded, ("s0", "s1")):
        assert run[described]["private"] is False and "NOT PRIVATE" in run["warnings"][0]
        assert json.loads((tmp_path / name / "method.json").read_text())[described]["private"] is False
    from fedzip.report import write_report

    assert "NOT PRIVATE" in write_report([tmp_path / "s0"], tmp_path / "s0").read_text()
    assert "NOT PRIVATE" not in write_report([tmp_path / "p0"], tmp_path / "p0").read_text()


def test_dp_sgd_trains_a_causal_lm_on_per_example_losses(tmp_path, cache_dir):
    overrides = ["model.name=tiny-llama", f"model.cache_dir={cache_dir}", "data.source=alpaca", "data.max_length=48",
                 "data.max_test_examples=16", "num_clients=2", "clients_per_round=2", "partition.scheme=iid",
                 "lora.rank=4", "lora.alpha=8", "train.threads=1", "rounds=1", "train.max_steps=2",
                 "train.batch_size=4", "privacy.records.noise_multiplier=1.0", "eval.batch_size=16"]
    summary = run_experiment(load_config(None, overrides), tmp_path / "run", progress=False)
    assert summary["rounds_completed"] == 1 and summary["record_privacy"]["private"]
    for row in server_rows(tmp_path / "run"):
        assert row["client_steps"] == 2 * 2
        assert row["train_loss"] is None  # computed from the records without noise: it stays on the client


def test_a_private_run_releases_no_cohort_and_no_unnoised_statistic(tmp_path, tiny_cfg):
    run_experiment(load_config("quickstart", tiny_cfg + DP + ["privacy.clip_quantile=0.5", "privacy.clip_count_noise=2",
                                                              "eval.personal_clients=2", "eval.personal_examples=8"]),
                   tmp_path / "run", progress=False)
    for row in released_rows(tmp_path / "run"):
        assert not set(row) & set(privacy.UNPROTECTED_ROW_KEYS), row
        assert not [k for k in row if k.startswith("personal_")], row  # clients' scores on their own data
        assert {"cohort_size", "replied", "epsilon", "dp_clip", "dp_unclipped_share_noised"} <= set(row)
    kept = server_rows(tmp_path / "run")
    assert all("clients" in r and "dp_update_norm" in r and "train_loss" in r and "personal_accuracy" in r for r in kept)
    for private in ("server_private.jsonl", "ledger.jsonl", "checkpoints/state.json"):  # the operator's alone
        assert (tmp_path / "run" / private).stat().st_mode & 0o077 == 0, private
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "clients" not in json.dumps(summary["final_metrics"])


def test_a_round_with_an_empty_cohort_still_releases_noise(tmp_path, tiny_cfg):
    """No client sampled (or none replied): the model still moves by the noise, so that it does not tell."""
    cfg = load_config("quickstart", tiny_cfg + DP + ["privacy.noise_multiplier=1.0"])
    cls = METHODS[cfg.method]
    server = cls(cfg, build_runtime(cfg, cls))
    server.init_global()
    before = {n: t.clone() for n, t in server.global_tensors().items()}
    server.aggregate(1, {})
    moved = privacy.l2_norm({n: server.global_tensors()[n] - before[n] for n in before})
    d = sum(t.numel() for t in before.values())  # the noise's expected norm: z C sqrt(d) / (q N)
    assert moved == pytest.approx(1.0 * 0.05 * d ** 0.5 / 4, rel=0.05)


def test_the_engine_noises_a_round_in_which_no_client_was_sampled(tmp_path, tiny_cfg, monkeypatch):
    monkeypatch.setattr(privacy.Randomness, "cohort", lambda self, rnd, n, q: [])
    run_experiment(load_config("quickstart", tiny_cfg + DP + ["rounds=1"]), tmp_path / "run", progress=False)
    row = released_rows(tmp_path / "run")[0]
    assert row["cohort_size"] == 0 and row["bytes_up"] == 0
    lora_b = {n: t for n, t in adapter_tensors(tmp_path / "run").items() if "lora_B" in n}
    assert lora_b and all(float(t.abs().max()) > 0 for t in lora_b.values())  # B starts at 0: only noise moved it


RECORDS = ["privacy.records.noise_multiplier=1.1", "privacy.records.clip=0.5", "rounds=2", "train.max_steps=4",
           "train.batch_size=8"]


def test_record_level_dp_sgd_reports_each_clients_epsilon_from_opacus(tmp_path, tiny_cfg):
    from opacus.accountants import RDPAccountant

    summary = run_experiment(load_config("quickstart", tiny_cfg + RECORDS), tmp_path / "run", progress=False)
    assert summary["rounds_completed"] == 2
    rows = server_rows(tmp_path / "run")
    for row in rows:
        for cid, eps in row["client_record_epsilon"].items():
            n = row["client_examples"][cid]
            accountant = RDPAccountant()  # 4 steps a round at rate 8 / n, every round so far, delta min(1e-5, 0.01 / n)
            accountant.history = [(1.1, 8 / n, 4 * row["round"])]
            assert eps == pytest.approx(accountant.get_epsilon(min(1e-5, 0.01 / n)), rel=1e-9)
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
def test_adaptive_clipping_moves_the_bound_towards_the_quantile(tmp_path, tiny_cfg, start, direction, monkeypatch):
    """A bound far below every update norm grows each round, one far above shrinks; clients clip to the bound
    the server sent, and a resumed run ends where an uninterrupted one does."""
    overrides = tiny_cfg + DP + ["rounds=4", f"privacy.clip={start}", "privacy.clip_quantile=0.5",
                                 "privacy.clip_lr=1.0", "privacy.noise_multiplier=0.3"]
    cfg = load_config("quickstart", overrides)
    fixed_keys(monkeypatch, bytes(range(32)), bytes(range(32)), bytes(32), bytes(32))
    run_experiment(cfg, tmp_path / "whole", progress=False)
    rows = released_rows(tmp_path / "whole")
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
    bound, randomness = privacy.ClipBound(cfg), privacy.Randomness.fresh(cfg)
    cohort = [False] * cfg.clients_per_round
    for rnd in range(1, 6):
        bound.after_round(cohort, rnd, randomness)
        assert bound.value <= 0.6
    assert bound.value == 0.6
    for rnd in range(6, 9):
        before = bound.value
        bound.after_round([True] * cfg.clients_per_round, rnd, randomness)
        assert bound.value < before
    uncapped = privacy.ClipBound(load_config("quickstart", tiny_cfg + DP + [
        "privacy.clip=0.5", "privacy.clip_quantile=0.5", "privacy.clip_lr=1.0"]))
    for rnd in range(1, 6):
        uncapped.after_round(cohort, rnd, randomness)
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


def test_adaptive_clipping_spends_no_more_epsilon_than_it_reports(tiny_cfg):
    """Epsilon recomputed from what one client can change in what the server releases: the update sum (by at
    most C, under noise measured here) and the noised count (by what adding one client to a cohort moves it,
    under its measured noise). Together they are one Gaussian mechanism with z = (sum_i (sens_i / std_i)^2)^-1/2
    per unit, which dp-accounting composes; the reported epsilon must not be below it."""
    cfg = load_config("quickstart", tiny_cfg + ["privacy.mode=central", "privacy.clip=0.5", "privacy.target_epsilon=8",
                                                "privacy.clip_quantile=0.5", "num_clients=500", "clients_per_round=20",
                                                "rounds=60", "privacy.delta=0.002"])
    randomness = privacy.Randomness(bytes(range(32)))
    bound = privacy.ClipBound(cfg)
    cohort = [True, False, True, True]
    released = bound.noised_count(cohort, 1, randomness)
    count_sensitivity = max(abs(bound.noised_count(cohort + [bit], 1, randomness) - released) for bit in (True, False))
    count_std = float(np.std([bound.noised_count([], r, randomness) for r in range(1, 20001)]))
    zero = {"w": torch.zeros(400_000)}
    m = 20  # the expected cohort: the mean's fixed denominator
    update_std = float(privacy.private_mean(cfg, [], zero, 1, randomness, privacy.ClipBound(cfg))[0]["w"].std()) * m
    z = ((0.5 / update_std) ** 2 + (count_sensitivity / count_std) ** 2) ** -0.5  # sensitivity C = 0.5
    event = dp_accounting.PoissonSampledDpEvent(20 / 500, dp_accounting.GaussianDpEvent(z))
    recomputed = rdp.RdpAccountant().compose(event, 60).get_epsilon(0.002)
    assert recomputed <= privacy.run_epsilon(cfg, 60) * 1.03  # measured stds: ~1% error each


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_a_target_epsilon_calibrates_with_either_accountant_and_an_unreachable_one_is_one_line(tiny_cfg, kind, monkeypatch):
    cfg = load_config("quickstart", tiny_cfg + ["privacy.mode=central", "privacy.target_epsilon=2", "rounds=30",
                                                "num_clients=200", "clients_per_round=10", f"privacy.accountant={kind}"])
    kinds, tried = [], []  # each accountant made, then the noise multiplier of the event it composes
    real_accountant, real_event = privacy._accountant, privacy._event
    monkeypatch.setattr(privacy, "_accountant", lambda k: kinds.append(k) or real_accountant(k))
    monkeypatch.setattr(privacy, "_event", lambda q, z, rounds: tried.append((kinds[-1], z)) or real_event(q, z, rounds))
    privacy.calibrate.cache_clear()
    z = privacy.noise_multiplier(cfg)
    assert privacy.run_epsilon(cfg, 30) <= 2.0 < privacy.epsilon(0.05, z * 0.99, 30, privacy.target_delta(cfg), kind)
    if kind == "pld":  # never near the z at which a PLD needs gigabytes (z = 1e-3: 38 GiB)
        assert min(v for k, v in tried if k == "pld") > z / 8
    unreachable = ["privacy.mode=central", "privacy.target_epsilon=0.0001", "rounds=1000", "num_clients=4",
                   "clients_per_round=4", f"privacy.accountant={kind}"]
    with pytest.raises(ConfigError, match="unreachable"):
        privacy.noise_multiplier(load_config("quickstart", tiny_cfg + unreachable))


def test_the_default_delta_is_far_below_one_over_the_population(tiny_cfg):
    for n in (8, 500, 10**6):
        cfg = load_config("quickstart", tiny_cfg + ["privacy.mode=central", "privacy.noise_multiplier=1",
                                                    f"num_clients={n}", "clients_per_round=4"])
        assert privacy.target_delta(cfg) <= min(1e-5, 0.01 / n)
    assert privacy.record_delta(cfg, 1000) == 1e-5 and privacy.record_delta(cfg, 10**7) == pytest.approx(1e-9)


def test_a_records_gradient_under_dp_sgd_does_not_depend_on_the_others_in_its_batch(tmp_path, cache_dir):
    """A causal LM's per-example gradient (what Opacus clips) is the gradient of that example's own loss: it is
    the same whether the record trains alone or beside records of other lengths."""
    from opacus import GradSampleModule

    from fedzip.methods.training import per_example_loss

    cfg = load_config(None, ["model.name=tiny-llama", f"model.cache_dir={cache_dir}", "data.source=alpaca",
                             "data.max_length=48", "data.max_test_examples=16", "num_clients=2", "partition.scheme=iid",
                             "clients_per_round=2", "lora.rank=4", "lora.alpha=8", "train.threads=1"])
    cls = METHODS[cfg.method]
    rt = build_runtime(cfg, cls)
    model = GradSampleModule(rt.model)
    train = rt.task.train
    lengths = [len(train.input_ids[i]) for i in range(40)]
    one = int(np.argmin(lengths))
    others = [int(i) for i in np.argsort(lengths)[-2:]]  # the longest: many more tokens than the record

    def grads(indices, loss_of):
        batch = rt.task.collate(train, indices)
        model.zero_grad(set_to_none=True)
        loss_of(batch).backward()
        # Opacus multiplies a mean loss's per-sample gradients by the batch size: each is its own loss's gradient
        return {n: p.grad_sample[0].clone() for n, p in rt.view.params.items() if p.grad_sample is not None}

    def per_example(batch):
        labels = batch.pop("labels")
        return per_example_loss(model(**batch).logits, labels).mean()

    def same(a, b):
        return all(torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-7) for n in a)

    alone, together = grads([one], per_example), grads([one, *others], per_example)
    assert alone and same(alone, together)
    # Hugging Face's loss (the mean over the batch's tokens) is what made the record depend on its neighbours
    hf = lambda batch: model(**batch).loss  # noqa: E731
    assert not same(grads([one], hf), grads([one, *others], hf))
    model._close()
