"""Personalised evaluation: client models judged on test sets of their own, through the same exchange as training.

A method whose clients keep state (FedSA-LoRA's B) has no one global model; even for one that has, a client
cares about the model it would use on data like its own. Each evaluation round the server sends a fixed
sample of clients (``eval.personal_clients``) the global tensors their model takes (``Method.personal_spec``);
each client loads them with what it keeps (``Method.personal_tensors``), scores its own test draw
(``eval.personal_examples`` test examples whose labels follow its training labels) and, for a method without a
global model, its share of the shared evaluation set; it replies with scores only, never tensors.

The messages go through the run's exchange: in a simulation the clients answer in this process, on Flower their
SuperNodes do, from the same :func:`evaluate_client`. The ledger counts them as ``kind: eval``, apart from the
training bytes (a central evaluation costs no traffic, so training totals stay comparable across methods).
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np

from fedzip.data.partition import client_test_indices
from fedzip.data.task import EvalScores
from fedzip.errors import ConfigError, PayloadError
from fedzip.wire import Message, decode, encode

log = logging.getLogger(__name__)

MAX_REPLY_BYTES = 1 << 24  # a reply is a few numbers and one prediction per shared example


def personal_clients(cfg, method_cls) -> int:
    if cfg.eval.personal_clients is not None:
        return min(cfg.eval.personal_clients, cfg.num_clients)
    return min(10, cfg.num_clients) if method_cls.personalised else 0


# -- the client side --------------------------------------------------------------------------------------
def own_test_indices(cfg, rt, cid: int) -> np.ndarray:
    """Client ``cid``'s own test draw, the same on the server's runtime and on the client's."""
    return client_test_indices(rt.task.train_data.labels, rt.parts[cid], rt.task.test_data.labels,
                               cfg.eval.personal_examples, np.random.default_rng([cfg.seed, 11, cid]))


def evaluate_client(method, store, cid: int, down: bytes, request: dict) -> bytes:
    """Client side: load the global tensors sent in ``down`` with what client ``cid`` keeps, score its own test
    draw (``request["own"]``) and its share ``[i, n, full]`` of the shared evaluation set (``request["share"]``,
    every n-th example from the i-th); the reply (JSON) carries the scores."""
    cfg, rt = method.cfg, method.rt
    rnd, own, share = request.get("round"), request.get("own"), request.get("share")
    if not isinstance(rnd, int) or not isinstance(own, bool):
        raise PayloadError("an evaluation request needs int 'round' and bool 'own'")
    if share is not None and not (isinstance(share, list) and len(share) == 3 and all(isinstance(x, int) for x in share)
                                  and 0 <= share[0] < share[1]):
        raise PayloadError("an evaluation request's 'share' is [i, n, full] with 0 <= i < n")
    received = decode(down, method.personal_spec(), max_bytes=cfg.wire.max_payload_bytes)
    rt.view.set(method.personal_tensors(cid, store, received.tensors))
    reply: dict = {"cid": cid, "round": rnd}
    if own:
        reply["own"] = rt.task.evaluate(rt.model, cfg.eval.batch_size, indices=own_test_indices(cfg, rt, cid))
    if share is not None:
        i, n, full = share
        shared = rt.task.eval_indices(None if full else cfg.eval.max_examples, cfg.seed)
        s = rt.task.score(rt.model, shared[i::n], cfg.eval.batch_size)
        reply["shared"] = {"loss_sum": s.loss_sum, "count": s.count, "examples": s.examples, "preds": s.preds,
                           "golds": s.golds}
    return json.dumps(reply).encode()


# -- the server side --------------------------------------------------------------------------------------
def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_reply(payload: bytes, cid: int, rnd: int, own: bool, share: bool) -> tuple[dict | None, EvalScores | None]:
    """A client's evaluation reply, checked: (its own-test metrics, its scores on its shared share)."""
    if len(payload) > MAX_REPLY_BYTES:
        raise PayloadError(f"evaluation reply of {len(payload)} bytes")
    try:
        reply = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"evaluation reply is not JSON: {exc}") from None
    if not isinstance(reply, dict) or reply.get("cid") != cid or reply.get("round") != rnd:
        raise PayloadError(f"evaluation reply is not client {cid}'s for round {rnd}")
    metrics = reply.get("own")
    if own and not (isinstance(metrics, dict) and {"loss", "eval_examples"} <= set(metrics)
                    and all(isinstance(k, str) and _number(v) for k, v in metrics.items())):
        raise PayloadError("evaluation reply lacks its own-test metrics (names -> finite numbers, with loss and "
                           "eval_examples)")
    scores = None
    if share:
        s = reply.get("shared")
        ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in xs)  # noqa: E731
        if not (isinstance(s, dict) and _number(s.get("loss_sum")) and isinstance(s.get("count"), int)
                and isinstance(s.get("examples"), int) and ints(s.get("preds")) and ints(s.get("golds"))
                and len(s["preds"]) == len(s["golds"])):
            raise PayloadError("evaluation reply lacks its scores on the shared evaluation set")
        scores = EvalScores(float(s["loss_sum"]), s["count"], s["examples"], s["preds"], s["golds"])
    return (metrics if own else None), scores


class PersonalEvaluation:
    """The server's half: which clients are judged, what they are sent, and the metrics their replies make.

    The row gets ``personal_accuracy`` (or ``personal_loss``: mean over the clients, on their own test sets) and
    its spread. For a method without one global model (``Method.personalised``) the row's ``accuracy``,
    ``loss`` ... are those of the client models on the shared evaluation set (``accuracy_of: client_models``), so
    that its curve compares with others': the set is dealt out among the sampled clients (client i takes every
    n-th example from the i-th), each client's model scores its share, and the scores are pooled. That estimates
    the mean client model's accuracy at the cost of one evaluation."""

    def __init__(self, cfg, rt, method, exchange, ledger):
        self.cfg, self.rt, self.method, self.exchange, self.ledger = cfg, rt, method, exchange, ledger
        n = personal_clients(cfg, type(method))
        self.cids = sorted(int(c) for c in np.random.default_rng([cfg.seed, 7]).permutation(cfg.num_clients)[:n])
        if not getattr(exchange, "evaluates_clients", False):
            raise ConfigError("eval.personal_clients: this exchange cannot ask clients to evaluate; set it to 0")
        if cfg.deploy.client_data == "on_nodes":
            raise ConfigError("eval.personal_clients: nodes with data of their own hold no test draw; set it to 0 "
                              "(personalised evaluation needs deploy.client_data: shared)")
        if type(method).client_builds_model:
            raise ConfigError(f"eval.personal_clients: {cfg.method}'s clients hold a model of another shape than the "
                              "server's (they build their own); set it to 0")
        spec, glob = method.personal_spec(), method.global_tensors()
        wrong = [n for n, shape in spec.items() if n not in glob or tuple(glob[n].shape) != shape]
        if wrong:
            raise ConfigError(f"eval.personal_clients: {cfg.method}'s global tensors are not what its clients' models "
                              f"load ({', '.join(wrong[:3])}); set it to 0")
        self.names = list(spec)

    def __call__(self, rnd: int, full: bool, own: bool = True) -> dict:
        glob = self.method.global_tensors()
        down = encode(Message(tensors={n: glob[n] for n in self.names}), "fp32")  # exact: clients see the server's
        personalised = type(self.method).personalised
        requests = {cid: {"round": rnd, "own": own, "share": [i, len(self.cids), int(full)] if personalised else None}
                    for i, cid in enumerate(self.cids)}
        replies, failures = self.exchange.evaluate(rnd, down, requests)
        pooled, own_rows, judged = EvalScores(), [], []
        for cid in self.cids:
            if cid in failures:
                self.ledger.record(rnd, cid, "down", len(down), "eval", status=failures[cid])
                log.warning("round %d: client %d did not evaluate: %s", rnd, cid, failures[cid])
                continue
            self.ledger.record(rnd, cid, "down", len(down), "eval")
            self.ledger.record(rnd, cid, "up", len(replies[cid]), "eval")
            try:
                metrics, scores = read_reply(replies[cid], cid, rnd, own, personalised)
            except PayloadError as exc:  # a bad reply is left out and logged, never fatal to the server
                log.warning("round %d: evaluation reply from client %d rejected: %s", rnd, cid, exc)
                continue
            judged.append(cid)
            if metrics is not None:
                own_rows.append(metrics)
            if scores is not None:
                pooled += scores
        row: dict = {}
        if own_rows:
            key = "accuracy" if all("accuracy" in r for r in own_rows) else "loss"
            values = [r[key] for r in own_rows]
            row |= {f"personal_{key}": float(np.mean(values)), f"personal_{key}_min": float(np.min(values)),
                    f"personal_{key}_max": float(np.max(values)), "personal_clients": judged,
                    "personal_examples": int(sum(r["eval_examples"] for r in own_rows))}
        if pooled.examples:
            row |= self.rt.task.metrics(pooled) | {"accuracy_of": "client_models"}
        return row
