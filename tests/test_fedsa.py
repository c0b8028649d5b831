"""FedSA-LoRA (B never leaves the client) and the personalised evaluation of client models."""

import json

import numpy as np
import pytest
import torch
from helpers import server_and_client
from safetensors.torch import load_file

from fedzip.config import load_config
from fedzip.data.partition import client_test_indices
from fedzip.engine import run_experiment
from fedzip.engine.ledger import read_ledger
from fedzip.engine.personal import own_test_indices, read_reply
from fedzip.engine.rounds import sample_clients
from fedzip.engine.state import ClientStateStore
from fedzip.errors import ConfigError, PayloadError
from fedzip.methods import ClientContext
from fedzip.models.lora import is_lora, is_lora_a
from fedzip.wire import Message, decode, encode


def test_b_and_the_head_never_leave_the_client(tiny_cfg, tmp_path):
    cfg, rt, server, client = server_and_client(tiny_cfg + ["method=fedsa_lora"])
    store = ClientStateStore(tmp_path / "store")
    names = rt.view.names()
    assert set(server.up_spec(0, 1)) == set(server.down_spec(0, 1)) == {n for n in names if is_lora_a(n)}
    initial = {n: t.clone() for n, t in server.global_tensors().items()}
    for rnd in (1, 2):
        replies = {}
        for cid, msg in server.configure(rnd, sample_clients(cfg.seed, rnd, cfg.num_clients, cfg.clients_per_round)).items():
            down = decode(encode(msg), client.down_spec(cid, rnd))
            reply = client.fit(ClientContext(cid, rnd, rt.parts[cid], store, cfg.seed + cid), down)
            assert all(is_lora_a(n) for n in reply.tensors)  # only A in what leaves
            replies[cid] = decode(encode(reply), server.up_spec(cid, rnd))
        server.aggregate(rnd, replies)
    kept = [n for n in names if not is_lora_a(n)]
    assert all(torch.equal(server.global_tensors()[n], initial[n]) for n in kept)  # the server never learns them
    trained = [c for c in range(cfg.num_clients) if store.load(c)]
    own = [client.personal_tensors(c, store, server.global_tensors()) for c in trained]
    b = next(n for n in names if is_lora(n) and not is_lora_a(n))
    assert len(trained) >= 2 and all(o[b].abs().max() > 0 for o in own)  # each client trained its own B
    assert not torch.equal(own[0][b], own[1][b])
    # a reply that carries B is refused by the server
    leaking = Message(replies[next(iter(replies))].tensors | {b: own[0][b]}, {"num_examples": 5})
    with pytest.raises(PayloadError):
        decode(encode(leaking), server.up_spec(0, 3))


def test_a_shared_head_travels_with_a(tiny_cfg):
    _, rt, server, _ = server_and_client(tiny_cfg + ["method=fedsa_lora", "method_options={local_head: false}"])
    assert set(server.up_spec(0, 1)) == {n for n in rt.view.names() if is_lora_a(n) or not is_lora(n)}


def test_client_test_sets_follow_each_clients_labels():
    rng = np.random.default_rng(0)
    train_labels = np.array([0] * 50 + [1] * 50 + [2] * 50)
    test_labels = np.array([0, 1, 2] * 300)
    part = np.arange(0, 50)  # only class 0
    mixed = np.concatenate([np.arange(0, 10), np.arange(100, 140)])  # 1:4 of classes 0 and 2
    own = client_test_indices(train_labels, part, test_labels, 30, rng)
    assert len(own) == 30 and set(test_labels[own]) == {0}
    drawn = test_labels[client_test_indices(train_labels, mixed, test_labels, 200, rng)]
    assert len(drawn) == 200 and set(drawn) == {0, 2} and 0.12 < np.mean(drawn == 0) < 0.28


def test_personalised_evaluation_judges_client_models(tiny_cfg, tmp_path):
    overrides = tiny_cfg + ["method=fedsa_lora", "rounds=2", "eval.personal_clients=3", "eval.personal_examples=12"]
    summary = run_experiment(load_config(None, overrides), tmp_path / "fedsa", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "fedsa" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["accuracy_of"] == "client_models" and len(last["personal_clients"]) == 3
    assert last["personal_examples"] == 36 and 0 <= last["personal_accuracy_min"] <= last["personal_accuracy"] <= 1
    assert summary["final_metrics"]["accuracy"] == last["accuracy"]
    # the global adapter is no client's model (B at zero); each evaluated client's own is exported beside it
    run = tmp_path / "fedsa"
    shared = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(t.abs().max() == 0 for k, t in shared.items() if "lora_B" in k)
    trained = 0
    for cid in last["personal_clients"]:
        mine = load_file(str(run / "personal" / f"client_{cid}" / "adapter_model.safetensors"))
        kept = {"base_model.model." + k[len("own::"):]: t for k, t in ClientStateStore(run / "client_state").load(cid)
                .items() if k.startswith("own::")}  # the store names tensors as the trainable view does
        b_keys = [k for k in mine if "lora_B" in k]
        # its own B as it kept it; LoRA's zero init for a client not yet sampled
        assert b_keys and all(torch.equal(mine[k], kept.get(k, torch.zeros_like(mine[k]))) for k in b_keys)
        trained += bool(kept)
        assert all(torch.equal(mine[k], shared[k]) for k in mine if "lora_A" in k)  # the shared A
    assert trained >= 1
    # a method with one global model keeps its global accuracy and gets the personal one beside it
    fedit = tiny_cfg + ["method=fedit", "rounds=2", "eval.personal_clients=3", "eval.personal_examples=12"]
    run_experiment(load_config(None, fedit), tmp_path / "fedit", progress=False)
    row = [json.loads(line) for line in (tmp_path / "fedit" / "metrics.jsonl").read_text().splitlines()][-1]
    assert "accuracy_of" not in row and "personal_accuracy" in row and "accuracy" in row
    # the client models share out the evaluation set: together they score each example once
    assert last["eval_examples"] == row["eval_examples"]


def test_personalised_evaluation_travels_as_counted_messages_and_scores_each_clients_own_model(tiny_cfg, tmp_path):
    """The clients score themselves from what they were sent: the ledger holds each evaluation message (kind
    ``eval``: A only down, scores only up), training's byte totals do not include them, and the personal
    accuracy is that of each client's exported model on its own test draw."""
    overrides = tiny_cfg + ["method=fedsa_lora", "rounds=2", "eval.personal_clients=3", "eval.personal_examples=12"]
    cfg = load_config(None, overrides)
    summary = run_experiment(cfg, tmp_path / "fedsa", progress=False)
    run = tmp_path / "fedsa"
    ledger = read_ledger(run / "ledger.jsonl")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    evals = [e for e in ledger if e["kind"] == "eval"]
    clients = set(last["personal_clients"])
    # one message each way per evaluated client (twice in the last round when it also scores the fixed subset)
    calls = 2 if "fixed_subset" in last else 1
    assert {(e["client"], e["direction"]) for e in evals if e["round"] == 2} == {(c, d) for c in clients
                                                                                 for d in ("up", "down")}
    assert len([e for e in evals if e["round"] == 2]) == 3 * 2 * calls
    _, rt, server, _ = server_and_client(overrides)
    a_only = {n: t for n, t in server.global_tensors().items() if is_lora_a(n)}
    assert {e["bytes"] for e in evals if e["direction"] == "down"} == {len(encode(Message(tensors=a_only), "fp32"))}
    assert last["bytes_eval_down"] == sum(e["bytes"] for e in evals if e["round"] == 2 and e["direction"] == "down")
    assert summary["bytes_eval_total"] == sum(e["bytes"] for e in evals)
    training = [e for e in ledger if e["kind"] != "eval"]
    assert summary["bytes_up_total"] + summary["bytes_down_total"] == sum(e["bytes"] for e in training)
    # each client's own model (exported) on its own draw: the mean, min and max of the row
    own = []
    for cid in sorted(clients):
        mine = load_file(str(run / "personal" / f"client_{cid}" / "adapter_model.safetensors"))
        rt.view.set({n: mine["base_model.model." + n] for n in rt.view.names()})
        own.append(rt.task.evaluate(rt.model, cfg.eval.batch_size, indices=own_test_indices(cfg, rt, cid))["accuracy"])
    assert last["personal_accuracy"] == pytest.approx(np.mean(own), abs=1e-9)
    assert (last["personal_accuracy_min"], last["personal_accuracy_max"]) == pytest.approx((min(own), max(own)))


def test_personalised_evaluation_is_refused_where_clients_do_not_hold_the_servers_model(tiny_cfg, tmp_path):
    fedbiot = ["method=fedbiot", "model.name=tiny-llama-8", "data.source=alpaca", "data.path=null", "data.max_length=48",
               "data.max_test_examples=16", "method_options={prealign_steps: 1, align_steps: 1, align_batch: 2, "
               "public_max_examples: 16}", "eval.personal_clients=2"]
    with pytest.raises(ConfigError, match="personal_clients"):
        run_experiment(load_config(None, tiny_cfg + fedbiot), tmp_path / "fedbiot", progress=False)


def test_an_evaluation_reply_is_checked_before_its_scores_count():
    good = {"cid": 3, "round": 2, "own": {"accuracy": 0.5, "loss": 1.2, "eval_examples": 12}}
    metrics, scores = read_reply(json.dumps(good).encode(), 3, 2, own=True, share=False)
    assert metrics == good["own"] and scores is None
    bad = [b"\x80 not json", json.dumps(good | {"cid": 4}).encode(), json.dumps(good | {"round": 1}).encode(),
           json.dumps(good | {"own": {"accuracy": float("nan"), "loss": 1.0, "eval_examples": 1}}).encode(),
           json.dumps(good | {"own": {"accuracy": 0.5}}).encode(),  # no loss, no count
           json.dumps(good).encode()]  # asked for its shared scores, it sends none
    for i, payload in enumerate(bad):
        with pytest.raises(PayloadError):
            read_reply(payload, 3, 2, own=True, share=i == len(bad) - 1)
    shared = good | {"shared": {"loss_sum": 3.0, "count": 2, "examples": 2, "preds": [1, 0], "golds": [1]}}
    with pytest.raises(PayloadError):  # one prediction without its gold
        read_reply(json.dumps(shared).encode(), 3, 2, own=True, share=True)


def test_rslora_scales_by_the_square_root_of_the_rank(tiny_cfg):
    for rslora, expected in ((False, 8 / 4), (True, 8 / 2)):
        _, rt, _, _ = server_and_client(tiny_cfg + ["method=fedsa_lora", f"lora.rslora={str(rslora).lower()}"])
        scales = {float(m.scaling["default"]) for m in rt.model.modules() if hasattr(m, "scaling") and
                  isinstance(m.scaling, dict) and "default" in m.scaling}
        assert scales == {expected}
