"""The run directory: every file a run writes, by name, and how to read them back.

This is the one module that knows the layout (docs/reference/run-directory.md): the engine writes through it,
the report, compact results, the CLI and deployments read through it. It imports no other fedzip module, so
every layer may use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    # -- what a run releases ------------------------------------------------------------------------------------
    @property
    def config(self) -> Path:  # the resolved configuration
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:  # one JSON object a round
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:  # written when the run ends
        return self.path / "summary.json"

    @property
    def method_facts(self) -> Path:  # the method's set-up (and the DP mechanism)
        return self.path / "method.json"

    @property
    def partition(self) -> Path:  # per-client example counts and label histograms
        return self.path / "partition.json"

    @property
    def adapter(self) -> Path:  # the final LoRA, as peft saves it
        return self.path / "adapter"

    @property
    def model(self) -> Path:  # the final model of a method without LoRA
        return self.path / "model"

    @property
    def personal(self) -> Path:  # evaluated clients' own models (simulation only)
        return self.path / "personal"

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    @property
    def autoencoder_gate(self) -> Path:  # CG-FedLLM's quality gate
        return self.path / "autoencoder_gate.json"

    @property
    def flower_traffic(self) -> Path:  # what Flower counted for a local federation's run
        return self.path / "flower_traffic.json"

    # -- the server's own ---------------------------------------------------------------------------------------
    @property
    def ledger(self) -> Path:  # one line per message: its exact encoded length
        return self.path / "ledger.jsonl"

    @property
    def private_rows(self) -> Path:  # under DP: each round's cohort and unnoised statistics
        return self.path / "server_private.jsonl"

    @property
    def checkpoints(self) -> Path:  # the last completed round, for --resume
        return self.path / "checkpoints"

    @property
    def identity(self) -> Path:  # the run's id and the epoch of its latest start
        return self.path / "run.json"

    @property
    def client_state(self) -> Path:  # clients' state between rounds (simulation)
        return self.path / "client_state"

    # -- reading back -------------------------------------------------------------------------------------------
    def finished(self) -> bool:
        return self.summary.exists()

    def rows(self) -> list[dict]:
        """``metrics.jsonl``: what the run released, round by round."""
        return read_jsonl(self.metrics)

    def server_rows(self) -> list[dict]:
        """The rows with what a DP run kept to the server (``server_private.jsonl``) merged back, round by round:
        for the operator's own tools (link times, memory, step time), never for what is published."""
        kept = {r["round"]: r for r in read_jsonl(self.private_rows)} if self.private_rows.exists() else {}
        return [r | kept.get(r["round"], {}) for r in self.rows()]

    def ledger_rows(self) -> list[dict]:
        return read_jsonl(self.ledger)

    def read_summary(self) -> dict:
        return json.loads(self.summary.read_text())


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
