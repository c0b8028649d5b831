"""fedzip's ClientApp, except on a node whose config sets ``hostile = true``: there every client's reply record is
replaced, round by round, with one of the attacks a server must survive (tests/test_deploy.py)."""

import json

import zstandard
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedzip.deploy import client_app as fedzip_app
from fedzip.wire import decode
from fedzip.wire.payload import PREFIX

app = ClientApp()


def _payload(header: bytes) -> bytes:
    packed = zstandard.ZstdCompressor(write_checksum=True).compress(header)
    return PREFIX.pack(b"FZP2", len(packed)) + packed


def _nan_meta(good: bytes) -> bytes:
    meta = decode(good).meta
    return _payload(json.dumps({"meta": {**meta, "train_loss": float("nan")}, "tensors": []}).encode())


# round -> what the hostile node's record for a client becomes: (payload, claimed cid, claimed round)
ATTACKS = {
    1: lambda cid, rnd, good: (_payload(b'{"meta":{"n":' + b"9" * 5000 + b'},"tensors":[]}'), cid, rnd),  # huge int
    2: lambda cid, rnd, good: (good, cid ^ 2, rnd),  # another client's id
    3: lambda cid, rnd, good: (_nan_meta(good), cid, rnd),
    4: lambda cid, rnd, good: (good, cid, rnd - 1),  # a stale round
    5: lambda cid, rnd, good: (good[: len(good) // 2], cid, rnd),  # truncated
    6: lambda cid, rnd, good: (good + b"\0" * (1 << 20), cid, rnd),  # beyond wire.max_payload_bytes
    7: lambda cid, rnd, good: (_payload(b'{"meta":' + b"[" * 50_000 + b"]" * 50_000 + b',"tensors":[]}'), cid, rnd),
}


@app.query()
def query(msg: Message, context: Context) -> Message:
    return fedzip_app.query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = fedzip_app.train(msg, context)
    if str(context.node_config.get("hostile", "")).lower() != "true":
        return reply
    out = {}
    for name, rec in reply.content.config_records.items():
        cid, rnd, good = rec["cid"], rec["round"], rec["payload"]
        payload, claimed_cid, claimed_round = ATTACKS[rnd](cid, rnd, good)
        out[name] = ConfigRecord({"payload": payload, "cid": claimed_cid, "round": claimed_round,
                                  "client_s": rec["client_s"]})
    return Message(RecordDict(out), reply_to=msg)
