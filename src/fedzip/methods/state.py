"""A method's server state for checkpoints: named groups of tensors, and facts kept as what they are.

Groups ("global", "optimizer", "autoencoder") replace name prefixes cut apart by slicing; facts (a round
number, the set of clients that already hold a codec) are JSON, not float tensors. On disk it is one
safetensors file: a tensor is stored as ``<group>/<name>`` and the facts as JSON in the file's metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedzip.errors import FedzipError

FACTS_KEY = "fedzip_server_facts"


@dataclass
class ServerState:
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def group(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of one group ({} if the state has none)."""
        return self.tensors.get(name, {})


def save_server_state(state: ServerState, path: Path) -> None:
    flat = {}
    for group, tensors in state.tensors.items():
        if not group or "/" in group:
            raise ValueError(f"server state group {group!r}: a non-empty name without '/'")
        flat |= {f"{group}/{name}": t.detach().cpu().contiguous() for name, t in tensors.items()}
    save_file(flat, str(path), metadata={FACTS_KEY: json.dumps(state.facts, allow_nan=False)})


def load_server_state(path: Path) -> ServerState:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if FACTS_KEY not in metadata:
            raise FedzipError(f"{path}: a checkpoint from an older fedzip (no server facts); start the run afresh")
        state = ServerState(facts=json.loads(metadata[FACTS_KEY]))
        for key in f.keys():
            group, _, name = key.partition("/")
            state.tensors.setdefault(group, {})[name] = f.get_tensor(key)
    return state
