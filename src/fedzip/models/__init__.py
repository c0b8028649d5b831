"""Models: loading, LoRA injection, name-addressed trainable views."""

from fedzip.models.load import load_base_model, load_tokenizer, resolve
from fedzip.models.lora import TrainableView, inject_lora, save_adapter

__all__ = ["TrainableView", "inject_lora", "load_base_model", "load_tokenizer", "resolve", "save_adapter"]
