import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fedzip.engine.client as client_mod
import fedzip.engine.rounds as sim
from fedzip.config import load_config
from fedzip.engine import run_experiment
from fedzip.engine.ledger import read_ledger


def run(tmp_path, overrides, name="run", **kw):
    cfg = load_config(None, overrides)
    return run_experiment(cfg, tmp_path / name, progress=False, **kw), tmp_path / name


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_ledger_equals_encoded_payload_lengths(tmp_path, tiny_cfg, monkeypatch):
    lengths = []
    real_encode = sim.encode

    def spy(message, codec):
        data = real_encode(message, codec)
        lengths.append(len(data))
        return data

    monkeypatch.setattr(sim, "encode", spy)  # the server's downlink
    monkeypatch.setattr(client_mod, "encode", spy)  # the clients' replies
    summary, out = run(tmp_path, tiny_cfg)
    ledger = read_ledger(out / "ledger.jsonl")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # down messages are encoded once a round and counted once per client
    per_round = 1 + 2  # one shared downlink encoding + one reply per sampled client
    assert len(lengths) == 3 * per_round
    it = iter(lengths)
    expected = []
    for _ in range(3):
        down = next(it)
        ups = [next(it) for _ in range(2)]
        expected += [down, ups[0], down, ups[1]]
    assert [e["bytes"] for e in ledger] == expected
    assert [e["direction"] for e in ledger] == ["down", "up"] * 6
    up_in_ledger = sum(e["bytes"] for e in ledger if e["direction"] == "up")
    assert sum(r["bytes_up"] for r in rows) == summary["bytes_up_total"] == up_in_ledger
    assert summary["bytes_down_total"] == sum(e["bytes"] for e in ledger if e["direction"] == "down")
    assert summary["rounds_completed"] == 3 and "accuracy" in summary["final_metrics"]
    assert (out / "partition.json").exists() and (out / "config.yaml").exists()


def test_fp16_halves_bytes_in_the_ledger(tmp_path, tiny_cfg):
    s32, out = run(tmp_path, tiny_cfg + ["rounds=1"], "a")
    s16, _ = run(tmp_path, tiny_cfg + ["rounds=1", "wire.up=fp16", "wire.down=fp16"], "b")
    p = sum(t.numel() for t in adapter_tensors(out).values())  # elements exchanged per message
    messages = 2  # per direction: 2 clients
    # headers differ only in a few digits; the bodies shrink by exactly 2 bytes per element
    for key in ("bytes_up_total", "bytes_down_total"):
        assert abs((s32[key] - s16[key]) - 2 * p * messages) <= 16 * messages


def test_resume_gives_the_same_adapter(tmp_path, tiny_cfg):
    opts = tiny_cfg + ["rounds=4", "train.persist_optimizer_state=true", "train.optimizer=sgd"]
    full, full_dir = run(tmp_path, opts, "full")
    part, part_dir = run(tmp_path, opts, "part", stop_after=2)
    assert part["interrupted_after"] == 2 and not (part_dir / "summary.json").exists()
    # simulate a crash mid-round 3: a client state version and stray ledger lines that never completed
    with open(part_dir / "ledger.jsonl", "a") as f:
        f.write(json.dumps({"round": 3, "client": 0, "direction": "down", "bytes": 1}) + "\n")
    resumed = run_experiment(load_config(None, opts), part_dir, resume=True, progress=False)
    a, b = adapter_tensors(full_dir), adapter_tensors(part_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final_metrics"] == full["final_metrics"]
    assert resumed["bytes_up_total"] == full["bytes_up_total"]
    assert read_ledger(part_dir / "ledger.jsonl") == read_ledger(full_dir / "ledger.jsonl")
    assert any((part_dir / "client_state").iterdir())  # optimizer state lives on disk


def test_resume_refuses_a_different_config(tmp_path, tiny_cfg):
    _, out = run(tmp_path, tiny_cfg + ["rounds=2"], "x", stop_after=1)
    from fedzip.errors import RunDirError
    with pytest.raises(RunDirError, match="differs"):
        run_experiment(load_config(None, tiny_cfg + ["rounds=2", "seed=9"]), out, resume=True, progress=False)


def test_resume_accepts_a_run_whose_config_predates_keys_added_since(tmp_path, tiny_cfg):
    import yaml

    full, _ = run(tmp_path, tiny_cfg + ["rounds=2"], "full")
    _, out = run(tmp_path, tiny_cfg + ["rounds=2"], "old", stop_after=1)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["eval"]["personal_clients"], saved["lora"]["rslora"]  # as an older fedzip wrote it
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    resumed = run_experiment(load_config(None, tiny_cfg + ["rounds=2"]), out, resume=True, progress=False)
    assert resumed["final_metrics"] == full["final_metrics"]
    saved["eval"]["no_such_key"] = 1
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    from fedzip.errors import RunDirError
    with pytest.raises(RunDirError, match="not a config this fedzip reads"):
        run_experiment(load_config(None, tiny_cfg + ["rounds=2"]), out, resume=True, progress=False)


def test_saved_adapter_loads_with_peft_and_reproduces_evaluation(tmp_path, tiny_cfg):
    from peft import PeftModel

    from fedzip.engine.runtime import build_task
    from fedzip.models import load_base_model

    summary, out = run(tmp_path, tiny_cfg)
    cfg = load_config(None, tiny_cfg)
    task = build_task(cfg)
    base = load_base_model(cfg.model.name, "classification", task.num_labels, cfg.model.cache_dir)
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    metrics = task.evaluate(model, cfg.eval.batch_size)
    assert metrics["accuracy"] == pytest.approx(summary["final_metrics"]["accuracy"])
    assert metrics["loss"] == pytest.approx(summary["final_metrics"]["loss"], rel=1e-5)


def test_training_improves_on_toy_data(tmp_path, tiny_cfg):
    summary, out = run(tmp_path, tiny_cfg + ["rounds=6", "train.max_steps=8", "clients_per_round=4"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_ffa_lora_sends_only_b_and_keeps_a(tmp_path, tiny_cfg):
    summary, out = run(tmp_path, tiny_cfg + ["method=ffa_lora", "rounds=2"])
    fedit, fout = run(tmp_path, tiny_cfg + ["rounds=2"], "fedit")
    a, f = adapter_tensors(out), adapter_tensors(fout)
    a_keys = [k for k in a if "lora_A" in k]
    # A is never trained: it equals the seeded init, which is what FedIT started from
    from fedzip.engine.runtime import build_model, build_task
    from fedzip.methods import METHODS
    cfg = load_config(None, tiny_cfg)
    init = {k: v for k, v in build_model(cfg, METHODS["fedit"], build_task(cfg)).named_parameters() if "lora_A" in k}
    init = {k.replace("base_model.model.", "").replace(".default", ""): v for k, v in init.items()}
    assert a_keys
    for k in a_keys:
        assert torch.equal(a[k], init[k.replace("base_model.model.", "")])
    assert any(not torch.equal(f[k], init[k.replace("base_model.model.", "")]) for k in a_keys)  # FedIT trains A
    assert summary["bytes_up_total"] < 0.75 * fedit["bytes_up_total"]
    ledger = read_ledger(out / "ledger.jsonl")
    assert ledger[0]["bytes"] < read_ledger(fout / "ledger.jsonl")[0]["bytes"]


def test_full_finetuning_and_centralised(tmp_path, tiny_cfg):
    full, fout = run(tmp_path, tiny_cfg + ["method=full_ft", "rounds=1"], "full")
    lora, _ = run(tmp_path, tiny_cfg + ["rounds=1"], "lora")
    assert full["bytes_up_total"] > 20 * lora["bytes_up_total"]
    assert (fout / "model" / "model.safetensors").exists()
    central, cout = run(tmp_path, tiny_cfg + ["method=centralised", "rounds=1"], "central")
    ledger = read_ledger(cout / "ledger.jsonl")
    assert {e["client"] for e in ledger} == {0} and central["num_clients"] == 1
    stats = json.loads((cout / "partition.json").read_text())
    assert stats["clients"][0]["num_examples"] == stats["sizes"]["max"] and stats["num_clients"] == 1


def test_sampling_is_seeded_and_without_replacement():
    a = sim.sample_clients(0, 5, 100, 10)
    assert a == sim.sample_clients(0, 5, 100, 10) and len(set(a)) == 10
    assert a != sim.sample_clients(0, 6, 100, 10)


def test_rejected_reply_is_logged_not_fatal(tmp_path, tiny_cfg, monkeypatch):
    from fedzip.methods.fedit import FedIT
    from fedzip.wire import Message

    real_fit = FedIT.fit

    def evil_fit(self, client, message):
        reply = real_fit(self, client, message)
        if client.cid == sim.sample_clients(0, 1, 4, 2)[0]:
            reply = Message({"bogus": torch.zeros(3)}, reply.meta)
        return reply

    monkeypatch.setattr(FedIT, "fit", evil_fit)
    summary, out = run(tmp_path, tiny_cfg + ["rounds=1"])
    row = json.loads((out / "metrics.jsonl").read_text())
    assert len(row["rejected"]) == 1 and summary["rounds_completed"] == 1


def test_resume_recovers_from_a_crash_during_the_checkpoint_swap(tmp_path, tiny_cfg):
    opts = tiny_cfg + ["rounds=3"]
    full, fdir = run(tmp_path, opts, "full")
    run(tmp_path, opts, "part", stop_after=2)
    part = tmp_path / "part"
    (part / "checkpoints").rename(part / "checkpoints.old")  # the crash: old moved aside, new not yet in place
    run_experiment(load_config(None, opts), part, resume=True, progress=False)
    a, b = adapter_tensors(fdir), adapter_tensors(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_device_resolution_is_explicit(tiny_cfg, monkeypatch):
    from fedzip.engine.runtime import resolve_device
    from fedzip.errors import ConfigError
    from fedzip.methods import METHODS

    fedit = METHODS["fedit"]
    cpu_only = type("CpuOnly", (fedit,), {"name": "cpu_only", "runs_on_accelerator": False})  # e.g. a plug-in
    cfg = load_config(None, tiny_cfg + ["train.device=auto"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(cfg, fedit) == torch.device("cpu")  # auto falls back to the CPU
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        resolve_device(load_config(None, tiny_cfg + ["train.device=cuda"]), fedit)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device(cfg, cpu_only) == torch.device("cpu")  # auto: a CPU-only method stays on the CPU
    with pytest.raises(ConfigError, match="runs on the CPU only"):
        resolve_device(load_config(None, tiny_cfg + ["train.device=cuda"]), cpu_only)
    with pytest.raises(ConfigError, match="only 1 CUDA device"):
        resolve_device(load_config(None, tiny_cfg + ["train.device=cuda:1"]), fedit)
    assert resolve_device(cfg, fedit) == torch.device("cuda")
    # every built-in method family accepts a GPU
    assert all(m.runs_on_accelerator for m in METHODS.values())


GPU_FAMILIES = {  # method -> extra overrides; FedBiOT's GPU test is in test_fedbiot.py (a causal LM)
    "fedit": [], "ffa_lora": ["method=ffa_lora"],
    "flasc": ["method=flasc", "method_options={d_dl: 0.25, d_ul: 0.25, server_optimizer: sgd, server_lr: 1.0}"],
    "hafl": ["method=hafl", "lora.rank=4", "lora.alpha=4",
             "method_options={tiers: [{rank: 2, share: 0.5}, {rank: 4, share: 0.5}]}"],
    "cgfedllm": ["method=cgfedllm", "lora.train_head=false", "rounds=4",
                 "method_options={tgap_rounds: 2, ae_epochs: 3, ae_lr: 0.001, ae_gate: warn}"],
}


def test_the_gpu_matrix_configs_are_valid_here(tiny_cfg):
    """The GPU tests are skipped without CUDA; their configs are checked everywhere, so they cannot rot unseen."""
    for extra in GPU_FAMILIES.values():
        load_config(None, tiny_cfg + ["rounds=3", "train.device=cpu"] + extra)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", list(GPU_FAMILIES))
def test_cuda_run_matches_cpu_run(tmp_path, tiny_cfg, method, monkeypatch):
    """Same payloads and nearly the same adapter on the GPU as on the CPU: only where it trains differs.

    Dropout draws from a different generator on each device, so it is switched off here; SGD, unlike
    Adam, does not magnify the float differences of near-zero gradients."""
    import fedzip.engine.runtime as runtime

    real_load = runtime.load_base_model

    def load_without_dropout(*args, **kwargs):
        model = real_load(*args, **kwargs)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        return model

    monkeypatch.setattr(runtime, "load_base_model", load_without_dropout)
    extra = ["train.optimizer=sgd", "train.lr=0.05", *GPU_FAMILIES[method]]
    cpu, cpu_dir = run(tmp_path, tiny_cfg + extra, "cpu")
    gpu, gpu_dir = run(tmp_path, tiny_cfg + extra + ["train.device=cuda"], "gpu")
    assert gpu["device"] != "cpu" and cpu["device"] == "cpu"
    messages = sum(1 for _ in (cpu_dir / "ledger.jsonl").read_text().splitlines()) // 2
    # Replies carry JSON numbers (train loss; CG-FedLLM's scale; HAFL's component masks): their digits, and
    # so a few bytes a message, may differ. Tensors have the same shapes and codecs, so the same size.
    assert abs(gpu["bytes_up_total"] - cpu["bytes_up_total"]) <= 16 * messages
    assert abs(gpu["bytes_down_total"] - cpu["bytes_down_total"]) <= (0 if method != "hafl" else 16 * messages)
    rows = [json.loads(x) for x in (gpu_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(m.get("cuda_peak_bytes", 0) > 0 for r in rows for m in r["client_memory"].values())
    if method in ("hafl", "cgfedllm"):  # component choice / the learned codec amplify float differences
        assert abs(gpu["final_metrics"]["loss"] - cpu["final_metrics"]["loss"]) < 0.05
        return
    a, b = adapter_tensors(cpu_dir), adapter_tensors(gpu_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-3), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_autocast_on_a_gpu_trains_like_fp32_with_the_same_payload_sizes(tmp_path, tiny_cfg):
    extra = ["train.optimizer=sgd", "train.lr=0.05", "train.device=cuda"]
    fp32, _ = run(tmp_path, tiny_cfg + extra, "fp32")
    bf16, bf16_dir = run(tmp_path, tiny_cfg + extra + ["train.precision=bf16"], "bf16")
    assert bf16["bytes_down_total"] == fp32["bytes_down_total"]  # weights and payloads stay fp32
    assert abs(bf16["final_metrics"]["loss"] - fp32["final_metrics"]["loss"]) < 0.1
    assert all(t.dtype == torch.float32 for t in adapter_tensors(bf16_dir).values())


def test_server_state_file_keeps_groups_and_facts(tmp_path):
    from safetensors.torch import save_file

    from fedzip.errors import FedzipError
    from fedzip.methods.state import ServerState, load_server_state, save_server_state

    state = ServerState({"global": {"a.lora_A.weight": torch.ones(2, 3)}, "optimizer": {"a.step": torch.tensor([4.0])}},
                        {"next_round": 7, "sent_model": [0, 3]})
    save_server_state(state, tmp_path / "s.safetensors")
    back = load_server_state(tmp_path / "s.safetensors")
    assert back.facts == {"next_round": 7, "sent_model": [0, 3]} and isinstance(back.facts["next_round"], int)
    assert set(back.tensors) == {"global", "optimizer"}
    assert torch.equal(back.group("global")["a.lora_A.weight"], torch.ones(2, 3))
    assert back.group("missing") == {}
    with pytest.raises(ValueError, match="without '/'"):
        save_server_state(ServerState({"a/b": {}}), tmp_path / "bad.safetensors")
    save_file({"g::x": torch.zeros(1)}, str(tmp_path / "old.safetensors"))  # the flat layout of older checkpoints
    with pytest.raises(FedzipError, match="older fedzip"):
        load_server_state(tmp_path / "old.safetensors")
