"""Progress for long work: rich bars on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("fedzip")


class RunProgress:
    def __init__(self, total_rounds: int, start_round: int = 1, enabled: bool = True):
        self.total = total_rounds
        self.live = enabled and sys.stderr.isatty()
        self._bar = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), transient=False)
            self._bar.start()
            self._rounds = self._bar.add_task("rounds", total=total_rounds, completed=start_round - 1)
            self._clients = self._bar.add_task("clients", total=1)
            self._steps = self._bar.add_task("steps", total=1)
        self._t0 = time.time()

    def round_start(self, rnd: int, n_clients: int) -> None:
        if self._bar:
            self._bar.update(self._clients, total=n_clients, completed=0, description=f"round {rnd} clients")

    def client_start(self, cid: int) -> None:
        if self._bar:
            self._bar.update(self._steps, completed=0, description=f"client {cid} steps")

    def step(self, done: int, total: int) -> None:
        if self._bar:
            self._bar.update(self._steps, total=total, completed=done)

    def client_done(self) -> None:
        if self._bar:
            self._bar.advance(self._clients)

    def round_done(self, rnd: int, row: dict) -> None:
        msg = round_line(rnd, self.total, row)
        if self._bar:
            self._bar.advance(self._rounds)
            self._bar.console.print(msg)
        else:
            log.info(msg)

    def close(self) -> None:
        if self._bar:
            self._bar.stop()


def round_line(rnd: int, total: int, row: dict) -> str:
    """One round's line, as a run prints it and a deployment's watcher echoes it from ``metrics.jsonl``."""
    shown = {k: row[k] for k in ("accuracy", "loss", "perplexity", "epsilon") if k in row}
    text = " ".join(f"{k}={v:.4f}" for k, v in shown.items())
    split = ""
    if "flower_s" in row:  # a deployed round: where its time went
        clients = row.get("client_compute_s") or {}
        split = f" (clients {sum(clients.values()):.1f}s over {len(clients)}, Flower {row['flower_s']:.1f}s)"
    return (f"round {rnd}/{total}: up {row['bytes_up'] / 1e6:.3f} MB, down {row['bytes_down'] / 1e6:.3f} MB,"
            f" {row['round_s']:.1f}s{split} {text}")
