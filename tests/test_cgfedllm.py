"""CG-FedLLM end to end on a tiny model: TGAP then FAF, uplink size, encoder shipped once, resume."""

import json
import math

import pytest
from helpers import assert_resume_is_exact, play_round, server_and_client

from fedzip.cli import main
from fedzip.config import load_config
from fedzip.engine import run_experiment
from fedzip.engine.ledger import read_ledger
from fedzip.errors import QualityGateError, RunDirError
from fedzip.report.compact import compact_run
from fedzip.report.report import write_report


def cg(tiny_cfg, extra="", gate="warn"):
    """A tiny CG-FedLLM run; its 3-epoch autoencoder is not meant to pass the quality gate, so it only warns."""
    return tiny_cfg + ["method=cgfedllm", "lora.train_head=false", "rounds=4", "num_clients=4", "clients_per_round=2",
                       f"method_options={{tgap_rounds: 2, ae_epochs: 3, ae_lr: 0.001, ae_gate: {gate}"
                       f"{', ' + extra if extra else ''}}}"]


def test_tgap_then_faf_with_compressed_uplink(tmp_path, tiny_cfg):
    summary = run_experiment(load_config(None, cg(tiny_cfg)), tmp_path / "cg", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "cg" / "metrics.jsonl").read_text().splitlines()]
    assert "tgap_loss_first" in rows[1] and rows[1]["tgap_loss_last"] <= rows[1]["tgap_loss_first"]
    assert all(k in rows[2] for k in ("snr_db", "snr_paper", "cosine"))
    desc = json.loads((tmp_path / "cg" / "method.json").read_text())
    assert desc["latent_values"] * 64 == desc["map_shape"][0] * desc["map_shape"][1]
    ledger = read_ledger(tmp_path / "cg" / "ledger.jsonl")
    tgap_up = [e["bytes"] for e in ledger if e["direction"] == "up" and e["round"] <= 2]
    faf_up = [e["bytes"] for e in ledger if e["direction"] == "up" and e["round"] > 2]
    # the latent is 1/64 of the padded map: the uplink body shrinks accordingly (headers aside)
    assert max(faf_up) < min(tgap_up)
    assert max(faf_up) <= 4 * desc["latent_values"] + 400
    # the encoder is in a client's first FAF download only
    downs = {}
    for e in ledger:
        if e["direction"] == "down" and e["round"] > 2:
            downs.setdefault(e["client"], []).append(e["bytes"])
    plain = min(e["bytes"] for e in ledger if e["direction"] == "down")
    for sizes in downs.values():
        assert sizes[0] > plain + 4 * desc["encoder_params"] * 0.9 and all(s == plain for s in sizes[1:])
    assert (tmp_path / "cg" / "autoencoder.safetensors").exists() and math.isfinite(summary["final_metrics"]["loss"])


def test_reuse_a_trained_autoencoder_and_resume(tmp_path, tiny_cfg):
    run_experiment(load_config(None, cg(tiny_cfg)), tmp_path / "first", progress=False)
    ae = tmp_path / "first" / "autoencoder.safetensors"
    opts = cg(tiny_cfg, f"autoencoder_path: {ae}")
    opts = [o.replace("tgap_rounds: 2", "tgap_rounds: 0") for o in opts]
    assert_resume_is_exact(tmp_path, opts, stop_after=2)


def test_online_fine_tuning_uploads_true_maps_then_reships_the_encoder(tmp_path, tiny_cfg):
    overrides = cg(tiny_cfg, "online_every: 2, online_epochs: 2")
    overrides = [o.replace("rounds=4", "rounds=6") for o in overrides]
    run_experiment(load_config(None, overrides), tmp_path / "cg", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "cg" / "metrics.jsonl").read_text().splitlines()]
    desc = json.loads((tmp_path / "cg" / "method.json").read_text())
    ledger = read_ledger(tmp_path / "cg" / "ledger.jsonl")
    up = {r: [e["bytes"] for e in ledger if e["direction"] == "up" and e["round"] == r] for r in range(1, 7)}
    map_bytes = 4 * desc["map_shape"][0] * desc["map_shape"][1]
    # FAF rounds 3..6; calibration every 2nd: rounds 4 and 6 upload the true map, 3 and 5 the latent
    assert all(b >= map_bytes for r in (4, 6) for b in up[r]) and all(b < map_bytes / 8 for r in (3, 5) for b in up[r])
    assert "online_loss_last" in rows[3] and "snr_db" in rows[4] and "snr_db" not in rows[3]
    enc = 4 * desc["encoder_params"] * 0.9
    plain = min(e["bytes"] for e in ledger if e["direction"] == "down")
    round5 = [e["bytes"] for e in ledger if e["direction"] == "down" and e["round"] == 5]
    assert all(b > plain + enc for b in round5)  # after calibration everyone gets the refreshed encoder


GATE_KEYS = ("gate_cosine_autoencoder", "gate_cosine_zero", "gate_cosine_random_projection", "gate_cosine_block_pca",
             "gate_cosine_topk", "gate_passed")


def test_an_autoencoder_below_the_gate_stops_the_run_with_one_error(tmp_path, tiny_cfg, capsys):
    """An autoencoder that barely moved (one epoch at a tiny lr) decodes to almost nothing: the gate stops it."""
    failing = cg(tiny_cfg, gate="stop")
    failing = [o.replace("ae_epochs: 3, ae_lr: 0.001", "ae_epochs: 1, ae_lr: 0.0000001") for o in failing]
    with pytest.raises(QualityGateError, match="quality gate"):
        run_experiment(load_config(None, failing), tmp_path / "stop", progress=False)
    gate = json.loads((tmp_path / "stop" / "autoencoder_gate.json").read_text())
    assert gate["passed"] is False and gate["heldout_maps"] == 1 and gate["training_maps"] == 3
    assert gate["cosine"]["autoencoder"] <= gate["cosine"]["random_projection"]
    assert (tmp_path / "stop" / "autoencoder.safetensors").exists()  # kept: the work is not lost
    capsys.readouterr()  # what came before (e.g. building the tiny model once) is not the CLI's output
    assert main(["run", "--out", str(tmp_path / "cli"), "--quiet"] + [a for o in failing for a in ("--set", o)]) == 4
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "quality gate" in err and "ae_gate: warn" in err
    # nothing is lost: the run resumes from the round before the gate with the autoencoder trained for longer
    longer = [o.replace("ae_epochs: 1, ae_lr: 0.0000001", "ae_epochs: 40, ae_lr: 0.01").replace("stop", "warn")
              for o in failing]
    resumed = run_experiment(load_config(None, longer), tmp_path / "stop", resume=True, progress=False)
    assert resumed["rounds_completed"] == 4
    rows = [json.loads(x) for x in (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4] and rows[1]["ae_epochs_run"] > 1
    changed = longer + ["method_options.tgap_share=0.5"]
    with pytest.raises(RunDirError, match="differs"):  # what shaped the kept rounds may not change
        run_experiment(load_config(None, changed), tmp_path / "stop", resume=True, progress=False)


def test_a_run_that_goes_on_below_the_gate_says_so_in_every_report(tmp_path, tiny_cfg):
    warned = cg(tiny_cfg)
    warned = [o.replace("ae_epochs: 3, ae_lr: 0.001", "ae_epochs: 1, ae_lr: 0.0000001") for o in warned]
    summary = run_experiment(load_config(None, warned), tmp_path / "warn", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "warn" / "metrics.jsonl").read_text().splitlines()]
    assert all(k in rows[1] for k in GATE_KEYS) and rows[1]["gate_passed"] == 0.0
    assert rows[1]["tgap_maps"] + rows[1]["tgap_heldout_maps"] == 4  # 2 rounds x 2 clients
    assert len(summary["warnings"]) == 1 and "round 2" in summary["warnings"][0]
    compact = compact_run(tmp_path / "warn")
    assert compact["warnings"] == summary["warnings"] and compact["autoencoder_gate"]["passed"] is False
    assert compact["autoencoder_gate"]["cosine"]["zero"] == 0.0 and "train_loss" not in compact["autoencoder_gate"]
    page = write_report([tmp_path / "warn"], tmp_path / "report").read_text()
    assert "quality gate" in page


def test_tgap_snapshots_add_maps_and_their_upload_bytes(tmp_path, tiny_cfg):
    run_experiment(load_config(None, cg(tiny_cfg)), tmp_path / "one", progress=False)
    run_experiment(load_config(None, cg(tiny_cfg, "tgap_snapshots: 3")), tmp_path / "three", progress=False)
    desc = json.loads((tmp_path / "three" / "method.json").read_text())
    map_bytes = 4 * desc["map_shape"][0] * desc["map_shape"][1]
    up = {name: [e["bytes"] for e in read_ledger(tmp_path / name / "ledger.jsonl")
                 if e["direction"] == "up" and e["round"] <= 2] for name in ("one", "three")}
    # the same clients, each TGAP reply now carries two more maps (the deltas after 1/3 and 2/3 of its steps)
    assert all(b3 - b1 >= 2 * map_bytes for b1, b3 in zip(up["one"], up["three"]))
    rows = [json.loads(x) for x in (tmp_path / "three" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["tgap_maps"] + rows[1]["tgap_heldout_maps"] == 2 * 2 * 3


def test_a_bare_yaml_off_turns_the_gate_off(tiny_cfg):
    cfg = load_config(None, tiny_cfg + ["method=cgfedllm", "method_options={tgap_rounds: 2, ae_gate: off}"])
    assert cfg.method_options["ae_gate"] is False  # what YAML made of it
    from fedzip.methods.cgfedllm import CgOptions

    assert CgOptions.model_validate(cfg.method_options).ae_gate == "off"


def test_a_client_whose_faf_reply_was_lost_gets_the_encoder_again(tiny_cfg, tmp_path):
    from fedzip.engine.state import ClientStateStore

    cfg, rt, server, client = server_and_client(tiny_cfg + ["method=cgfedllm", "lora.train_head=false", "method_options="
                                                             "{tgap_rounds: 2, ae_epochs: 2, ae_lr: 0.001, ae_gate: warn}"])
    store = ClientStateStore(tmp_path / "store")
    for rnd in (1, 2):  # TGAP: dense uploads, then the autoencoder trains
        play_round(cfg, rt, server, client, rnd, store)
    encoder = set(client.down_optional(0, 3))
    play_round(cfg, rt, server, client, 3, store, cids=[0, 1], lost=[0])  # both got the encoder; 0's reply was lost
    again = server.configure(4, [0, 1])
    assert encoder and encoder <= set(again[0].tensors) and not encoder & set(again[1].tensors)
