"""The benchmark scripts themselves: the GPU suite checked end to end on the CPU with two tiny rounds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_suite_quick_check_runs_resumes_and_its_results_are_never_filed(tmp_path):
    suite = [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py")]
    common = ["run", "--quick", "--cpu", "--only", "fedit", "--seeds", "0", "--parallel", "1", "--work", str(tmp_path / "work")]
    # a budget too short for the first run: it is stopped and packed with its checkpoint
    first = subprocess.run([*suite, *common, "--out", str(tmp_path / "a"), "--budget-s", "25"],
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    packed = tmp_path / "a" / "unfinished.tar.gz"
    if packed.exists():  # round 1 was checkpointed in time (machines differ): it resumes on the "next machine"
        assert "budget spent" in first.stdout
    second = subprocess.run([*suite, *common, "--out", str(tmp_path / "b"), "--budget-s", "300",
                             *(["--resume-from", str(packed)] if packed.exists() else [])],
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout + second.stderr
    results = json.loads((tmp_path / "b" / "gpu_results.json").read_text())
    assert {(r["label"], r["seed"]) for r in results} == {("fedit", 0)}
    assert all(r["quick"] and r["format"] == "fedzip-compact-run/1" and r["rounds"] == 2 for r in results)
    if packed.exists():
        assert "fedit-s0 resumed" in second.stdout
    refused = subprocess.run([*suite, "collect", str(tmp_path / "b")], capture_output=True, text=True)
    assert refused.returncode != 0 and "--quick" in refused.stderr + refused.stdout


def test_the_causal_suites_model_travels_in_two_halves_and_is_joined_only_when_whole(tmp_path, monkeypatch):
    import hashlib

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_suite

    first, second = tmp_path / ".gpu_causal", tmp_path / ".gpu_causal_2"
    monkeypatch.setattr(gpu_suite, "CAUSAL_PREPARED", (first, second))
    monkeypatch.setattr(gpu_suite, "REPO", tmp_path)
    whole = bytes(range(256)) * 1000
    first.mkdir()
    (first / "model.part1").write_bytes(whole[:100_000])
    (first / "model.json").write_text(json.dumps({"file": "m.gguf", "bytes": len(whole),
                                                  "sha256": hashlib.sha256(whole).hexdigest()}))
    with pytest.raises(SystemExit, match="model.part2 missing: the first call carries .gpu_causal, the next"):
        gpu_suite.joined_model()  # the second call's half has not arrived
    second.mkdir()
    (second / "model.part2").write_bytes(whole[100_000:])
    assert gpu_suite.joined_model().read_bytes() == whole
    assert gpu_suite.joined_model() == first / "m.gguf"  # joined once, then found
    (first / "m.gguf").unlink()
    (second / "model.part2").write_bytes(whole[100_000:-1] + b"x")
    with pytest.raises(SystemExit, match="does not match its SHA-256"):
        gpu_suite.joined_model()
    assert not (first / "m.gguf").exists()  # a corrupt join is not left to be loaded


def test_unfinished_runs_too_large_to_come_back_are_not_packed_and_progress_gives_each_runs_pace(tmp_path):
    import tarfile

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_suite

    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    for name, size in (("small-s0", 10), ("large-s0", 2_000_000)):
        (work / name / "checkpoints").mkdir(parents=True)
        (work / name / "checkpoints" / "state.json").write_text("{}")
        (work / name / "checkpoints" / "model.bin").write_bytes(b"\0" * size)
        (work / name / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in (1, 2, 3)))
    gpu_suite.pack_unfinished(work, out, set(), limit=1_000_000)
    with tarfile.open(out / "unfinished.tar.gz") as tar:
        assert {m.name.split("/")[0] for m in tar.getmembers()} == {"small-s0"}
    gpu_suite.write_progress(work, out, {"small-s0": 100.0, "large-s0": 100.0}, {"small-s0": 160.0})
    progress = json.loads((out / "progress.json").read_text())
    assert progress["small-s0"] == {"rounds_done": 3, "seconds": 60.0, "finished": False}
    assert progress["large-s0"]["rounds_done"] == 3 and progress["large-s0"]["seconds"] > 60  # still running


def test_a_bytes_claim_holds_only_when_every_seed_reaches_the_target_with_enough_fewer_bytes():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from seeded import ratio_verdict

    row = lambda *ratios: {"per_seed": [{"bytes_ratio": r} for r in ratios]}  # noqa: E731
    assert ratio_verdict(row(12.0, 11.0, 15.0), 10).startswith("holds on every seed (lowest 11.0x")
    assert ratio_verdict(row(14.0, 8.0, 12.0), 10).startswith("holds on average")
    assert ratio_verdict(row(9.0, 8.0, 12.0), 10).startswith("does not hold: 9.7x")
    assert ratio_verdict(row(30.0, None, 30.0), 10) == "does not hold: reaches the target on 2 of 3 seeds"
    assert ratio_verdict(row(30.0), 10) == "provisional (1 of 3 seeds): 1 of 1 at >= 10x, lowest 30.0x, mean 30.0x"
    assert ratio_verdict(row(26.0, 22.0), 25) == "provisional (2 of 3 seeds): 1 of 2 at >= 25x, lowest 22.0x, mean 24.0x"
    assert ratio_verdict(row(None), 10) == "provisional (1 of 3 seeds): 0 of 1 at >= 10x"


def test_every_privacy_row_is_a_valid_config_with_a_calibrated_noise():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from b5_privacy import ADAPTIVE_EPSILONS, CONFIG, EPSILONS, PROFILE, rows

    from fedzip import privacy
    from fedzip.config import load_config

    table = rows(0.3)
    # three methods at each epsilon and without DP, then FedIT with an adaptive clip, uncapped and capped
    assert len(table) == 3 * (1 + len(EPSILONS)) + 2 * len(ADAPTIVE_EPSILONS)
    for label, overrides, _ in table:
        cfg = load_config(CONFIG, [*PROFILE, *overrides])
        if label.endswith("_none"):
            assert not privacy.enabled(cfg)
            continue
        eps = float(label.rsplit("eps", 1)[1].split("_")[0])
        assert privacy.run_epsilon(cfg, cfg.rounds) == pytest.approx(eps, rel=0.01) and cfg.privacy.clip == 0.3
        assert privacy.adaptive(cfg) == label.endswith(("_adaptive", "_capped"))
        assert cfg.privacy.clip_max == (0.3 if label.endswith("_capped") else None)
        assert privacy.update_noise_multiplier(cfg) >= privacy.noise_multiplier(cfg)  # the count's share is paid


def test_every_frontier_row_is_a_valid_config_of_its_method():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from b6_frontier import CAUSAL_PROFILE, CAUSAL_ROWS, CONFIG, PROFILE, ROWS

    from fedzip.config import load_config
    from fedzip.registry import method_class

    methods = set()
    for label, overrides, _ in ROWS:
        cfg = load_config(CONFIG, [*PROFILE, *overrides])
        cls = method_class(cfg.method)
        cls.adjust_config(cfg)
        if cls.Options is not None:
            cls.Options.model_validate(cfg.method_options)
        methods.add(cfg.method)
        assert (cfg.eval.personal_clients or 0) > 0 or not cls.personalised, label  # judged through client models
    assert {"fedsb", "fedsa_lora", "fedit"} <= methods
    for _, overrides, _ in CAUSAL_ROWS:
        cfg = load_config("b2_fedbiot", [*CAUSAL_PROFILE, *overrides])
        cls = method_class(cfg.method)
        if cls.Options is not None:
            cls.Options.model_validate(cfg.method_options)
        methods.add(cfg.method)
    assert "fedkseed" in methods


def test_accuracy_at_equal_bytes_reads_the_other_run_where_it_had_spent_the_same_bytes():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from b1_compression import at_equal_bytes

    def record(label, seed, per_round, accuracies):  # an evaluation every round, window 3
        curve = [{"round": i + 1, "bytes_up": per_round, "bytes_down": per_round, "accuracy": a, "eval_examples": 8}
                 for i, a in enumerate(accuracies)]
        n = len(accuracies) * per_round
        return {"label": label, "seed": seed, "curve": curve, "bytes_up_total": n, "bytes_down_total": n}

    cheap = [record("sparse", s, 10, [0.3, 0.4, 0.5, 0.6]) for s in (0, 1)]  # 80 bytes each
    dense = [record("dense", 0, 20, [0.1, 0.4, 0.7, 0.9]),  # 80 bytes = round 2: smoothed (0.1 + 0.4) / 2
             record("dense", 1, 50, [0.2, 0.9, 0.9, 0.9])]  # its first round already costs 100: no evaluation
    own, ref = at_equal_bytes(cheap + dense, "sparse", "dense")
    assert own["mean"] == pytest.approx(0.5) and own["n"] == 2  # (0.4 + 0.5 + 0.6) / 3 on both seeds
    assert ref["mean"] == pytest.approx(0.25) and ref["n"] == 1  # the seed without an evaluation is left out


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "src" / "fedzip" / "configs").glob("*.yaml")))
def test_every_packaged_config_is_valid_for_its_method(name):
    from fedzip.config import load_config
    from fedzip.registry import method_class

    cfg = load_config(name)
    cls = method_class(cfg.method)
    cfg = cls.adjust_config(cfg)
    if cls.Options is not None:
        cls.Options.model_validate(cfg.method_options)
    else:
        assert not cfg.method_options, name


def test_every_b2_aligned_row_is_a_valid_config_of_its_method():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from b2_aligned import CONFIG, PROFILE, ROWS

    from fedzip.config import load_config
    from fedzip.registry import method_class

    for label, overrides, _ in ROWS:
        cfg = load_config(CONFIG, [*PROFILE, *overrides])
        cls = method_class(cfg.method)
        cfg = cls.adjust_config(cfg)
        if cls.Options is not None:
            opts = cls.Options.model_validate(cfg.method_options)
            if label.startswith("fedbiot"):  # both FedBiOT rows pre-align to the gate, not for a fixed count
                assert opts.prealign_margin and opts.prealign_steps >= 100, label


def test_hafl_claims_compare_rows_seed_by_seed_and_read_each_tiers_model():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from b1_hetero import paired_points, tier_gaps
    from seeded import verdict

    def record(label, seed, accs, tier4=None):  # evaluations every 30 rounds on an 800-example subset
        curve = [{"round": 30 * (i + 1), "accuracy": a, "eval_examples": 800} for i, a in enumerate(accs)]
        if tier4 is not None:
            curve[-1]["tier4_accuracy"] = tier4
        return {"label": label, "seed": seed, "curve": curve}

    records = [record("hafl", s, [0.40 + s / 100, 0.44]) for s in range(3)]
    records += [record("hetlora", s, [0.38, 0.52], tier4=0.45) for s in range(3)]
    ahead = paired_points(records, "hafl", "hetlora", 30)
    assert ahead == pytest.approx([2.0, 3.0, 4.0])  # smoothed at round 30 is the round-30 value itself
    assert verdict(ahead).startswith("**holds** (+3.0 ± 1.0 points over 3 seed(s), ahead on 3")
    behind = paired_points(records, "hafl", "hetlora", 60)  # smoothed over rounds 30-60 on both sides
    assert verdict(behind).startswith("**does not hold**")
    assert verdict(ahead[:2]).startswith("provisional") and verdict([3.0, -1.0, 2.0]).startswith("not shown")
    assert verdict(behind[:1]).startswith("provisional")  # one seed behind decides nothing either
    assert verdict([]) == "not measured yet"
    assert tier_gaps(records, "hetlora", 4) == pytest.approx([7.0] * 3)  # 0.52 - 0.45, in points
    assert tier_gaps(records, "hafl", 4) == [] and tier_gaps(records, "hetlora", 8) == []


def test_every_b1_hetero_row_is_a_valid_config_and_the_truncating_rows_evaluate_their_tiers():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from b1_hetero import CONFIG, PROFILE, ROWS, TRUNCATING

    from fedzip.config import load_config
    from fedzip.registry import method_class

    for label, overrides, _ in ROWS:
        cfg = load_config(CONFIG, [*PROFILE, *overrides])
        cls = method_class(cfg.method)
        if cls.Options is not None:
            opts = cls.Options.model_validate(cfg.method_options)
            # FedIT's options have no tiers to evaluate; a truncating row without the option fails here
            assert (getattr(opts, "degradation_every", 0) > 0) == (label in TRUNCATING), label


def test_b2_claims_compare_losses_seed_by_seed_lower_being_ahead():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from b2_aligned import claims, paired_last

    def record(label, seed, losses, emu=None):  # evaluations every 2 rounds
        curve = [{"round": 2 * (i + 1), "loss": v} for i, v in enumerate(losses)]
        if emu is not None:
            curve[-1]["emu_loss"] = emu
        return {"label": label, "seed": seed, "curve": curve}

    records = [record("fedbiot", s, [2.0, 1.5 - s / 100], emu=1.9) for s in range(3)]
    for s, r in enumerate(records):  # the emulator of seed 2 stopped at its step budget, short of the gate
        r["method_facts"] = {"prealignment": {"prealign_gate_met": s < 2}}
    records += [record("fedot", s, [2.1, 1.6], emu=1.8) for s in range(3)]
    records += [record("offsite_tuning", s, [2.1, 1.4]) for s in range(2)]
    assert paired_last(records, "fedbiot", "fedot", "loss") == pytest.approx([0.10, 0.11, 0.12])  # the last point
    assert paired_last(records, "fedbiot", "fedot", "emu_loss") == pytest.approx([-0.1] * 3)
    text = "\n".join(claims(records))
    assert ("`fedbiot` beats `fedot` (gate met on 2 of 3 seed(s)): AdapFu **holds** (+0.110 ± 0.010 nats over 3 "
            "seed(s), ahead on 3)") in text
    assert "AdapEmu **does not hold** (-0.100" in text
    assert "`fedbiot` beats `offsite_tuning` (gate met on 2 of 3 seed(s)): AdapFu provisional (-0.095" in text
    assert "`fedbiot_authors` beats `fedot`: AdapFu not measured yet" in text


def test_hetlora_collapse_rounds_are_the_first_rounds_no_sampled_client_holds_the_components():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from b1_hetero import CONFIG, PROFILE, ROWS, collapse_rounds

    from fedzip.config import load_config
    from fedzip.engine.rounds import sample_clients
    from fedzip.methods.hafl import HetLoRAOptions, assign_ranks

    cfg = load_config(CONFIG, [*PROFILE, *dict((lab, o) for lab, o, _ in ROWS)["hetlora"]])
    ranks = assign_ranks(HetLoRAOptions.model_validate(cfg.method_options), cfg.num_clients, cfg.lora.rank, 0)
    r8, r4 = collapse_rounds([0])[0]
    top = [max(ranks[c] for c in sample_clients(0, rnd, cfg.num_clients, cfg.clients_per_round))
           for rnd in range(1, cfg.rounds + 1)]  # the highest rank sampled in each round
    assert top[r8 - 1] <= 8 and all(t == 16 for t in top[:r8 - 1])
    assert top[r4 - 1] == 4 and all(t > 4 for t in top[:r4 - 1])


def test_live_components_count_the_singular_values_of_the_global_update(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from b1_hetero import LIVE, live_components
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 4, generator=g))
    v, _ = torch.linalg.qr(torch.randn(10, 4, generator=g))
    # singular values 1, 0.5, 0.1 * LIVE (dead) and 0: two components live
    a = torch.diag(torch.tensor([1.0, 0.5, 0.1 * LIVE, 0.0])) @ v.T
    lora = {"global/m.q.lora_A.weight": a, "global/m.q.lora_B.weight": u, "global/m.v.lora_A.weight": a[:1],
            "global/m.v.lora_B.weight": u[:, :1], "global/classifier.weight": torch.ones(2, 3)}
    lora = {k: t.clone().contiguous() for k, t in lora.items()}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    assert sorted(live_components(tmp_path / "lora.safetensors")) == [1, 2]
    # FlexLoRA's checkpoint keeps the averaged full-rank update: that is what is counted
    full = {"full_rank_update/m.q": (u[:, :3] @ torch.diag(torch.tensor([2.0, 1.0, 1.0])) @ v[:, :3].T).contiguous()} | lora
    save_file(full, str(tmp_path / "flex.safetensors"))
    assert live_components(tmp_path / "flex.safetensors") == [3]


def test_peaks_give_each_seeds_best_accuracy_its_round_and_the_last():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from b1_hetero import peaks

    def record(seed, accs):
        return {"label": "flexlora", "seed": seed,
                "curve": [{"round": 6 * (i + 1), "accuracy": a, "eval_examples": 800} for i, a in enumerate(accs)]}

    records = [record(0, [0.2, 0.44, 0.3, 0.05]), record(1, [0.1, 0.2, 0.3])]
    assert peaks(records, "flexlora") == {0: (0.44, 12, 0.05), 1: (0.3, 18, 0.3)}
    assert peaks(records, "hafl") == {}


def test_the_leaderboard_joins_another_benchmarks_board_only_once_it_has_rows(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import b1_cpu

    monkeypatch.setattr(b1_cpu, "RESULTS", tmp_path)
    assert b1_cpu.fedbiot_section() == ([], None)  # no board written yet
    (tmp_path / "b2_aligned.json").write_text(json.dumps({"rows": []}))
    assert b1_cpu.fedbiot_section() == ([], None)  # a board without rows
    rows = [{"label": label, "what": f"{label} runs", "seeds": [0, 1, 2], "machines": ["m"]}
            for label in ("fedit_full_model", "fedbiot")]
    board = {"rows": rows, "metric": "loss"}
    (tmp_path / "b2_aligned.json").write_text(json.dumps(board))
    monkeypatch.setattr(b1_cpu, "leaderboard_markdown", lambda b: [f"| {r['label']} |" for r in b["rows"]])
    lines, got = b1_cpu.fedbiot_section()
    assert got == board
    assert lines[0].startswith("## B2: the FedBiOT family")
    assert "| fedbiot |" in lines and "- `fedbiot`: fedbiot runs" in lines
    (tmp_path / "b1_compression.json").write_text(json.dumps({"flasc": board}))
    assert b1_cpu.all_linear_section()[1] == board  # the FLASC board sits under its key


@pytest.mark.parametrize("device, profile", [("cpu", "cpu"), ("cuda:0", "gpu")])
def test_a_seeded_runs_compact_result_names_the_profile_of_the_device_it_ran_on(tmp_path, monkeypatch, device, profile):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import seeded

    monkeypatch.setattr(seeded, "run_one", lambda *a, **k: None)
    monkeypatch.setattr(seeded, "compact_run", lambda out, label: {"label": label, "device": device})
    bench = seeded.SeededBenchmark("t", "b1_fedit", [], [("row", [], "a row")], results_dir=tmp_path)
    bench.run_and_keep("row", [], 0, 1, commit=False)
    kept = json.loads((tmp_path / "row-s0.json").read_text())
    assert kept == {"label": "row", "device": device, "what": "a row", "benchmark": "t", "profile": profile}


def test_the_frontier_goal_is_met_only_on_three_seeds_each_at_100x():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from b6_frontier import B6_ABLATIONS, goal_lines

    def row(label, *ratios):
        return {"label": label, "reached": "-", "per_seed": [{"bytes_ratio": r} for r in ratios],
                "bytes_ratio_vs_reference": None, "mb_up_total": {"mean": 1.0}, "mb_down_total": {"mean": 1.0}}

    def last(*rows):
        return goal_lines({"reference": "fedit_personal", "rows": [row("fedit_personal", 1, 1, 1), *rows]})[-1]

    assert last(row("a", 120, 130, 101), row("b", 150, 90, 200)) == "Goal met by: a."
    assert last(row("b", 150, 90, 200), row("c", 150, None, 200)).startswith("Goal not met")
    assert last(row("a", 120, 130), row(B6_ABLATIONS[0], 300)) == "No verdict yet: fewer than 3 seeds of a."
    assert last(row("b", 150, 90, 200), row(B6_ABLATIONS[0], 300)).startswith("Goal not met")
    table = goal_lines({"reference": "fedit_personal", "rows": [row(B6_ABLATIONS[0], 300)]})
    assert any(line.startswith(f"| {B6_ABLATIONS[0]} |") and "not a candidate (seed 0 only): 1 of 1 at >= 100x" in line
               for line in table)
