"""LoRA injection through peft, and a name-addressed view of the trainable tensors.

Methods exchange tensors by *canonical* names: the parameter path inside the base model with peft's
wrapper prefixes and adapter name removed (``bert.encoder.layer.0.attention.self.query.lora_A.weight``,
``classifier.weight``). The same names key the wire payloads and the saved adapter.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from fedzip.errors import ModelError

ATTENTION_NAMES = [
    ["q_proj", "k_proj", "v_proj", "o_proj"],  # Llama, Qwen2, Gemma, Mistral
    ["query", "key", "value"],  # BERT family
    ["c_attn", "c_proj"],  # GPT-2
    ["q_lin", "k_lin", "v_lin", "out_lin"],  # DistilBERT
    ["query_key_value", "dense"],  # GPT-NeoX, Falcon
]
HEAD_NAMES = ["classifier", "score", "classification_head", "lm_head_cls"]


def default_targets(model: nn.Module) -> list[str]:
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for group in ATTENTION_NAMES:
        present = [n for n in group if n in leaf_names]
        if present:
            return present
    raise ModelError("cannot guess LoRA target modules for this model; set lora.target_modules")


def head_module(model: nn.Module) -> str | None:
    names = {name for name, _ in model.named_modules()}
    return next((h for h in HEAD_NAMES if h in names), None)


def canonical(name: str) -> str:
    name = re.sub(r"^base_model\.model\.", "", name)
    name = name.replace(".modules_to_save.default", "").replace(".default", "")
    return name


# Canonical LoRA tensor names are "<module>.lora_A.weight" (rank x in) and "<module>.lora_B.weight" (out x rank).
# Every method finds its LoRA pairs through these helpers rather than parsing names itself.
_A, _B = ".lora_A.weight", ".lora_B.weight"


def is_lora(name: str) -> bool:
    """A LoRA factor (A or B); False for the head and other trained tensors."""
    return name.endswith(_A) or name.endswith(_B)


def is_lora_a(name: str) -> bool:
    return name.endswith(_A)


def lora_a(module: str) -> str:
    return module + _A


def lora_b(module: str) -> str:
    return module + _B


def lora_modules(names) -> list[str]:
    """The adapted modules among ``names``, in their order: those with an A factor (and, checked, a B)."""
    names = list(names)
    present = set(names)
    modules = [n[: -len(_A)] for n in names if n.endswith(_A)]
    missing = [lora_b(m) for m in modules if lora_b(m) not in present]
    if missing:
        raise ModelError(f"LoRA A without its B: {missing[0]}")
    return modules


class TrainableView:
    """Maps canonical names to a model's trainable parameters (and back)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.params: dict[str, nn.Parameter] = {canonical(n): p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ModelError("the model has no trainable parameters")

    def names(self, predicate=None) -> list[str]:
        return [n for n in self.params if predicate is None or predicate(n)]

    def shapes(self, names=None) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self.params[n].shape) for n in (names or self.params)}

    def get(self, names=None) -> dict[str, torch.Tensor]:
        """Copies on the CPU, wherever the model lives: methods and payloads work on CPU tensors."""
        return {n: self.params[n].detach().to("cpu", copy=True) for n in (names or self.params)}

    def set(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, t in tensors.items():
                self.params[n].copy_(t)

    def num_elements(self, names=None) -> int:
        return sum(self.params[n].numel() for n in (names or self.params))


def inject_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str] | str | None,
                train_head: bool, seed: int, rslora: bool = False):
    """LoRA on ``targets`` (module names, or ``"all-linear"``: peft adapts every linear layer of the body and
    leaves the output layer alone; a classification head is trained whole through ``modules_to_save``)."""
    from peft import LoraConfig, TaskType, get_peft_model

    is_cls = head_module(model) is not None and hasattr(model.config, "num_labels") and not hasattr(model, "lm_head")
    head = head_module(model) if is_cls and train_head else None
    cfg = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets or default_targets(model),
        modules_to_save=[head] if head else None, use_rslora=rslora,
        task_type=TaskType.SEQ_CLS if is_cls else TaskType.CAUSAL_LM,
    )
    torch.manual_seed(seed)  # LoRA A init: the same on the server and on every client
    try:
        peft_model = get_peft_model(model, cfg)
    except ValueError as exc:
        raise ModelError(f"cannot apply LoRA: {exc}") from None
    if not train_head:  # peft makes a classification head trainable on its own: honour the switch
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.requires_grad_(False)
    return peft_model


def save_adapter(model, out_dir: Path) -> None:
    """The standard peft layout: adapter_config.json + adapter_model.safetensors."""
    model.save_pretrained(str(out_dir))
