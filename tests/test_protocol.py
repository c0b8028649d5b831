"""Targets, smoothing and the link model that turn a run's curve and ledger into verdicts."""

import json
import math
from pathlib import Path

import pytest
import torch

from fedzip.config import load_config
from fedzip.engine import run_experiment
from fedzip.engine.ledger import read_ledger
from fedzip.report.links import LINKS, Link, cumulative_seconds, round_seconds
from fedzip.report.targets import (
    cumulative_bytes,
    first_reaching,
    fixed_subset_curve,
    reference_target,
    smoothed,
    tail_gain,
)


def test_smoothing_and_target_ignore_a_single_lucky_evaluation():
    curve = [(5, 0.30), (10, 0.50), (15, 0.40), (20, 0.60), (25, 0.50)]
    smooth = smoothed(curve, 2)
    assert [r for r, _ in smooth] == [5, 10, 15, 20, 25]
    assert [v for _, v in smooth] == pytest.approx([0.30, 0.40, 0.45, 0.50, 0.55])
    assert reference_target(curve, window=2) == pytest.approx(0.54)
    # the raw curve touches 0.50 at round 10; smoothed, it gets there at round 20
    assert first_reaching(curve, 0.50, window=2) == 20
    assert first_reaching(curve, 0.90, window=2) is None
    assert first_reaching([(1, 2.0), (2, 1.5), (3, 1.2)], 1.4, window=1, higher_is_better=False) == 3
    assert reference_target([(1, 2.0), (2, 1.5)], window=1, higher_is_better=False) == pytest.approx(1.51)


def test_plateau_gain_over_the_last_fifth_of_rounds():
    rising = [(r, r / 100) for r in range(10, 101, 10)]
    flat = [(r, 0.6) for r in range(10, 101, 10)]
    assert tail_gain(rising, window=1) == pytest.approx(0.2)  # round 80 -> round 100
    assert tail_gain(flat, window=3) == pytest.approx(0.0)


def test_curves_keep_only_the_fixed_evaluation_subset():
    rows = [{"round": 1, "accuracy": 0.2, "eval_examples": 100}, {"round": 2},
            {"round": 3, "accuracy": 0.4, "eval_examples": 100}, {"round": 4, "accuracy": 0.9, "eval_examples": 445}]
    assert fixed_subset_curve(rows, "accuracy") == [(1, 0.2), (3, 0.4)]
    # the last round on the whole split, and on the fixed subset beside it: the curve ends at that round
    rows[-1]["fixed_subset"] = {"accuracy": 0.5, "eval_examples": 100}
    assert fixed_subset_curve(rows, "accuracy") == [(1, 0.2), (3, 0.4), (4, 0.5)]
    assert cumulative_bytes([{"round": 1, "bytes_up": 5, "bytes_down": 7}, {"round": 2, "bytes_up": 1, "bytes_down": 1}],
                            1) == (5, 7)


def test_a_round_lasts_as_long_as_its_slowest_client_plus_the_server():
    link = Link("test", up_mbit_s=1, down_mbit_s=8, rtt_ms=100)
    row = {"round": 1, "clients": [0, 1], "client_compute_s": {"0": 2.0, "1": 0.5},
           "encode_s": 0.1, "decode_s": 0.1, "aggregate_s": 0.3}
    ledger = [{"round": 1, "client": 0, "direction": "down", "bytes": 1_000_000},
              {"round": 1, "client": 0, "direction": "up", "bytes": 125_000},
              {"round": 1, "client": 1, "direction": "down", "bytes": 1_000_000},
              {"round": 1, "client": 1, "direction": "up", "bytes": 1_000_000},
              {"round": 1, "client": 2, "direction": "down", "bytes": 9_000_000, "status": "timeout"}]
    # client 0: 0.05 + 1.0 + 2.0 + 0.05 + 1.0 = 4.1; client 1: 0.05 + 1.0 + 0.5 + 0.05 + 8.0 = 9.6
    assert round_seconds(row, ledger, link) == pytest.approx(9.6 + 0.5)
    # without per-client compute the round's compute is shared evenly
    shared = {"round": 1, "clients": [0, 1], "compute_s": 2.5}
    assert round_seconds(shared, ledger[:2], link) == pytest.approx(0.05 + 1.0 + 1.25 + 0.05 + 1.0)
    assert LINKS["3g"].up_mbit_s < LINKS["4g"].up_mbit_s < LINKS["home"].up_mbit_s < LINKS["datacenter"].up_mbit_s


def test_runs_record_each_clients_compute_and_time_follows_the_ledger(tmp_path, tiny_cfg):
    summary = run_experiment(load_config(None, tiny_cfg), tmp_path / "r", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert sorted(int(c) for c in row["client_compute_s"]) == row["clients"]
        assert sum(row["client_compute_s"].values()) == pytest.approx(row["compute_s"])
        assert row["client_steps"] == 3 * len(row["clients"])  # train.max_steps=3 each
        assert "fixed_subset" not in row  # no eval.max_examples: every evaluation is on the whole test split
        if Path("/proc/self/status").exists():  # Linux: each client's peak resident set while it trained
            peaks = [m["peak_rss_bytes"] for m in row["client_memory"].values()]
            assert len(peaks) == len(row["clients"]) and min(peaks) > 50e6
    ledger = read_ledger(tmp_path / "r" / "ledger.jsonl")
    slow, fast = cumulative_seconds(rows, ledger, LINKS["3g"]), cumulative_seconds(rows, ledger, LINKS["datacenter"])
    assert list(slow) == [1, 2, 3] and slow[3] > fast[3] > 0
    # over 3G, the bytes alone take at least their transfer time at the upload rate
    up_per_round = max(e["bytes"] for e in ledger if e["direction"] == "up")
    assert slow[3] >= 3 * up_per_round * 8 / 1e6 and summary["rounds_completed"] == 3


def test_report_judges_runs_against_a_reference_in_bytes_and_link_time(tmp_path, tiny_cfg, capsys):
    from fedzip.cli import main

    run_experiment(load_config(None, tiny_cfg + ["rounds=4"]), tmp_path / "ref", progress=False)
    run_experiment(load_config(None, tiny_cfg + ["rounds=4", "wire.up=fp16"]), tmp_path / "half", progress=False)
    code = main(["report", str(tmp_path / "ref"), str(tmp_path / "half"), "--reference", str(tmp_path / "ref"),
                 "--links", "3g,datacenter", "--window", "2", "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert code == 0 and "target: accuracy" in out and "round to target" in out
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "h to target (3g)" in html and "target: accuracy" in html
    # the reference always reaches its own target (its smoothed final minus a point) by its last evaluation
    from fedzip.report.report import Comparison, load_run

    ref = load_run(tmp_path / "ref")
    cols = Comparison(ref, [LINKS["3g"], LINKS["datacenter"]], window=2).columns(ref)
    assert cols["round to target"] is not None and cols["round to target"] <= 4
    assert cols["h to target (3g)"] > cols["h to target (datacenter)"] > 0
    assert main(["report", str(tmp_path / "ref"), "--links", "5g"]) == 2
    assert "unknown link '5g'" in capsys.readouterr().err


def test_cosine_schedule_decays_the_client_learning_rate_over_rounds(tiny_cfg):
    from fedzip.methods.training import make_optimizer, round_train_config

    cfg = load_config(None, [*tiny_cfg, "rounds=10", "train.lr=0.4", "train.lr_schedule=cosine",
                             "train.lr_final_ratio=0.1", "train.optimizer=sgd", "train.nesterov=true"])
    lrs = [round_train_config(cfg, r).lr for r in range(1, 11)]
    assert lrs[0] == pytest.approx(0.4) and all(a > b for a, b in zip(lrs, lrs[1:]))
    # halfway through the rounds, halfway between lr and its floor; the last round keeps more than the floor
    assert lrs[5] == pytest.approx(0.04 + 0.36 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert 0.04 < lrs[-1] < 0.05 and cfg.train.lr == 0.4  # the config itself is not changed
    constant = load_config(None, [*tiny_cfg, "rounds=10", "train.lr=0.4"])
    assert round_train_config(constant, 7).lr == 0.4
    opt = make_optimizer({"w": torch.nn.Parameter(torch.zeros(2))}, round_train_config(cfg, 6))
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["lr"] == pytest.approx(lrs[5])


def test_the_last_round_is_also_evaluated_on_the_fixed_subset(tmp_path, tiny_cfg):
    run_experiment(load_config(None, tiny_cfg + ["eval.max_examples=12"]), tmp_path / "r", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["eval_examples"] > 12 and last["fixed_subset"]["eval_examples"] == 12
    assert [rnd for rnd, _ in fixed_subset_curve(rows, "accuracy")] == [1, 2, 3]
    assert fixed_subset_curve(rows, "accuracy")[-1][1] == last["fixed_subset"]["accuracy"]
