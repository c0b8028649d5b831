"""CG-FedLLM end to end on a tiny model: TGAP then FAF, uplink size, encoder shipped once, resume."""

import json
import math

from helpers import assert_resume_is_exact

from fedzip.config import load_config
from fedzip.engine import run_experiment
from fedzip.engine.ledger import read_ledger


def cg(tiny_cfg, extra=""):
    return tiny_cfg + ["method=cgfedllm", "lora.train_head=false", "rounds=4", "num_clients=4", "clients_per_round=2",
                       f"method_options={{tgap_rounds: 2, ae_epochs: 3, ae_lr: 0.001{', ' + extra if extra else ''}}}"]


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
