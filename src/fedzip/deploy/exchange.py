"""The Flower exchange: a round's encoded messages go to the SuperNodes hosting the sampled clients.

The round engine (``fedzip.engine.rounds``) drives the rounds exactly as in a simulation; only this
object differs. It finds which SuperNode hosts which logical client (a ``query`` message to each new
node), sends each ``train`` message, and waits up to ``deploy.round_timeout_s``. Missing, failed,
malformed or oversized replies are reported as failures (the engine logs them in the ledger); clients
that failed are asked again, up to ``deploy.max_round_retries`` times, until at least
``deploy.min_reply_fraction`` of the sampled clients have replied, or the run stops resumable.
"""

from __future__ import annotations

import logging
import math
import time

from flwr.app import ConfigRecord, Message, RecordDict

from fedzip.deploy.task import RECORD, client_record
from fedzip.errors import TooFewReplies

log = logging.getLogger(__name__)

class FlowerExchange:
    def __init__(self, grid, cfg, retry_pause_s: float = 2.0):
        self.grid, self.cfg = grid, cfg
        self.retry_pause_s = retry_pause_s
        self.node_clients: dict[int, list[int]] = {}  # node id -> logical clients it hosts
        self.identity = None  # the run's id and epoch (fedzip.engine.checkpoint.RunIdentity): sent with every request

    def begin(self, identity) -> None:
        self.identity = identity

    # -- which node hosts which client ------------------------------------------------------------
    def refresh_nodes(self) -> None:
        live = set(self.grid.get_node_ids())
        for gone in set(self.node_clients) - live:
            log.warning("SuperNode %d left the federation", gone)
            del self.node_clients[gone]
        new = sorted(live - set(self.node_clients))
        if not new:
            return
        queries = [Message(RecordDict({RECORD: ConfigRecord({"num_clients": self.cfg.num_clients})}),
                           dst_node_id=n, message_type="query") for n in new]
        # A new node is given as long to say which clients it hosts as to train them: on a loaded machine its first
        # ClientApp process (imports, Flower's polling) can take a minute, and a node left out here fails every
        # client of its that the round sampled (a resumed run then differs from the uninterrupted one).
        for reply in self.send_and_receive(queries, timeout=self.cfg.deploy.round_timeout_s):
            node = reply.metadata.src_node_id
            if reply.has_error() or RECORD not in reply.content.config_records:
                log.warning("SuperNode %d did not say which clients it hosts; it is left out for now", node)
                continue
            clients = reply.content.config_records[RECORD].get("clients")
            if not isinstance(clients, list) or not all(isinstance(c, int) and 0 <= c < self.cfg.num_clients
                                                        for c in clients):
                log.warning("SuperNode %d sent an invalid client list; it is left out", node)
                continue
            self.node_clients[node] = clients
            log.info("SuperNode %d hosts %d client(s)", node, len(clients))

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        """Flower's ``Grid.send_and_receive``, but asking for replies every ``deploy.reply_poll_s``: Flower's
        sleeps 3 s between two asks, so a round's last reply waited 1.5 s on average before the server saw it
        (B4 deploy: a tenth of Flower's overhead per round)."""
        waiting = set(self.grid.push_messages(messages))
        end = time.time() + timeout
        got: list[Message] = []
        while waiting:
            replies = list(self.grid.pull_messages(waiting))
            got += replies
            waiting -= {r.metadata.reply_to_message_id for r in replies}
            if not waiting or time.time() >= end:
                break
            time.sleep(min(self.cfg.deploy.reply_poll_s, max(0.0, end - time.time())))
        return got

    def owner(self, cid: int) -> int | None:
        for node, clients in sorted(self.node_clients.items()):
            if cid in clients:
                return node
        return None

    # -- one round ---------------------------------------------------------------------------------
    def __call__(self, rnd: int, downs: dict[int, bytes], timing: dict[str, float]):
        need = math.ceil(self.cfg.deploy.min_reply_fraction * len(downs))
        replies: dict[int, bytes] = {}
        failures: dict[int, str] = {}
        client_s: dict[int, float] = {}  # each client's own compute, as its node measured it
        t0 = time.time()
        for attempt in range(self.cfg.deploy.max_round_retries + 1):
            pending = {cid: b for cid, b in downs.items() if cid not in replies}
            got, failed = self._send(rnd, pending, client_s)
            replies |= got
            failures = {c: r for c, r in (failures | failed).items() if c not in replies}
            if len(replies) >= need or attempt == self.cfg.deploy.max_round_retries:
                break
            log.warning("round %d: %d of %d clients replied (need %d); asking the others again",
                        rnd, len(replies), len(downs), need)
            time.sleep(self.retry_pause_s)
        round_trip = time.time() - t0
        timing["compute_s"] += round_trip  # transfer + client work
        timing["client_compute_s"] = {str(c): s for c, s in sorted(client_s.items()) if c in replies}
        # What Flower adds: the round trip less the longest chain of client work (a node's clients train one
        # after another, nodes in parallel). Not a byte count: Flower's framing is on the SuperLink's record.
        per_node: dict[int, float] = {}
        for c, s in client_s.items():
            if c in replies:
                per_node[self.owner(c)] = per_node.get(self.owner(c), 0.0) + s
        timing["flower_s"] = max(0.0, round_trip - max(per_node.values(), default=0.0))
        if len(replies) < need:
            raise TooFewReplies(f"round {rnd}: only {len(replies)} of {len(downs)} sampled clients replied "
                                f"(deploy.min_reply_fraction needs {need}); the run stopped after its last "
                                "completed round and can be resumed")
        for cid, reason in failures.items():
            log.warning("round %d: client %d failed: %s", rnd, cid, reason)
        return replies, failures, {}  # no diagnostics cross the network

    # -- personalised evaluation (fedzip.engine.personal) ---------------------------------------------
    evaluates_clients = True

    def evaluate(self, rnd: int, down: bytes, requests: dict[int, dict]) -> tuple[dict[int, bytes], dict[int, str]]:
        """Each evaluated client's request as an ``evaluate`` message to its SuperNode; asked once (a client that
        does not answer is left out of the round's personalised metrics)."""
        def record(req: dict) -> dict:
            return {"own": req["own"]} | ({"share": req["share"]} if req.get("share") is not None else {})

        return self._send(rnd, {cid: down for cid in requests}, {}, "evaluate",
                          {cid: record(req) for cid, req in requests.items()})

    def _send(self, rnd: int, downs: dict[int, bytes], client_s: dict[int, float], message_type: str = "train",
              extra: dict[int, dict] | None = None) -> tuple[dict[int, bytes], dict[int, str]]:
        """One Flower message per node, carrying the payloads of all its sampled clients: Flower 1.41 handles a
        node's messages one after another and starts a process for each, so per-client messages would pay that
        start and the node's polling once per client instead of once per node (B4). ``extra``: more fields of
        each client's record (an evaluation request's)."""
        self.refresh_nodes()
        failures: dict[int, str] = {}
        by_node: dict[int, dict[int, bytes]] = {}
        for cid, payload in downs.items():
            node = self.owner(cid)
            if node is None:
                failures[cid] = "no SuperNode hosts this client"
                continue
            by_node.setdefault(node, {})[cid] = payload
        if self.identity is None:
            raise RuntimeError("FlowerExchange.begin(identity) must come before the first round")
        run = {"run_id": self.identity.run_id, "epoch": self.identity.epoch}
        messages = [Message(RecordDict({client_record(cid): ConfigRecord({"payload": p, "cid": cid, "round": rnd, **run,
                                                                          **(extra or {}).get(cid, {})})
                                        for cid, p in batch.items()}), dst_node_id=node, message_type=message_type)
                    for node, batch in by_node.items()]
        replies: dict[int, bytes] = {}
        answers = self.send_and_receive(messages, timeout=self.cfg.deploy.round_timeout_s) if messages else []
        asked = {m.metadata.message_id: node for m, node in zip(messages, by_node)}  # ids are set when pushed
        for reply in answers:
            node = asked.get(reply.metadata.reply_to_message_id)
            if node is None or reply.metadata.src_node_id != node:
                log.warning("round %d: reply dropped: SuperNode %s sent a reply to no message of this round",
                            rnd, reply.metadata.src_node_id)
                continue
            for cid in by_node[node]:
                payload, seconds, reason = self._read_reply(reply, rnd, cid)
                if reason:
                    failures[cid] = reason
                    continue
                replies[cid] = payload
                if isinstance(seconds, float) and 0 <= seconds < 1e7:  # the node's own timing: shown, never trusted
                    client_s[cid] = seconds
        for cid in (c for batch in by_node.values() for c in batch):
            if cid not in replies and cid not in failures:
                failures[cid] = f"no reply within {self.cfg.deploy.round_timeout_s:g} s"
        return replies, failures

    def _read_reply(self, reply, rnd: int, cid: int):
        """(payload, client seconds, failure reason) for client ``cid`` in its node's reply, checked before the
        engine decodes the payload."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            return None, None, f"client error on SuperNode {node}: {reply.error.reason}"
        records = reply.content.config_records if reply.content else {}
        rec = records.get(client_record(cid))
        if rec is None:
            return None, None, f"SuperNode {node}'s reply has no record for client {cid}"
        if isinstance(rec.get("error"), str):
            return None, None, f"client error on SuperNode {node}: {rec['error']}"
        got_cid, r, payload = rec.get("cid"), rec.get("round"), rec.get("payload")
        if got_cid != cid:
            return None, None, f"reply claims client {got_cid!r}"
        if r != rnd:
            return None, None, f"reply is for round {r!r}, not {rnd}"
        if not isinstance(payload, bytes):
            return None, None, "reply payload is not bytes"
        if len(payload) > self.cfg.wire.max_payload_bytes:
            return None, None, f"reply of {len(payload)} bytes exceeds wire.max_payload_bytes"
        return payload, rec.get("client_s"), None
