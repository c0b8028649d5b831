"""The fedzip ClientApp: a SuperNode trains the logical clients it hosts, from the bytes it receives.

Node config (``flower-supernode --node-config``): ``partition-id`` and ``num-partitions`` (the node
serves clients with ``cid % num-partitions == partition-id``), and optionally ``data-root``,
``model-cache``, ``threads`` and ``state-dir`` (where client state such as optimiser moments or
error-feedback residuals lives between rounds).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedzip.config import dump_config
from fedzip.deploy.task import RECORD, experiment_config, hosted_clients
from fedzip.engine.client import run_client
from fedzip.engine.runtime import build_runtime
from fedzip.engine.state import ClientStateStore
from fedzip.errors import PayloadError
from fedzip.registry import method_class

app = ClientApp()
_cache: dict[str, object] = {}  # config text -> client-side method (a ClientApp process may serve many messages)


def _client_method(cfg):
    key = dump_config(cfg)
    if key not in _cache:
        method_cls = method_class(cfg.method)
        cfg = method_cls.adjust_config(cfg)
        _cache.clear()
        _cache[key] = method_cls(cfg, build_runtime(cfg, method_cls, with_model=not method_cls.client_builds_model))
    return _cache[key]


def _store(cfg, context: Context) -> ClientStateStore:
    root = Path(str(context.node_config.get("state-dir") or Path.home() / ".fedzip" / "client-state")).expanduser()
    run_key = hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:16]  # the same experiment resumes its state
    return ClientStateStore(root / run_key)


def _note_wire(store: ClientStateStore, rnd: int, cid: int, down: int, up: int) -> None:
    """The node's own record of the payload bytes it received and sent: audits the server's ledger."""
    store.root.mkdir(parents=True, exist_ok=True)
    with open(store.root / "wire.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"round": rnd, "client": cid, "down": down, "up": up}) + "\n")


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg = experiment_config(context.run_config, context.node_config)
    clients = hosted_clients(context.node_config, cfg.num_clients)
    return Message(RecordDict({RECORD: ConfigRecord({"clients": clients})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.time()
    cfg = experiment_config(context.run_config, context.node_config)
    rec = msg.content.config_records.get(RECORD)
    if rec is None:
        raise PayloadError(f"message has no {RECORD!r} record")
    cid, rnd, down = rec.get("cid"), rec.get("round"), rec.get("payload")
    if not isinstance(cid, int) or not isinstance(rnd, int) or rnd < 1 or not isinstance(down, bytes):
        raise PayloadError("message needs int 'cid', int 'round' >= 1 and bytes 'payload'")
    if cid not in hosted_clients(context.node_config, cfg.num_clients):
        raise PayloadError(f"client {cid} is not hosted on this SuperNode")
    store = _store(cfg, context)
    store.rollback(rnd - 1, cid)  # drop state from an attempt at this round the server never completed
    store.commit(rnd - 1, cid)
    up = run_client(_client_method(cfg), store, rnd, cid, down).up  # diagnostics stay on the node
    _note_wire(store, rnd, cid, len(down), len(up))
    return Message(RecordDict({RECORD: ConfigRecord({"payload": up, "cid": cid, "round": rnd,
                                                     "client_s": time.time() - t0})}), reply_to=msg)
