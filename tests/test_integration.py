"""Integration tests on the real packaged models (MiniLM, SmolLM2-135M GGUF), a few batches each."""

import json
import subprocess
import sys

import pytest

from fedzip.config import load_config
from fedzip.engine import run_experiment
from fedzip.report import write_report

pytestmark = pytest.mark.slow


def test_minilm_bbc_news_end_to_end_and_report(tmp_path):
    cfg = load_config("quickstart", ["rounds=2", "clients_per_round=2", "train.max_steps=2", "eval.max_examples=64",
                                     "data.max_test_examples=64"])
    summary = run_experiment(cfg, tmp_path / "qs", progress=False)
    assert summary["rounds_completed"] == 2
    cfg_json = json.loads((tmp_path / "qs" / "adapter" / "adapter_config.json").read_text())
    assert cfg_json["r"] == 8 and set(cfg_json["target_modules"]) == {"query", "key", "value"}
    # The exported adapter is the model that was evaluated: the base model plus the saved adapter, loaded
    # with peft alone, scores the run's final accuracy on the same test examples.
    from peft import PeftModel

    from fedzip.engine.runtime import build_task
    from fedzip.models import load_base_model

    task = build_task(cfg)
    base = load_base_model(cfg.model.name, task.kind, task.num_labels, cfg.model.cache_dir)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "qs" / "adapter"))
    again = task.evaluate(reloaded, cfg.eval.batch_size, None, seed=cfg.seed)
    assert again["eval_examples"] == 64
    assert again["accuracy"] == summary["final_metrics"]["accuracy"]
    report = write_report([tmp_path / "qs"], tmp_path / "rep")
    html = report.read_text()
    assert "data:image/png;base64," in html and "fedit" in html
    assert (tmp_path / "rep" / "accuracy_vs_mb.png").stat().st_size > 1000


def test_gguf_file_as_model_name_converts_once_and_trains(tmp_path, cache_dir):
    """A .gguf path (here the packaged SmolLM2 file itself) is converted once, keyed by hash, and trains."""
    from fedzip.models.load import file_sha256, resolve, smollm_gguf

    gguf = smollm_gguf()
    cfg = load_config(None, [f"model.name={gguf}", f"model.cache_dir={cache_dir}", "data.source=gsm8k",
                             "data.max_train_examples=24", "data.max_test_examples=8", "data.max_length=96",
                             "num_clients=2", "clients_per_round=2", "rounds=1", "partition.scheme=iid",
                             "train.max_steps=1", "train.batch_size=4", "lora.rank=4", "lora.train_head=false"])
    summary = run_experiment(cfg, tmp_path / "lm", progress=False)
    fm = summary["final_metrics"]
    assert 0.0 < fm["loss"] < 10.0 and fm["perplexity"] > 1.0
    adapter = json.loads((tmp_path / "lm" / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    # the converted folder is cached under the file's hash, and the packaged name resolves to the same one
    folder = resolve(str(gguf), cache_dir)
    assert folder.endswith(file_sha256(gguf)[:24]) and (tmp_path / "lm").exists()
    assert resolve("smollm2-135m", cache_dir) == folder


def test_cli_report_command(tmp_path, tiny_cfg):
    run_experiment(load_config(None, tiny_cfg + ["rounds=2"]), tmp_path / "a", progress=False)
    run_experiment(load_config(None, tiny_cfg + ["rounds=2", "method=ffa_lora"]), tmp_path / "b", progress=False)
    r = subprocess.run([sys.executable, "-m", "fedzip.cli", "report", str(tmp_path / "a"), str(tmp_path / "b"),
                        "--out", str(tmp_path / "rep")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ffa_lora" in r.stdout and (tmp_path / "rep" / "report.html").exists()
    bad = subprocess.run([sys.executable, "-m", "fedzip.cli", "report", str(tmp_path / "nothing")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_main_job_quickstart_beats_chance(tmp_path):
    """`fedzip run` with no arguments: the packaged quickstart, end to end, as a user runs it."""
    r = subprocess.run([sys.executable, "-m", "fedzip.cli"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "run directory:" in r.stdout and "report:" in r.stdout and "bytes up" in r.stdout
    summary = json.loads((tmp_path / "runs" / "quickstart" / "summary.json").read_text())
    assert summary["final_metrics"]["accuracy"] >= 0.85  # 5 balanced-ish classes: chance is about 0.2
    last = json.loads((tmp_path / "runs" / "quickstart" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["eval_examples"] == 445  # rounds use a fixed subset; the last round the whole test split
    assert summary["bytes_up_total"] > 0 and summary["bytes_down_total"] > 0
    assert (tmp_path / "runs" / "quickstart" / "report.html").exists()
