"""The fedzip ClientApp: a SuperNode trains the logical clients it hosts, from the bytes it receives.

Node config (``flower-supernode --node-config``): ``partition-id`` and ``num-partitions`` (the node
serves clients with ``cid % num-partitions == partition-id``), and optionally ``data-root``,
``model-cache``, ``threads``, ``state-dir`` (where client state such as optimiser moments or
error-feedback residuals lives between rounds, and the node worker's socket and log), ``worker`` (false:
each message loads the model in its own ClientApp process) and ``worker-idle-s``.

Flower starts one ClientApp process per message; this one checks the message and relays its payload to
the node's long-lived worker (``fedzip.deploy.node_worker``), which keeps the model and data loaded.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedzip.deploy import node_worker
from fedzip.deploy.task import RECORD, client_record, experiment_config, hosted_clients
from fedzip.errors import PayloadError

app = ClientApp()


def _flag(value, default: bool) -> bool:
    if value in (None, ""):
        return default
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() not in ("false", "0", "no", "off")


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg = experiment_config(context.run_config, context.node_config)
    clients = hosted_clients(context.node_config, cfg.num_clients)
    return Message(RecordDict({RECORD: ConfigRecord({"clients": clients})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Each client record of the message in turn (the node's clients train one after another, as in a
    simulation); a client that fails gets an ``error`` in its reply record and the others go on."""
    return _relay(msg, context, "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Personalised evaluation (``fedzip.engine.personal``): each client's own model on its own test draw;
    the reply carries scores, never the model."""
    return _relay(msg, context, "evaluate")


def _relay(msg: Message, context: Context, op: str) -> Message:
    node = context.node_config
    names = [n for n in msg.content.config_records if n.startswith(RECORD + ".")]
    if not names:
        raise PayloadError(f"{op} message has no {RECORD}.<cid> record")
    out = {}
    for name in names:
        rec = msg.content.config_records[name]
        cid, rnd, down = rec.get("cid"), rec.get("round"), rec.get("payload")
        if not isinstance(cid, int) or name != client_record(cid) or not isinstance(rnd, int) or rnd < 1 \
                or not isinstance(down, bytes):
            raise PayloadError(f"record {name}: needs int 'cid' (its name's), int 'round' >= 1 and bytes 'payload'")
        request = {"op": op, "cid": cid, "round": rnd, "run_id": rec.get("run_id"), "epoch": rec.get("epoch"),
                   "run_config": dict(context.run_config), "node_config": dict(node.items())}  # checked by the worker
        if op == "evaluate":  # checked by the worker (fedzip.engine.personal.evaluate_client)
            request |= {"own": rec.get("own"), "share": rec.get("share")}
        if _flag(node.get("worker"), True):
            idle = float(node.get("worker-idle-s") or node_worker.DEFAULT_IDLE_S)
            reply, up = node_worker.call(node_worker.state_dir_of(node), request, down, idle_s=idle)
        else:
            reply, up = _local_worker.handle(request, down)
        if "error" in reply:  # reported for this client; the server logs it and counts the client as failed
            out[name] = ConfigRecord({"cid": cid, "round": rnd, "error": f"{reply.get('kind')}: {reply['error']}"})
        else:
            out[name] = ConfigRecord({"payload": up, "cid": cid, "round": rnd, "client_s": float(reply["client_s"])})
    return Message(RecordDict(out), reply_to=msg)


# With ``worker = false``: the work runs in this process (Flower starts one per message, so it holds one
# message's clients; they share the model this process loads once).
_local_worker = node_worker.NodeWorker()
