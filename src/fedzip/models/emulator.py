"""Emulator/adapter splits of decoder-only transformers (FedBiOT, offsite-tuning, FedOT).

A causal LM is embeddings -> ``n`` decoder layers -> final norm -> LM head. The *adapter* is a few of
those layers (the last ``a``; or the first 2 and last 2 for offsite-tuning), the *emulator* a uniform
layer-drop of the others. Nothing here names a model family: the decoder layer list is found as the
longest ``nn.ModuleList`` of identical block types (``model.layers`` in Llama/Qwen2/Gemma,
``transformer.h`` in GPT-2), and a model with a different layer list is run by swapping that list
(and ``config.num_hidden_layers``) in place, so embeddings, norm and head stay shared.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from torch import nn

from fedzip.errors import ModelError


def find_decoder_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent module, attribute name, the layer list) of the model's decoder blocks."""
    best = None
    for _parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) >= 2 and len({type(m) for m in child}) == 1:
                if best is None or len(child) > len(best[2]):
                    best = (parent, attr, child)
    if best is None:
        raise ModelError("cannot find the decoder layer list of this model (an nn.ModuleList of repeated blocks)")
    return best


def emulator_indices(n_teacher: int, drop: float, keep_bottom: int = 0) -> list[int]:
    """Uniform layer-drop: keep ``round(n(1-drop))`` of ``n`` teacher layers, the first and last among them.

    ``keep_bottom`` > 0 always keeps the first ``keep_bottom`` teacher layers and spreads the rest of the
    kept layers uniformly over the others. The bottom layers turn token embeddings into the features every
    later layer reads; dropping layer 1 of SmolLM2 leaves an emulator + adapter at chance before alignment."""
    keep = max(2, round(n_teacher * (1 - drop))) if n_teacher >= 2 else n_teacher
    if keep >= n_teacher:
        return list(range(n_teacher))
    bottom = min(keep_bottom, keep - 1, n_teacher - 1)
    rest, spread = n_teacher - bottom, keep - bottom  # spread >= 1 kept layers over the other teacher layers
    if spread == 1:
        return list(range(bottom)) + [n_teacher - 1]
    return list(range(bottom)) + [bottom + int(i * (rest - 1) / (spread - 1)) for i in range(spread)]


@dataclass(frozen=True)
class Split:
    """Which of the full model's layers are adapter, and which teacher layers the emulator keeps.

    ``client_layers`` is the order of layers in the compressed (client) model, as full-model indices;
    ``bottom``/``top`` are the adapter layers below and above the emulator."""

    n_layers: int
    bottom: tuple[int, ...]
    top: tuple[int, ...]
    emulated: tuple[int, ...]  # teacher layers the emulator starts from (full-model indices)

    @property
    def teacher(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if i not in self.bottom and i not in self.top)

    @property
    def client_layers(self) -> tuple[int, ...]:
        return self.bottom + self.emulated + self.top

    def role(self, position: int) -> str:
        """'adapter' or 'emulator' for position ``position`` of the client model."""
        nb, ne = len(self.bottom), len(self.emulated)
        return "emulator" if nb <= position < nb + ne else "adapter"


def make_split(n_layers: int, adapter_layers: int, drop: float, layout: str = "top", keep_bottom: int = 0) -> Split:
    """``layout`` 'top': adapter = the last ``adapter_layers`` (FedBiOT); 'sandwich': the first and the last
    ``adapter_layers // 2`` each (offsite-tuning, FedOT: 2 + 2). ``keep_bottom``: see emulator_indices."""
    if layout == "top":
        bottom, top = (), tuple(range(n_layers - adapter_layers, n_layers))
    else:
        half = adapter_layers // 2
        bottom, top = tuple(range(half)), tuple(range(n_layers - (adapter_layers - half), n_layers))
    if len(bottom) + len(top) >= n_layers - 1:
        raise ModelError(f"{adapter_layers} adapter layers leave no teacher to emulate in a {n_layers}-layer model")
    teacher = [i for i in range(n_layers) if i not in bottom and i not in top]
    emulated = tuple(teacher[j] for j in emulator_indices(len(teacher), drop, keep_bottom))
    return Split(n_layers, bottom, top, emulated)


@contextlib.contextmanager
def swapped_layers(model: nn.Module, layers: list[nn.Module]):
    """Run ``model`` with another decoder layer list (and layer count) for the duration of the block."""
    parent, attr, original = find_decoder_layers(model)
    config = getattr(parent, "config", None)  # the decoder stack's own config bounds its layer loop
    saved_n = getattr(config, "num_hidden_layers", None)
    # attention modules address the KV cache by their layer index: renumber them for the new stack
    renumbered = [(m, m.layer_idx) for pos, layer in enumerate(layers) for m in layer.modules()
                  if isinstance(getattr(m, "layer_idx", None), int)]
    setattr(parent, attr, nn.ModuleList(layers))
    if saved_n is not None:
        config.num_hidden_layers = len(layers)
    for pos, layer in enumerate(layers):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = pos
    try:
        yield model
    finally:
        for m, idx in renumbered:
            m.layer_idx = idx
        setattr(parent, attr, original)
        if saved_n is not None:
            config.num_hidden_layers = saved_n
