"""Where a run's model lives: ``train.device`` checked against this torch and the method's support."""

from __future__ import annotations

import torch

from fedzip.errors import ConfigError


def resolve_device(cfg, method_cls) -> torch.device:
    """``train.device`` as a torch device; a clear error where it cannot be honoured."""
    wanted = cfg.train.device
    if wanted == "cpu" or (wanted == "auto" and not (torch.cuda.is_available() and method_cls.runs_on_accelerator)):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device: {wanted} but this torch ({torch.__version__}) sees no CUDA device")
    if not method_cls.runs_on_accelerator:
        raise ConfigError(f"train.device: {wanted}: method {cfg.method} runs on the CPU only in this version")
    device = torch.device("cuda" if wanted == "auto" else wanted)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device: {wanted} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device
