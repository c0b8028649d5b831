"""Fed-SB: averaging R is exact on the products, LoRA-SB's gradient initialisation, the basis sent once, export."""

import json

import pytest
import torch
from helpers import play_round, server_and_client

from fedzip.config import load_config
from fedzip.engine import run_experiment
from fedzip.engine.ledger import read_ledger
from fedzip.engine.runtime import build_runtime
from fedzip.engine.state import ClientStateStore
from fedzip.errors import ConfigError
from fedzip.methods import METHODS
from fedzip.methods.base import reply_weight
from fedzip.methods.fedsb import R_SUFFIX, latent_layers


def delta_weights(server) -> dict[str, torch.Tensor]:
    """Each adapted module's B R A * scaling on the server's model, at the global R."""
    server.rt.view.set(server.global_tensors())
    with torch.no_grad():
        return {name: layer.get_delta_weight("default").double() for name, layer in latent_layers(server.rt.model).items()}


def test_the_average_of_r_is_the_exact_average_of_the_products(tiny_cfg, tmp_path):
    cfg, rt, server, client = server_and_client(tiny_cfg + ["method=fedsb", "method_options={init: random}",
                                                             "clients_per_round=3"])
    store = ClientStateStore(tmp_path / "store")
    layers = latent_layers(server.rt.model)
    replies = play_round(cfg, rt, server, client, 1, store)
    assert len(replies) == 3
    total = sum(reply_weight(r) for r in replies.values())
    after = delta_weights(server)
    for name, layer in layers.items():
        a0 = layer.lora_A["default"].parametrizations.weight.original.double()
        b0 = layer.lora_B["default"].weight.double()
        s = float(layer.scaling["default"])
        # each client's own product B R_k A, then their weighted mean: what FedAvg of full weights would give
        exact = sum(b0 @ r.tensors[name + R_SUFFIX].double() @ a0 * s * (reply_weight(r) / total)
                    for r in replies.values())
        assert exact.abs().max() > 0  # the clients trained R
        torch.testing.assert_close(after[name], exact, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["fedit", "fedsb"])
def test_sending_the_update_gives_the_same_average(tiny_cfg, tmp_path, method):
    """upload: update sends R_k - R_t (FedIT: theta_k - theta_t) and the server adds their weighted mean to its
    own state: at fp32 the same global tensors as averaging the trained ones."""
    base = tiny_cfg + [f"method={method}", "clients_per_round=3"]
    options = "init: random, " if method == "fedsb" else ""
    results = {}
    for upload in ("model", "update"):
        cfg, rt, server, client = server_and_client(base + [f"method_options={{{options}upload: {upload}}}"])
        start = {n: t.clone() for n, t in server.global_tensors().items()}
        replies = play_round(cfg, rt, server, client, 1, ClientStateStore(tmp_path / upload))
        results[upload] = (start, replies, server.global_tensors())
    start, model_replies, model_global = results["model"]
    _, update_replies, update_global = results["update"]
    for cid, reply in update_replies.items():  # what travels is the change, and it is the same change
        for n, t in reply.tensors.items():
            torch.testing.assert_close(start[n] + t, model_replies[cid].tensors[n], rtol=0, atol=1e-6)
    assert any(t.abs().max() > 0 for r in update_replies.values() for t in r.tensors.values())
    for n in model_global:
        torch.testing.assert_close(update_global[n], model_global[n], rtol=0, atol=1e-6)


def test_with_a_lossy_codec_the_servers_state_keeps_only_the_updates_rounding(tiny_cfg, tmp_path):
    """int4 both ways and clients that barely move (lr 1e-9): sending whole states rounds the server's R and
    head every round (stochastic rounding, a step of the block's largest value / 7), sending the updates
    leaves them where they were to within the updates themselves."""
    drift = {}
    for upload in ("model", "update"):
        cfg, rt, server, client = server_and_client(tiny_cfg + [
            "method=fedsb", f"method_options={{init: random, upload: {upload}}}", "train.lr=1e-9"])
        # a server state away from zero (a fresh R is 0, which rounds to itself either way)
        server.global_ = {n: t + 0.1 * torch.randn(t.shape, generator=torch.Generator().manual_seed(7))
                          for n, t in server.global_tensors().items()}
        start = {n: t.clone() for n, t in server.global_tensors().items()}
        store = ClientStateStore(tmp_path / upload)
        for rnd in (1, 2):
            play_round(cfg, rt, server, client, rnd, store, codec="int4(stochastic=1)")
        drift[upload] = max(float((server.global_tensors()[n] - start[n]).abs().max()) for n in start)
    assert drift["update"] < 1e-6 < 1e-3 < drift["model"], drift


def test_only_r_and_the_head_train_and_travel(tiny_cfg):
    cfg, rt, server, _ = server_and_client(tiny_cfg + ["method=fedsb", "method_options={init: random}"])
    names = list(server.rt.view.params)
    rank = cfg.lora.rank
    lora = [n for n in names if n.endswith(R_SUFFIX)]
    assert lora and len(lora) == len(latent_layers(server.rt.model))
    assert all(tuple(server.rt.view.params[n].shape) == (rank, rank) for n in lora)
    assert all(n.endswith(R_SUFFIX) or n.startswith("classifier") for n in names)


def test_gradient_initialisation_factorises_the_first_sign_step(tiny_cfg, tmp_path):
    cfg, rt, server, client = server_and_client(tiny_cfg + ["method=fedsb",
                                                             "method_options={init: gradient, init_step: 0.001}"])
    store = ClientStateStore(tmp_path / "store")
    before = {n: t.clone() for n, t in server.global_tensors().items()}
    replies = play_round(cfg, rt, server, client, 1, store)
    examples = sum(reply_weight(r) for r in replies.values())
    after = delta_weights(server)
    rank = cfg.lora.rank
    for name in latent_layers(server.rt.model):
        grad = sum(r.tensors[name + ".weight_grad"].double() for r in replies.values()) / examples
        update = -0.001 * torch.sign(grad)
        u, s, vh = torch.linalg.svd(update)
        best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]  # the rank-r truncation (Eckart-Young)
        torch.testing.assert_close(after[name], best, rtol=1e-4, atol=1e-7)
    head = [n for n in before if not n.endswith(R_SUFFIX)]
    assert all(torch.equal(before[n], server.global_tensors()[n]) for n in head)  # round 1 trains nothing


@pytest.mark.parametrize("persist", [False, True])  # the client's optimizer state is stored beside the basis
def test_the_basis_goes_once_to_each_client_and_is_counted(tiny_cfg, tmp_path, persist):
    overrides = tiny_cfg + ["method=fedsb", "rounds=4", "num_clients=3", "clients_per_round=2",
                            f"train.persist_optimizer_state={str(persist).lower()}"]
    run_experiment(load_config(None, overrides), tmp_path / "run", progress=False)
    down = [(e["round"], e["client"], e["bytes"]) for e in read_ledger(tmp_path / "run" / "ledger.jsonl")
            if e["direction"] == "down"]
    seen, first, later = set(), [], []
    for rnd, cid, size in down:
        if rnd == 1:
            continue  # the gradient round: R and the head only
        (later if cid in seen else first).append(size)
        seen.add(cid)
    assert first and later and min(first) > max(later)  # a first message carries A and B as well
    cfg = load_config(None, overrides)
    rt = build_runtime(cfg, METHODS["fedsb"])
    basis_values = sum(2 * cfg.lora.rank * layer.base_layer.weight.shape[0]
                       for layer in latent_layers(rt.model).values())  # square q/k/v: A and B the same size
    assert min(first) - max(later) >= 4 * basis_values  # fp32 basis values, on top of the plain message


def test_the_export_is_a_plain_peft_adapter_with_the_trained_products(tiny_cfg, tmp_path):
    from peft import PeftModel

    from fedzip.models import load_base_model

    overrides = tiny_cfg + ["method=fedsb", "rounds=2"]
    cfg = load_config(None, overrides)
    run_experiment(cfg, tmp_path / "run", progress=False)
    cfg = METHODS["fedsb"].adjust_config(cfg)
    rt = build_runtime(cfg, METHODS["fedsb"])
    torch.manual_seed(cfg.seed)
    base = load_base_model(cfg.model.name, rt.task.kind, rt.task.num_labels, cfg.model.cache_dir)
    plain = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
    final = json.loads((tmp_path / "run" / "summary.json").read_text())["final_metrics"]
    again = rt.task.evaluate(plain, cfg.eval.batch_size, None, seed=cfg.seed)  # plain peft, no fedzip parametrisation
    assert again["accuracy"] == final["accuracy"] and again["loss"] == pytest.approx(final["loss"], rel=1e-5)


def test_client_level_dp_refuses_the_gradient_initialisation(tiny_cfg):
    cfg = load_config(None, tiny_cfg + ["method=fedsb", "privacy.mode=central", "privacy.noise_multiplier=1.0",
                                        "privacy.clip=1.0"])
    with pytest.raises(ConfigError, match="init: random"):
        METHODS["fedsb"].adjust_config(cfg)


def test_a_client_whose_reply_was_lost_gets_the_basis_again(tiny_cfg, tmp_path):
    cfg, rt, server, client = server_and_client(tiny_cfg + ["method=fedsb"])
    store = ClientStateStore(tmp_path / "store")
    play_round(cfg, rt, server, client, 1, store)  # the gradient round: the basis exists from here
    basis = set(client.down_optional(0, 2))
    assert basis <= set(server.configure(2, [0, 1])[0].tensors)
    play_round(cfg, rt, server, client, 2, store, cids=[0, 1], lost=[0])  # client 0's reply never arrived
    again = server.configure(3, [0, 1])
    assert basis <= set(again[0].tensors) and not basis & set(again[1].tensors)
