"""FLASC / CELLM: densities, global top-k, exact sparse bytes, baselines as switches, resume."""

import math

import pytest
import torch
from helpers import assert_resume_is_exact
from safetensors.torch import load_file

import fedzip.engine.client as client_mod
import fedzip.engine.rounds as sim
from fedzip.config import load_config
from fedzip.engine import run_experiment
from fedzip.engine.ledger import read_ledger
from fedzip.errors import ConfigError
from fedzip.methods.flasc import global_topk_masks
from fedzip.wire.payload import PREFIX


def run(tmp_path, overrides, name):
    return run_experiment(load_config(None, overrides), tmp_path / name, progress=False), tmp_path / name


@pytest.fixture
def spy(monkeypatch):
    sent, bodies = Spy(), []
    real = sim.encode

    def wrapper(message, codec):
        data = real(message, codec)
        sent.append((message, codec, len(data)))
        bodies.append(body_bytes(data))
        return data

    monkeypatch.setattr(sim, "encode", wrapper)  # the server's messages
    monkeypatch.setattr(client_mod, "encode", wrapper)  # the clients' replies
    sent.bodies = bodies
    return sent


class Spy(list):
    pass


def body_bytes(data: bytes) -> int:
    """Payload bytes after the header: values and positions (headers are the same size for any density)."""
    return len(data) - PREFIX.size - PREFIX.unpack_from(data)[1]


def test_global_topk_uses_one_threshold_over_all_tensors():
    t = {"a": torch.tensor([1.0, -5.0, 0.5]), "b": torch.tensor([[4.0, -0.1], [3.0, 2.0]])}
    m = global_topk_masks(t, 3)
    assert m["a"].tolist() == [False, True, False] and m["b"].tolist() == [[True, False], [True, False]]


def test_flasc_dense_with_sgd_lr1_equals_fedit(tmp_path, tiny_cfg):
    """With densities 1, FedAvg weighting and a server SGD step of 1, FLASC is exactly FedIT."""
    _, a = run(tmp_path, tiny_cfg, "fedit")
    _, b = run(tmp_path, tiny_cfg + ["method=flasc", "method_options={server_optimizer: sgd, server_lr: 1.0, "
                                     "weighting: samples}"], "flasc")
    ta, tb = load_file(str(a / "adapter/adapter_model.safetensors")), load_file(str(b / "adapter/adapter_model.safetensors"))
    assert all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)


def test_sparse_messages_carry_exactly_k_entries_and_cost_their_bytes(tmp_path, tiny_cfg, spy):
    summary, out = run(tmp_path, tiny_cfg + ["rounds=2", "method=cellm",
                                             "method_options={d_dl: 0.25, d_ul: 0.0625}"], "sparse")
    p = sum(t.numel() for t in spy[0][0].tensors.values())
    down = [m for m, c, _ in spy if "round" in m.meta]
    up = [m for m, c, _ in spy if "num_examples" in m.meta]
    assert list(down[0].tensors) == ["theta"] and list(up[0].tensors) == ["delta"]  # one flat vector each way
    for m in down:
        assert int((m.tensors["theta"] != 0).sum()) <= math.ceil(0.25 * p)
    for m in up:
        assert int((m.tensors["delta"] != 0).sum()) == math.ceil(0.0625 * p)
    assert all(c.startswith("nonzero+") for _, c, _ in spy)
    # the ledger records exactly the encoded lengths
    assert [e["bytes"] for e in read_ledger(out / "ledger.jsonl") if e["direction"] == "up"] == \
        [n for m, _, n in spy if "num_examples" in m.meta]
    sparse_up = sum(b for (m, _, _), b in zip(spy, spy.bodies) if "num_examples" in m.meta)
    dense_up = sum(4 * p for m in up)
    assert sparse_up < 0.1 * dense_up  # 1/16 of the values + Rice-coded positions
    sparse_down = sum(b for (m, _, _), b in zip(spy, spy.bodies) if "round" in m.meta)
    assert sparse_down < 0.35 * 4 * p * len(down)
    assert summary["bytes_up_total"] == sum(n for m, _, n in spy if "num_examples" in m.meta)
    assert all(n - b - PREFIX.size < 200 for (_, _, n), b in zip(spy, spy.bodies))  # one small header entry


def test_client_freeze_only_moves_masked_entries(tmp_path, tiny_cfg, spy):
    run(tmp_path, tiny_cfg + ["rounds=1", "method=flasc", "train.weight_decay=0.1",
                              "method_options={d_dl: 0.25, client_freeze: true}"], "cf")
    down = next(m for m, _, _ in spy if "round" in m.meta)
    up = [m for m, _, _ in spy if "num_examples" in m.meta]
    for m in up:
        assert (m.tensors["delta"][down.tensors["theta"] == 0] == 0).all()
        assert (m.tensors["delta"] != 0).any()


def test_server_freeze_keeps_the_round_one_mask(tmp_path, tiny_cfg, spy):
    run(tmp_path, tiny_cfg + ["rounds=3", "method=flasc", "method_options={d_dl: 0.25, server_freeze: true}"], "sf")
    downs = [m for m, _, _ in spy if "round" in m.meta]
    supports = [m.tensors["theta"] != 0 for m in downs]
    assert all(torch.equal(supports[0], s) for s in supports[1:])
    assert len(downs) == 3 and not torch.equal(downs[0].tensors["theta"], downs[2].tensors["theta"])


def test_density_schedule(tmp_path, tiny_cfg, spy):
    run(tmp_path, tiny_cfg + ["rounds=3", "method=flasc",
                              "method_options={d_ul: 0.5, gamma: 0.5, schedule_every: 1}"], "sched")
    p = sum(t.numel() for t in spy[0][0].tensors.values())
    ups = [m for m, _, _ in spy if "num_examples" in m.meta]
    counts = [int((m.tensors["delta"] != 0).sum()) for m in ups]
    assert counts == [math.ceil(0.5 * p)] * 2 + [math.ceil(0.25 * p)] * 2 + [math.ceil(0.125 * p)] * 2


def test_error_feedback_and_resume_are_exact(tmp_path, tiny_cfg):
    opts = tiny_cfg + ["rounds=4", "num_clients=2", "method=flasc",
                       "method_options={d_dl: 0.5, d_ul: 0.1, error_feedback: true}"]
    assert_resume_is_exact(tmp_path, opts, stop_after=2)
    residuals = load_file(str(next((tmp_path / "full" / "client_state" / "0").glob("r*.safetensors"))))
    assert any(k.startswith("ef::") for k in residuals) and any(v.abs().sum() > 0 for v in residuals.values())


def test_bad_options_name_the_key():
    with pytest.raises(ConfigError, match="method_options.d_ul"):
        load_config(None, ["method=flasc", "method_options={d_ul: 0}"])
    with pytest.raises(ConfigError, match="method_options.bogus"):
        load_config(None, ["method=flasc", "method_options={bogus: 1}"])
    with pytest.raises(ConfigError, match="method_options.d_ul"):
        load_config(None, ["method=fedit", "method_options={d_ul: 0.5}"])
    with pytest.raises(ConfigError, match="method_options.upload"):
        load_config(None, ["method=fedit", "method_options={upload: delta}"])


def test_a_method_without_options_refuses_any(monkeypatch):
    from fedzip.methods.fedkseed import FedKSeed

    monkeypatch.setattr(FedKSeed, "Options", None)
    with pytest.raises(ConfigError, match="takes no options"):
        load_config(None, ["method=fedkseed", "method_options={num_seeds: 8}"])


def test_evaluated_model_is_the_one_clients_receive(tmp_path, tiny_cfg, spy):
    """eval_masked (the paper's evaluation): the exported adapter is theta_s masked at d_dl, exactly what
    the next round's clients would be sent; eval_masked false exports the dense server model."""
    opts = "method_options={d_dl: 0.25, d_ul: 0.25, server_optimizer: sgd, server_lr: 1.0}"
    _, masked = run(tmp_path, tiny_cfg + ["rounds=2", "method=flasc", opts], "masked")
    p = sum(t.numel() for t in spy[0][0].tensors.values())
    _, dense = run(tmp_path, tiny_cfg + ["rounds=2", "method=flasc", opts[:-1] + ", eval_masked: false}"], "dense")
    tm = load_file(str(masked / "adapter/adapter_model.safetensors"))
    td = load_file(str(dense / "adapter/adapter_model.safetensors"))
    nonzero_m = sum(int((t != 0).sum()) for t in tm.values())
    nonzero_d = sum(int((t != 0).sum()) for t in td.values())
    assert nonzero_m == math.ceil(0.25 * p) < nonzero_d  # k entries kept, the rest of the dense model dropped
    flat_d = torch.cat([t.flatten() for t in td.values()])
    keep = global_topk_masks({"all": flat_d}, math.ceil(0.25 * p))["all"]
    assert torch.equal(torch.cat([t.flatten() for t in tm.values()]), flat_d * keep)  # the dense run's top-k


def bare_flasc(**options):
    """A Flasc server with only what its download mask reads (no model)."""
    from fedzip.methods.flasc import Flasc, FlascOptions

    f = Flasc.__new__(Flasc)
    f.opts, f.fixed_mask = FlascOptions(**options), None
    return f


def test_dense_head_download_masks_lora_only_and_sends_the_head_whole():
    g = torch.Generator().manual_seed(0)
    theta = {"l.q.lora_A.weight": torch.randn(4, 8, generator=g), "l.q.lora_B.weight": torch.randn(8, 4, generator=g),
             "classifier.weight": 1e-3 * torch.randn(3, 8, generator=g)}  # a small head: the shared mask drops it
    shared = bare_flasc(d_dl=0.25)
    shared.num_params = sum(t.numel() for t in theta.values())
    assert not shared.download_mask(theta, 1)["classifier.weight"].any()
    dense_head = bare_flasc(d_dl=0.25, dense_head_download=True)
    mask = dense_head.download_mask(theta, 1)
    assert mask["classifier.weight"].all()
    lora = {n: t for n, t in theta.items() if "lora" in n}
    assert sum(int(mask[n].sum()) for n in lora) == math.ceil(0.25 * 64)
    kept = torch.cat([theta[n][mask[n]].abs() for n in lora])
    dropped = torch.cat([theta[n][~mask[n]].abs() for n in lora])
    assert kept.min() >= dropped.max()  # the k largest LoRA magnitudes, one threshold over A and B


def test_dense_head_download_end_to_end_on_all_linear_lora(tmp_path, tiny_cfg, spy):
    run(tmp_path, tiny_cfg + ["rounds=2", "method=flasc", "lora.target_modules=all-linear",
                              "method_options={d_dl: 0.0625, dense_head_download: true}"], "dh")
    adapter = load_file(str(tmp_path / "dh" / "adapter/adapter_model.safetensors"))
    assert any("intermediate.dense.lora_A" in k for k in adapter)  # all-linear reaches the MLP projections
    head = sum(v.numel() for k, v in adapter.items() if "classifier" in k)
    p = sum(v.numel() for v in adapter.values())
    down = [m for m, _, _ in spy if "round" in m.meta]
    assert len(down) == 2  # one broadcast a round
    for m in down:
        assert math.ceil(0.0625 * (p - head)) <= int((m.tensors["theta"] != 0).sum()) <= math.ceil(0.0625 * (p - head)) + head
