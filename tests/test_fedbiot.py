"""FedBiOT, FedOT and offsite-tuning on an 8-layer tiny Llama with Alpaca-format data."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_resume_is_exact

from fedzip.config import load_config
from fedzip.engine import run_experiment
from fedzip.engine.runtime import build_runtime
from fedzip.engine.state import ClientStateStore
from fedzip.errors import ConfigError
from fedzip.methods import METHODS, ClientContext
from fedzip.models.emulator import emulator_indices, find_decoder_layers, make_split
from fedzip.wire import decode, encode


@pytest.fixture
def biot_cfg(cache_dir):
    return ["method=fedbiot", "model.name=tiny-llama-8", f"model.cache_dir={cache_dir}", "data.source=alpaca",
            "data.max_length=48", "data.max_test_examples=16", "num_clients=3", "clients_per_round=2", "rounds=2",
            "partition.scheme=iid", "lora.rank=4", "lora.alpha=8", "train.max_steps=2", "train.batch_size=4",
            "train.lr=0.01", "train.threads=1", "eval.batch_size=16",
            "method_options={prealign_steps: 2, align_steps: 2, align_batch: 2, public_max_examples: 32, prox_eps: 0.5, "
            "prealign_cache: false}"]


@pytest.mark.parametrize("n,a,drop", [(30, 2, 0.5), (30, 4, 0.2), (8, 2, 0.5), (12, 1, 0.5), (24, 2, 0.0)])
def test_emulator_keeps_first_and_last_teacher_layers_and_the_requested_count(n, a, drop):
    s = make_split(n, a, drop)
    teacher = list(range(n - a))
    assert s.top == tuple(range(n - a, n)) and s.teacher == tuple(teacher)
    assert s.emulated[0] == teacher[0] and s.emulated[-1] == teacher[-1]
    assert len(s.emulated) == round((n - a) * (1 - drop)) and list(s.emulated) == sorted(set(s.emulated))
    assert s.client_layers == s.emulated + s.top
    sandwich = make_split(n, 4, drop, "sandwich")
    assert sandwich.bottom == (0, 1) and sandwich.top == (n - 2, n - 1)
    assert sandwich.emulated[0] == 2 and sandwich.emulated[-1] == n - 3
    assert emulator_indices(28, 0.5) == [int(i * 27 / 13) for i in range(14)]


def _server(biot_cfg, extra=()):
    cfg = load_config(None, biot_cfg + list(extra))
    cls = METHODS[cfg.method]
    cfg = cls.adjust_config(cfg)
    server = cls(cfg, build_runtime(cfg, cls))
    server.init_global()
    client = cls(cfg, build_runtime(cfg, cls, with_model=False))  # a client never loads the full model
    return cfg, server, client


def _send(server, client, cid, rnd, tmp_path):
    msg = server.configure(rnd, [cid])[cid]
    received = decode(encode(msg, "fp32"), client.down_spec(cid, rnd), require_all=False)
    ctx = ClientContext(cid=cid, round=rnd, indices=client.rt.parts[cid], store=ClientStateStore(tmp_path / "store"),
                        seed=7)
    return received, ctx


def test_the_compressed_model_is_the_full_models_layers_and_clients_never_load_the_full_model(biot_cfg, tmp_path):
    cfg, server, client = _server(biot_cfg)
    assert client.rt.model is None
    received, ctx = _send(server, client, 0, 1, tmp_path)
    client.fit(ctx, received)
    _, _, full_layers = find_decoder_layers(server.rt.model)
    _, _, client_layers = find_decoder_layers(client.compressed.model)
    assert len(client_layers) == len(server.split.client_layers) < len(full_layers)
    for pos, i in enumerate(server.split.client_layers):  # frozen weights: exactly the teacher's/adapter's
        ours = {k: v for k, v in client_layers[pos].state_dict().items() if "lora_" not in k}
        theirs = {k: v for k, v in full_layers[i].state_dict().items() if "lora_" not in k}
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_client_whose_first_message_or_reply_was_lost_gets_the_compressed_model_again(biot_cfg, tmp_path):
    cfg, server, client = _server(biot_cfg)
    first = server.configure(1, [0, 1])
    assert all(k in first[c].tensors for c in (0, 1) for k in server.base)
    received, ctx = _send(server, client, 1, 1, tmp_path)  # only client 1's reply arrives (0's message was lost)
    server.aggregate(1, {1: decode(encode(client.fit(ctx, received), "fp32"), server.up_spec(1, 1))})
    again = server.configure(2, [0, 1])
    assert all(k in again[0].tensors for k in server.base) and not any(k in again[1].tensors for k in server.base)
    state = server.server_state()
    restored = type(server)(cfg, server.rt)
    restored.init_global()
    restored.load_server_state(state)  # and so after a resume
    assert set(restored.configure(2, [0, 1])[0].tensors) == set(again[0].tensors)


def test_client_training_changes_only_the_adapters_lora(biot_cfg, tmp_path):
    cfg, server, client = _server(biot_cfg)
    received, ctx = _send(server, client, 1, 1, tmp_path)
    reply = client.fit(ctx, received)
    compressed = client.compressed  # the client part: what a node holds
    params = compressed.params
    changed = {n for n in compressed.adapter if not torch.equal(params[n], received.tensors[n])}
    assert changed and all(".lora_B." in n or ".lora_A." in n for n in changed)
    # against the server's own tensors (the client adopted the received ones, so those would move with it)
    assert all(torch.equal(params[n], server.params[n]) for n in compressed.emulator)  # emulator LoRA fixed
    own = compressed.base  # the client model's live frozen tensors, by wire name
    assert own.keys() == server.base.keys() and all(torch.equal(own[k], server.base[k]) for k in own)
    assert set(reply.tensors) == set(compressed.adapter)  # only the adapter's LoRA travels up


def test_server_alignment_changes_only_the_emulators_lora(biot_cfg):
    cfg, server, _ = _server(biot_cfg)
    model = server.rt.model
    before_full = {k: v.clone() for k, v in model.state_dict().items()}
    before_emu = {k: v.clone() for k, v in server.emulator.state_dict().items()}
    loss = server.align(3)
    assert np.isfinite(loss)
    after_full, after_emu = model.state_dict(), server.emulator.state_dict()
    assert all(torch.equal(before_full[k], after_full[k]) for k in before_full)  # teacher and adapter untouched
    moved = {k for k in before_emu if not torch.equal(before_emu[k], after_emu[k])}
    assert moved and all("lora_" in k for k in moved)


def test_adapfu_plugs_the_clients_adapter_into_the_full_model_unchanged(biot_cfg, tmp_path):
    cfg, server, client = _server(biot_cfg)
    received, ctx = _send(server, client, 2, 1, tmp_path)
    reply = decode(encode(client.fit(ctx, received), "fp32"), server.up_spec(2, 1))
    server.aggregate(1, {2: reply})  # one client: its adapter is the new global adapter
    full = server.global_tensors()
    s = server.split
    for name, t in reply.tensors.items():
        pos = server._position(name)
        full_name = name.replace(f"layers.{pos}.", f"layers.{s.client_layers[pos]}.", 1)
        assert torch.equal(full[full_name], t), full_name
    exported = {n: t for n, t in full.items() if server._position(n) not in s.top}
    assert all(float(t.abs().sum()) == 0 for n, t in exported.items() if ".lora_B." in n)  # teacher LoRA never trained


def test_fedbiot_runs_end_to_end_counts_the_compressed_model_once_and_resumes_exactly(biot_cfg, tmp_path):
    full, _ = assert_resume_is_exact(tmp_path, biot_cfg + ["rounds=3"])
    run = Path(full["run_dir"])
    ledger = [json.loads(x) for x in (run / "ledger.jsonl").read_text().splitlines()]
    downs = [e for e in ledger if e["direction"] == "down"]
    first = [e for e in downs if e["kind"] == "update+compressed_model"]
    assert sorted({e["client"] for e in first}) == sorted({e["client"] for e in downs})  # once per client
    assert len(first) == len({e["client"] for e in first})
    assert min(e["bytes"] for e in first) > 50 * max(e["bytes"] for e in downs if e["kind"] == "update")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"emu_loss", "loss", "align_loss"} <= set(rows[-1])  # AdapEmu beside AdapFu
    # export: a standard peft adapter for the full model (AdapFu), loadable by a transformers user
    from peft import PeftModel

    from fedzip.models.load import load_base_model

    cache = next(o.split("=", 1)[1] for o in biot_cfg if o.startswith("model.cache_dir="))
    loaded = PeftModel.from_pretrained(load_base_model("tiny-llama-8", "causal_lm", cache_dir=cache), str(run / "adapter"))
    b = {n: p for n, p in loaded.named_parameters() if ".lora_B." in n}
    assert len(b) == 8 * len({n.split(".layers.")[1].split(".", 1)[1] for n in b})  # LoRA on all 8 layers
    assert any(float(p.abs().sum()) > 0 for n, p in b.items() if ".layers.7." in n)  # the trained adapter


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["fedbiot", "fedot", "offsite_tuning"])
def test_on_a_gpu_the_emulator_and_the_clients_model_train_there_and_payloads_are_unchanged(biot_cfg, tmp_path, method):
    overrides = [o for o in biot_cfg if not o.startswith("method=")] + [f"method={method}", "train.optimizer=sgd"]
    cpu = run_experiment(load_config(None, overrides), tmp_path / "cpu", progress=False)
    gpu = run_experiment(load_config(None, [*overrides, "train.device=cuda"]), tmp_path / "gpu", progress=False)
    assert cpu["device"] == "cpu" and gpu["device"] != "cpu"
    assert gpu["bytes_down_total"] == cpu["bytes_down_total"]  # compressed model + LoRA: same shapes, same codec
    messages = sum(1 for _ in (tmp_path / "cpu" / "ledger.jsonl").read_text().splitlines()) // 2
    assert abs(gpu["bytes_up_total"] - cpu["bytes_up_total"]) <= 16 * messages  # JSON train loss digits
    assert abs(gpu["final_metrics"]["loss"] - cpu["final_metrics"]["loss"]) < 0.05
    if method == "fedbiot":
        assert abs(gpu["final_metrics"]["emu_loss"] - cpu["final_metrics"]["emu_loss"]) < 0.05


@pytest.mark.parametrize("method", ["fedot", "offsite_tuning"])
def test_baselines_use_the_sandwich_split_and_a_fixed_emulator(biot_cfg, tmp_path, method):
    overrides = [o for o in biot_cfg if not o.startswith("method")] + [f"method={method}", "rounds=1"]
    summary = run_experiment(load_config(None, overrides), tmp_path / method, progress=False)
    desc = json.loads((Path(summary["run_dir"]) / "method.json").read_text())
    assert desc["adapter_bottom"] == [0, 1] and desc["adapter_top"] == [6, 7]
    assert summary["num_clients"] == (1 if method == "offsite_tuning" else 3)
    rows = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert "align_loss" not in rows[0]


def test_fedbiot_rejects_a_classification_task_and_a_split_with_no_teacher(biot_cfg, cache_dir):
    with pytest.raises(ConfigError):
        METHODS["fedbiot"].adjust_config(load_config(None, biot_cfg + ["model.task=classification"]))
    cfg = load_config(None, biot_cfg + ["method_options={adapter_layers: 7}"])
    with pytest.raises(ConfigError, match="no teacher"):
        METHODS["fedbiot"](cfg, None)


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gemma", "llama"])
def test_the_split_finds_the_layers_of_each_decoder_family_and_runs_swapped(family):
    """No family is hard-coded: tiny random GPT-2, Qwen2, Gemma and Llama models split and run as emulators."""
    import copy

    import transformers as tf

    from fedzip.models.emulator import swapped_layers

    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=8, num_attention_heads=2, intermediate_size=32)
    config = {"gpt2": lambda: tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=8, n_head=2),
              "qwen2": lambda: tf.Qwen2Config(num_key_value_heads=2, **common),
              "gemma": lambda: tf.GemmaConfig(num_key_value_heads=2, head_dim=8, **common),
              "llama": lambda: tf.LlamaConfig(num_key_value_heads=2, **common)}[family]()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    _, _, layers = find_decoder_layers(model)
    assert len(layers) == 8
    s = make_split(8, 2, 0.5)
    emu = [copy.deepcopy(layers[i]) for i in s.emulated]
    x = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        full = model(input_ids=x).logits
        with swapped_layers(model, emu + [layers[i] for i in s.top]) as m:
            small = m(input_ids=x).logits
            assert len(find_decoder_layers(m)[2]) == len(s.client_layers)
            m.generate(input_ids=x[:1], max_new_tokens=2, do_sample=False)  # the KV cache follows the new stack
        assert torch.equal(model(input_ids=x).logits, full)  # the full model is back as it was
    assert small.shape == full.shape and not torch.allclose(small, full)


@pytest.mark.parametrize("n,drop,bottom", [(28, 0.5, 2), (28, 0.2, 2), (12, 0.5, 3), (5, 0.5, 3)])
def test_keep_bottom_keeps_the_first_teacher_layers_and_the_count(n, drop, bottom):
    kept = emulator_indices(n, drop, bottom)
    count = max(2, round(n * (1 - drop)))
    assert len(kept) == count and kept == sorted(set(kept)) and kept[-1] == n - 1
    assert kept[:min(bottom, count - 1)] == list(range(min(bottom, count - 1)))
    assert emulator_indices(n, drop, 0) == emulator_indices(n, drop)


def test_prealignment_reports_both_losses_and_stops_at_the_gate(biot_cfg):
    gated = [o.replace("prealign_steps: 2,", "prealign_steps: 8, prealign_check_every: 2, prealign_margin: 1000.0,")
             for o in biot_cfg]
    _, server, _ = _server(gated)
    report = server.prealignment
    assert report["prealign_steps_run"] == 2 and report["prealign_gate_met"]  # a margin that always holds
    assert report["public_loss_full"] > 0 and report["public_loss_emulator_before"] > 0
    # the one check that ran is the curve's one point, and it is the loss the gate was judged on
    assert report["prealign_curve"] == [[2, report["public_loss_emulator_after"]]]
    assert server.describe()["prealignment"] == report
    ungated = [o.replace(" prealign_margin: 1000.0,", "") for o in gated]
    _, server, _ = _server(ungated)  # no gate: the whole budget runs, and no verdict is claimed
    assert server.prealignment["prealign_steps_run"] == 8 and "prealign_gate_met" not in server.prealignment
    assert server.prealignment["public_loss_full"] == report["public_loss_full"]


def test_an_interrupted_prealignment_continues_where_it_stopped_and_a_finished_one_is_reused(biot_cfg, tmp_path,
                                                                                             monkeypatch):
    import fedzip.paths
    from fedzip.methods.fedbiot import FedBiOT

    monkeypatch.setattr(fedzip.paths, "cache_root", lambda cache_dir=None: tmp_path / "cache")
    real_loss, real_align = FedBiOT.public_loss, FedBiOT.align
    # a gate that is never met, so that every chunk of 2 steps runs and is saved
    monkeypatch.setattr(FedBiOT, "public_loss", lambda self, emulated: real_loss(self, emulated) + 100 * emulated)
    calls, runtime = [], {}

    def counted(self, steps):
        calls.append(steps)
        return real_align(self, steps)

    monkeypatch.setattr(FedBiOT, "align", counted)

    def server(steps, cache=True):  # the server alone: pre-alignment is all it does here
        cfg = load_config(None, [o.replace("prealign_steps: 2,", f"prealign_steps: {steps}, prealign_check_every: 2, "
                                                                  "prealign_margin: 0.5, public_eval_examples: 8,")
                                 .replace("prealign_cache: false", f"prealign_cache: {str(cache).lower()}")
                                 for o in biot_cfg])
        if not runtime:  # one model for all: pre-alignment changes only the emulator, a copy of its layers
            runtime["rt"] = build_runtime(cfg, FedBiOT)
        method = FedBiOT(cfg, runtime["rt"])
        calls.clear()
        method.init_global()
        return method

    def same(a, b):
        assert a.prealignment == b.prealignment and a.align_calls == b.align_calls
        assert all(torch.equal(a.params[n], b.params[n]) for n in a.emulator_names)

    reference = server(6, cache=False)  # aligned in one go, three chunks
    assert reference.prealignment["prealign_steps_run"] == 6 and calls == [2, 2, 2]
    assert reference.prealign_steps_here == 6

    def die_in_second_chunk(self, steps):
        if len(calls) == 1:
            raise KeyboardInterrupt
        return counted(self, steps)

    monkeypatch.setattr(FedBiOT, "align", die_in_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        server(6)
    monkeypatch.setattr(FedBiOT, "align", counted)
    resumed = server(6)
    assert calls == [2, 2] and resumed.prealign_steps_here == 4  # the first chunk came from the cache
    same(resumed, reference)  # bit for bit, and the next round's alignment batches are the same too
    reused = server(6)
    assert calls == [] and reused.prealign_steps_here == 0  # finished: nothing to align
    same(reused, reference)
    shorter = server(4)  # a shorter budget cannot come out of a longer alignment: it aligns afresh
    assert calls == [2, 2] and shorter.prealignment["prealign_steps_run"] == 4
    assert server(6) and calls == []  # and left the longer one in the cache
    longer = server(8)  # a longer budget continues the finished one
    assert calls == [2] and longer.prealignment["prealign_steps_run"] == 8
    assert longer.prealignment["prealign_curve"][:3] == reference.prealignment["prealign_curve"]

    def entry(seed=0, **options):  # the cache entry another set-up would use, without building it
        other = copy.copy(reused)
        other.cfg, other.opts = reused.cfg.model_copy(update={"seed": seed}), reused.opts.model_copy(update=options)
        return other._prealign_cache_file()

    assert entry().exists()
    # what the per-round alignment and the clients do is not part of it, nor the budget of a gated one;
    # the seed, the construction and the gate are
    assert entry(align_steps=3, prox_eps=0.1, prealign_steps=10) == entry()
    assert entry(seed=1) != entry() and entry(drop=0.25) != entry() and entry(prealign_margin=0.4) != entry()


def test_lm_only_alignment_moves_the_emulator_and_all_zero_weights_are_refused(biot_cfg):
    lm_only = biot_cfg + ["method_options.align_l2_weight=0", "method_options.align_lambda=0",
                          "method_options.align_lm_weight=1"]
    _, server, _ = _server(lm_only)
    before = {n: p.detach().clone() for n, p in server.params.items() if n in server.emulator_names}
    loss = server.align(2)
    assert np.isfinite(loss) and any(not torch.equal(before[n], server.params[n]) for n in before)
    with pytest.raises(ConfigError, match="alignment weight"):
        _server(lm_only[:-1] + ["method_options.align_lm_weight=0"])


def test_the_authors_proximal_term_leaves_training_as_without_one(tmp_path, biot_cfg):
    """Without its gradient (the authors' detached weights) the proximal term changes nothing."""
    off = [o.replace("prox_eps: 0.5", "prox_eps: 0.0") for o in biot_cfg]
    detached = biot_cfg + ["method_options.prox_gradient=false"]
    runs = {name: run_experiment(load_config(None, cfg), tmp_path / name, progress=False)
            for name, cfg in (("off", off), ("detached", detached), ("ours", biot_cfg))}
    assert runs["detached"]["final_metrics"] == runs["off"]["final_metrics"]
    assert runs["ours"]["final_metrics"] != runs["off"]["final_metrics"]
