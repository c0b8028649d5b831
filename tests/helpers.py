"""Shared test helpers."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from fedzip.config import load_config
from fedzip.engine import run_experiment


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def exported_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """What a run exports: its peft adapter, or the whole model for a method without LoRA (full_ft)."""
    run_dir = Path(run_dir)
    if (run_dir / "adapter").exists():
        return adapter_tensors(run_dir)
    return {k: v for f in sorted((run_dir / "model").glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def assert_resume_is_exact(tmp_path: Path, overrides: list[str], stop_after: int = 1) -> tuple[dict, dict]:
    """Run uninterrupted, and again interrupted after ``stop_after`` rounds then resumed: same export, same bytes."""
    full = run_experiment(load_config(None, overrides), tmp_path / "full", progress=False)
    part = run_experiment(load_config(None, overrides), tmp_path / "part", progress=False, stop_after=stop_after)
    assert part["interrupted_after"] == stop_after
    resumed = run_experiment(load_config(None, overrides), tmp_path / "part", resume=True, progress=False)
    a, b = exported_tensors(tmp_path / "full"), exported_tensors(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["bytes_up_total"] == full["bytes_up_total"] and resumed["final_metrics"] == full["final_metrics"]
    return full, resumed
