"""The ledger: one line per message that crosses the network, with its exact encoded length."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from fedzip.rundir import read_jsonl


class Ledger:
    def __init__(self, path: Path):
        self.path = path
        self.round_bytes: dict[int, dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0})
        # personalised evaluation's messages (``kind: eval``): on the ledger, but not in the training totals
        self.eval_bytes: dict[int, dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0})
        self._fh = open(path, "a", encoding="utf-8")

    def record(self, rnd: int, client: int, direction: str, nbytes: int, kind: str = "update", **extra) -> None:
        """Count ``nbytes`` (the length of the encoded payload) for one message."""
        assert direction in ("up", "down")
        (self.eval_bytes if kind == "eval" else self.round_bytes)[rnd][direction] += nbytes
        row = {"round": rnd, "client": client, "direction": direction, "bytes": nbytes, "kind": kind, **extra}
        self._fh.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def lines(self) -> int:
        self.flush()
        with open(self.path, encoding="utf-8") as f:
            return sum(1 for _ in f)


def read_ledger(path: Path) -> list[dict]:
    return read_jsonl(path)
