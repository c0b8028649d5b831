import json
import subprocess
import sys

import pytest

from fedzip.cli import main
from fedzip.config import dump_config, load_config
from fedzip.errors import ConfigError


def test_quickstart_loads_and_overrides():
    cfg = load_config(None, ["rounds=5", "lora.rank=8", "data.remove=[headers, quotes]"])
    assert cfg.rounds == 5 and cfg.lora.rank == 8 and cfg.data.remove == ["headers", "quotes"]
    assert load_config("quickstart").model.name == "minilm"
    assert load_config("quickstart", ["train.lr=1e-4"]).train.lr == pytest.approx(1e-4)


@pytest.mark.parametrize("override,key", [
    ("lora.rank=0", "lora.rank"),
    ("lora.alpha=0", "lora.alpha"),
    ("lora.alpha=-1", "lora.alpha"),
    ("clients_per_round=20", "clients_per_round"),
    ("lora.rnak=4", "lora.rnak"),
    ("rounds=many", "rounds"),
    ("wire.up=gzip9", "wire.up"),
    ("method=nope", "method"),
    ("data.source=imagenet", "data.source"),
    ("train.device=gpu", "train.device"),
    ("train.device=cuda:x", "train.device"),
    ("train.precision=bf16", "train.precision"),  # autocast needs a GPU; the quickstart trains on the CPU
    ("train.lr_schedule=linear", "train.lr_schedule"),
    ("lora.target_modules=all_linear", "lora.target_modules"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", [override])
    assert key in str(err.value) or key.split(".")[-1] in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_dump_is_reloadable(tmp_path):
    cfg = load_config("b1_fedit", ["seed=3"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_cli_bad_config_exits_2_with_one_line(capsys):
    assert main(["run", "--set", "lora.rank=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lora.rank" in err and err.startswith("fedzip: error:")


def test_cli_subprocess_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fedzip.cli", "run", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0 and "not found" in r.stderr


def test_a_missing_extra_is_one_error_line_that_names_it(monkeypatch, capsys, tmp_path, tiny_cfg):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("flwr", "matplotlib") else real(name, *a))
    assert main(["deploy", "local", "--nodes", "1"]) == 2
    assert "pip install 'fedzip[flower]'" in capsys.readouterr().err
    # without matplotlib a run still ends with a report: the table alone, and a line saying how to get plots
    assert main(["run", "--out", str(tmp_path / "r"), "--quiet", *[w for kv in tiny_cfg for w in ("--set", kv)]]) == 0
    html = (tmp_path / "r" / "report.html").read_text()
    assert "fedzip[report]" in html and "data:image/png" not in html


def test_cli_stop_after_splits_a_run_that_resume_finishes(tmp_path, tiny_cfg, capsys):
    args = [a for o in tiny_cfg for a in ("--set", o)]
    out = str(tmp_path / "split")
    assert main(["run", "--out", out, "--quiet", "--stop-after", "1", *args]) == 0
    assert "stopped after round 1 of 3" in capsys.readouterr().out
    assert not (tmp_path / "split" / "summary.json").exists()
    assert main(["run", "--out", out, "--quiet", "--resume", *args]) == 0
    assert json.loads((tmp_path / "split" / "summary.json").read_text())["rounds_completed"] == 3
    assert main(["run", "--quiet", "--stop-after", "0", *args]) == 2
    assert "--stop-after" in capsys.readouterr().err
