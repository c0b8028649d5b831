"""The in-process exchange: a laptop simulation's clients run in the server's process, one after another.

The round engine (``fedzip.engine.rounds``) drives a simulation and a Flower deployment alike; this module holds
what only a simulation has: clients that run here from the bytes they are sent, and the export of the evaluated
clients' own models, which a deployed client keeps on its node.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fedzip.data.task import model_device
from fedzip.engine.checkpoint import RunIdentity
from fedzip.engine.client import run_client
from fedzip.engine.memory import PeakMemory
from fedzip.engine.personal import evaluate_client
from fedzip.engine.state import ClientStateStore
from fedzip.errors import FedzipError
from fedzip.models import save_adapter
from fedzip.progress import RunProgress
from fedzip.rundir import RunDir

log = logging.getLogger(__name__)


class InProcessExchange:
    """Clients run in this process, one after another, each from the bytes it was sent.

    They use their own Method instance on their own runtime (``client_runtime``: the same read-only data,
    a model of their own), built like a deployed client's: nothing passes from the server side to a client
    except the message bytes. The process holds a second copy of the trainable model for them."""

    def __init__(self, client_method, store: ClientStateStore, bar: RunProgress):
        self.method, self.store, self.bar = client_method, store, bar
        self.memory = PeakMemory(model_device(client_method.rt.model) if client_method.rt.model is not None else None)

    def begin(self, identity: RunIdentity) -> None:
        """The run's identity: a deployed exchange sends it with every request; here the store is the run's own."""

    def __call__(self, rnd: int, downs: dict[int, bytes], timing: dict):
        replies, failures, diagnostics = {}, {}, {}
        timing["client_compute_s"] = {}  # each client's own compute: what a link model needs per client
        timing["client_memory"] = {}  # each client's peak memory while it decoded, trained and encoded
        for cid, down in downs.items():
            self.bar.client_start(cid)
            before = timing["compute_s"]
            self.memory.start()
            try:
                result = run_client(self.method, self.store, rnd, cid, down, timing)
            except Exception as exc:  # noqa: BLE001 - one client never stops a run: it failed, as on a real node
                log.warning("round %d: client %d failed: %s: %s", rnd, cid, type(exc).__name__, exc,
                            exc_info=not isinstance(exc, FedzipError))
                failures[cid] = f"{type(exc).__name__}: {exc}"
                self.store.rollback(rnd - 1, cid)  # what it saved belongs to a round the server never got
                continue
            finally:
                memory = self.memory.stop()
                self.bar.client_done()
            replies[cid], diagnostics[cid] = result.up, result.diagnostics
            timing["client_memory"][str(cid)] = memory
            timing["client_compute_s"][str(cid)] = timing["compute_s"] - before
        return replies, failures, diagnostics  # (replies, failures: cid -> reason, diagnostics)

    evaluates_clients = True

    def evaluate(self, rnd: int, down: bytes, requests: dict[int, dict]) -> tuple[dict[int, bytes], dict[int, str]]:
        """Personalised evaluation (``fedzip.engine.personal``): each client answers from its own state."""
        return {cid: evaluate_client(self.method, self.store, cid, down, req) for cid, req in requests.items()}, {}


def export_personal_models(exchange: InProcessExchange, glob: dict[str, torch.Tensor], cids: list[int],
                           out: Path) -> None:
    """The evaluated clients' own models at the end (the global tensors ``glob`` with what each keeps), each a
    peft adapter: ``personal/client_<cid>``. In a simulation only: a deployed client's model stays on its node."""
    method = exchange.method
    for cid in cids:
        method.rt.view.set(method.personal_tensors(cid, exchange.store, {n: glob[n] for n in method.personal_spec()}))
        save_adapter(method.rt.model, RunDir(out).personal / f"client_{cid}")
