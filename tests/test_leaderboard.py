"""Compact run results and the leaderboard built from them: seeds paired with the reference, error bars."""

import json

import pytest
import torch

from fedzip.config import load_config
from fedzip.engine import run_experiment
from fedzip.report.compact import compact_run, load_compact, seedless_label
from fedzip.report.leaderboard import build_leaderboard, leaderboard_markdown, mean_std
from fedzip.report.targets import fixed_subset_curve, smoothed
from fedzip.wire import Message, encode


def _curve(values, bytes_per_round=100):
    return [{"round": 5 * (i + 1), "bytes_up": bytes_per_round, "bytes_down": 2 * bytes_per_round,
             "accuracy": v, "eval_examples": 50} for i, v in enumerate(values)]


def _record(label, seed, values, bytes_per_round=100):
    curve = []
    for point in _curve(values, bytes_per_round):  # rounds without evaluation in between
        curve += [{"round": point["round"] - k, "bytes_up": bytes_per_round, "bytes_down": 2 * bytes_per_round}
                  for k in (4, 3, 2, 1)] + [point]
    seconds = [10.0 * (i + 1) for i in range(len(curve))]
    return {"label": label, "method": label, "seed": seed, "curve": curve, "link_seconds": {"3g": seconds},
            "final_metrics": {"accuracy": values[-1]}, "bytes_up_total": 5 * bytes_per_round * len(values),
            "bytes_down_total": 10 * bytes_per_round * len(values), "wall_seconds": 1.0, "machine": "m",
            "client_step_s": 0.5, "client_peak_rss_bytes": 3e8, "client_cuda_peak_bytes": None}


def test_each_seed_is_judged_against_the_reference_of_the_same_seed():
    ref = [_record("fedit", 0, [0.2, 0.5, 0.6, 0.6, 0.6]), _record("fedit", 1, [0.1, 0.3, 0.4, 0.4, 0.4])]
    # half the bytes a round; seed 0 reaches 0.59 (its FedIT's target), seed 1 only 0.35 (<0.39): not reached
    cheap = [_record("cheap", 0, [0.2, 0.5, 0.59, 0.59, 0.59], 50), _record("cheap", 1, [0.1, 0.3, 0.35, 0.35, 0.35], 50)]
    board = build_leaderboard(ref + cheap, reference="fedit")
    fedit, row = board["rows"]
    assert fedit["label"] == "fedit" and fedit["reached"] == "2/2"
    assert fedit["bytes_ratio_vs_reference"]["mean"] == pytest.approx(1.0)
    assert row["reached"] == "1/2" and row["per_seed"][1]["round_to_target"] is None
    # seed 0: FedIT's smoothed final 0.6 -> target 0.59; smoothed cheap reaches it at round 25
    target = smoothed(fixed_subset_curve(ref[0]["curve"], "accuracy"))[-1][1] - 0.01
    assert row["per_seed"][0]["target"] == pytest.approx(target)
    reached = row["per_seed"][0]["round_to_target"]
    assert reached == 25 and row["mb_up_to_target"]["mean"] == pytest.approx(25 * 50 / 1e6)
    fedit_reached = fedit["per_seed"][0]["round_to_target"]
    assert row["bytes_ratio_vs_reference"]["mean"] == pytest.approx(fedit_reached * 300 / (reached * 150))
    assert row["per_seed"][0]["bytes_ratio"] == row["bytes_ratio_vs_reference"]["mean"]
    assert row["per_seed"][1]["bytes_ratio"] is None
    assert row["hours_to_target"]["3g"]["mean"] == pytest.approx(10.0 * reached / 3600)
    assert row["final_accuracy"] == mean_std([0.59, 0.35]) and row["final_accuracy"]["std"] > 0.1
    table = "\n".join(leaderboard_markdown(board))
    assert "| cheap | 2 |" in table and "1/2" in table and "h to target (3g)" in table
    assert "Warnings" not in table
    cheap[1]["warnings"] = ["round 3: the autoencoder failed its quality gate"]
    table = "\n".join(leaderboard_markdown(build_leaderboard(ref + cheap, reference="fedit")))
    assert "- **cheap** seed 1, round 3: the autoencoder failed its quality gate" in table


def test_a_leaderboard_needs_its_reference():
    with pytest.raises(ValueError, match="reference 'fedit'"):
        build_leaderboard([_record("cheap", 0, [0.2, 0.3])], reference="fedit")


def test_a_finished_run_becomes_a_compact_result_and_a_board(tmp_path, tiny_cfg):
    records = []
    for method in ("fedit", "ffa_lora"):
        for seed in (0, 1):
            out = tmp_path / f"{method}-s{seed}"
            run_experiment(load_config(None, [*tiny_cfg, f"method={method}", f"seed={seed}"]), out, progress=False)
            path = tmp_path / f"{method}-s{seed}.json"
            path.write_text(json.dumps(compact_run(out)))
            records.append(load_compact(path))
    rec = records[0]
    assert rec["label"] == seedless_label("fedit-s0") == "fedit" and rec["seed"] == 0
    metrics = [json.loads(x) for x in (tmp_path / "fedit-s0" / "metrics.jsonl").read_text().splitlines()]
    assert [p["bytes_up"] for p in rec["curve"]] == [m["bytes_up"] for m in metrics]
    assert rec["bytes_up_total"] == sum(m["bytes_up"] for m in metrics) and rec["config"]["seed"] == 0
    ledger = tmp_path / "fedit-s0" / "ledger.jsonl"  # the bytes are of the format the result names
    assert rec["wire_format"] == "FZP2" and b"FZP2" == encode(Message({"x": torch.zeros(1)}))[:4]
    ledger_bytes = sum(json.loads(x)["bytes"] for x in ledger.read_text().splitlines())
    assert ledger_bytes == rec["bytes_up_total"] + rec["bytes_down_total"]
    assert set(rec["link_seconds"]) == {"3g", "4g", "home", "datacenter"}
    assert rec["link_seconds"]["3g"][-1] > rec["link_seconds"]["datacenter"][-1] > 0
    assert rec["client_step_s"] > 0 and len(json.dumps(rec)) < 20_000  # small enough to commit per run
    board = build_leaderboard(records, reference="fedit")
    assert [r["label"] for r in board["rows"]] == ["fedit", "ffa_lora"]
    assert all(r["seeds"] == [0, 1] for r in board["rows"])
    # FFA-LoRA sends B only: fewer bytes up than FedIT in every seed
    assert board["rows"][1]["mb_up_total"]["mean"] < board["rows"][0]["mb_up_total"]["mean"]
    # the same board from the run directories, on the command line
    from fedzip.cli import main

    dirs = [str(tmp_path / f"{m}-s{s}") for m in ("fedit", "ffa_lora") for s in (0, 1)]
    assert main(["report", *dirs, "--leaderboard", "--reference", dirs[0], "--out", str(tmp_path / "lb")]) == 0
    cli_board = json.loads((tmp_path / "lb" / "leaderboard.json").read_text())
    assert cli_board["rows"] == json.loads(json.dumps(board["rows"]))
    assert "| ffa_lora | 2 |" in (tmp_path / "lb" / "leaderboard.md").read_text()
    assert main(["report", *dirs[2:], "--leaderboard", "--reference", dirs[0]]) == 2  # reference not among them
    assert main(["report", *dirs, "--leaderboard"]) == 2


def test_compact_result_of_an_unfinished_run_is_one_error(tmp_path):
    from fedzip.errors import RunDirError

    with pytest.raises(RunDirError, match="not a finished run"):
        compact_run(tmp_path)


def test_a_compact_result_says_what_produced_it_and_a_board_that_mixes_wire_formats_says_so(tmp_path, tiny_cfg):
    import subprocess

    run_experiment(load_config("quickstart", tiny_cfg + ["rounds=1"]), tmp_path / "run-s0", progress=False)
    record = compact_run(tmp_path / "run-s0")
    assert record["wire_format"] == "FZP2"
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head:  # a checkout: the commit, marked +dirty when the tree had changes
        assert record["code_commit"].split("+")[0] == head
    same = [_record("fedit", 0, [0.2, 0.5, 0.6]) | {"wire_format": "FZP2"},
            _record("cheap", 0, [0.2, 0.5, 0.6], 50) | {"wire_format": "FZP2", "code_commit": "abc"}]
    assert not any("mix wire formats" in line for line in leaderboard_markdown(build_leaderboard(same, "fedit")))
    mixed = [same[0], same[1] | {"wire_format": "FZP1"}]
    text = "\n".join(leaderboard_markdown(build_leaderboard(mixed, "fedit")))
    assert "mix wire formats" in text and "1 run(s) FZP1" in text and "1 run(s) FZP2" in text
    assert "not recorded" in text and "`abc`" in text
