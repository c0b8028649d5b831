"""The Flower exchange against a fake Grid: bad replies are rejected with a reason, never fatal."""

import time

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedzip.config import ExperimentConfig
from fedzip.deploy import exchange
from fedzip.deploy.exchange import TooFewReplies
from fedzip.deploy.task import RECORD, client_record, hosted_clients
from fedzip.engine.checkpoint import RunIdentity
from fedzip.errors import ConfigError


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Flower messages can only be built inside a Flower task; pose as one."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


RUN = RunIdentity("0" * 32, 3)


def FlowerExchange(grid, cfg, **kw):  # noqa: N802 - the exchange, begun as the engine begins it
    ex = exchange.FlowerExchange(grid, cfg, **kw)
    ex.begin(RUN)
    return ex


class FakeGrid:
    """Nodes 11 and 12 host clients by ``cid % 2``; ``answer(node, cid, rnd, payload)`` builds each reply."""

    def __init__(self, answer):
        self.answer, self.sent, self.train_messages = answer, [], 0
        self.replies, self.pulls, self.late = {}, 0, 0

    def get_node_ids(self):
        return [11, 12]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # as a real push does
            ids.append(m.object_id)
            reply = self.reply_to(m)
            if reply is not None:
                self.replies[m.object_id] = reply
        return ids

    def pull_messages(self, message_ids):
        """A reply is there from the ``late``-th ask on (as a node that is still training)."""
        self.pulls += 1
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies and self.pulls > self.late]

    def reply_to(self, m):
        node = m.metadata.dst_node_id
        TaskIdentity.node_id = node
        if m.metadata.message_type == "query":
            return Message(RecordDict({RECORD: ConfigRecord({"clients": [0, 2] if node == 11 else [1, 3]})}), reply_to=m)
        self.train_messages += 1
        records, error = {}, None  # one reply per node message, one record per client in it
        for rec in m.content.config_records.values():
            self.sent.append((node, rec["cid"], rec["round"]))
            assert (rec["run_id"], rec["epoch"]) == (RUN.run_id, RUN.epoch)  # every request says whose it is
            got = self.answer(node, rec["cid"], rec["round"], rec["payload"])
            if isinstance(got, Error):  # the whole node message fails
                error = got
            elif got is not None:  # {record name: ConfigRecord}; None: the client is left out
                records |= got
        if error is not None:
            return Message(error, reply_to=m)
        return Message(RecordDict(records), reply_to=m) if records else None


def cfg(**deploy):
    return ExperimentConfig(num_clients=4, clients_per_round=4, wire={"max_payload_bytes": 64},
                            deploy={"min_reply_fraction": 0.25, "max_round_retries": 0, "round_timeout_s": 0.5,
                                    "reply_poll_s": 0.01, **deploy})


def record(name_cid, **fields):
    return {client_record(name_cid): ConfigRecord(fields)}


def ok(node, cid, rnd, payload):
    return record(cid, payload=b"reply-" + payload, cid=cid, round=rnd)


def test_replies_reach_the_engine_and_nodes_get_their_own_clients():
    grid = FakeGrid(ok)
    ex = FlowerExchange(grid, cfg(), retry_pause_s=0)
    timing = {"compute_s": 0.0}
    replies, failures, diagnostics = ex(3, {c: bytes([c]) for c in range(4)}, timing)
    assert diagnostics == {}  # nothing but payloads crosses the network
    assert replies == {c: b"reply-" + bytes([c]) for c in range(4)} and failures == {}
    assert sorted(grid.sent) == [(11, 0, 3), (11, 2, 3), (12, 1, 3), (12, 3, 3)]
    assert grid.train_messages == 2  # one message per node and round, with each of its clients' payloads


def test_the_server_asks_for_replies_every_reply_poll_s_until_they_come_or_the_round_times_out():
    grid = FakeGrid(ok)
    ex = FlowerExchange(grid, cfg(reply_poll_s=0.05), retry_pause_s=0)
    ex.refresh_nodes()
    grid.late, grid.pulls = 4, 0  # the replies are there from the 5th ask on
    start = time.time()
    replies, failures, _ = ex(1, {c: bytes([c]) for c in range(4)}, {"compute_s": 0.0})
    assert len(replies) == 4 and not failures and grid.pulls == 5
    assert 0.2 <= time.time() - start < 1.0  # four pauses of 0.05 s, not Flower's 3 s
    grid.late, grid.pulls = 10**6, 0  # never: every client fails once round_timeout_s (0.5 s) is over
    start = time.time()
    with pytest.raises(TooFewReplies):
        ex(2, {c: bytes([c]) for c in range(4)}, {"compute_s": 0.0})
    assert 0.5 <= time.time() - start < 2.0 and 5 <= grid.pulls <= 12


def test_a_round_splits_into_the_nodes_client_time_and_what_flower_adds():
    def timed(node, cid, rnd, payload):  # client c says it trained (c + 1) / 100 s; client 3 sends nonsense
        time.sleep(0.1)  # the transport's share
        seconds = "slow" if cid == 3 else (cid + 1) / 100
        return record(cid, payload=b"r", cid=cid, round=rnd, client_s=seconds)

    timing = {"compute_s": 0.0}
    replies, _, _ = FlowerExchange(FakeGrid(timed), cfg(), retry_pause_s=0)(1, {c: b"x" for c in range(4)}, timing)
    assert len(replies) == 4
    assert timing["client_compute_s"] == {"0": 0.01, "1": 0.02, "2": 0.03}  # an unreadable timing is left out
    # nodes train in parallel, a node's clients one after another: the longest chain is node 11's, 0.01 + 0.03 s
    assert timing["compute_s"] >= 0.4 and timing["flower_s"] == pytest.approx(timing["compute_s"] - 0.04)


def test_bad_replies_are_failures_with_reasons():
    def answer(node, cid, rnd, payload):
        if cid == 0:
            return record(cid, payload=b"x" * 65, cid=cid, round=rnd)  # oversized
        if cid == 1:
            return record(cid, payload=b"x", cid=3, round=rnd)  # claims another client
        if cid == 2:
            return record(cid, cid=cid, round=rnd, error="DataError: labels ['weather'] are not in data.label_names")
        return record(cid, payload="not bytes", cid=cid, round=rnd)

    ex = FlowerExchange(FakeGrid(answer), cfg(min_reply_fraction=0.01), retry_pause_s=0)
    with pytest.raises(TooFewReplies):  # no valid reply at all: the round cannot count
        ex(1, {c: b"m" for c in range(4)}, {"compute_s": 0.0})

    def mostly_ok(node, cid, rnd, payload):
        return answer(node, cid, rnd, payload) if cid in (0, 1, 2) else ok(node, cid, rnd, payload)

    replies, failures, diagnostics = FlowerExchange(FakeGrid(mostly_ok), cfg(), retry_pause_s=0)(
        1, {c: b"m" for c in range(4)}, {"compute_s": 0.0})
    assert diagnostics == {}  # nothing but payloads crosses the network
    assert list(replies) == [3]
    assert "exceeds wire.max_payload_bytes" in failures[0]
    assert "claims client 3" in failures[1]
    assert "labels ['weather'] are not in data.label_names" in failures[2]

    def node_crash(node, cid, rnd, payload):  # node 11's ClientApp raised: both its clients fail with the reason
        return Error(code=0, reason="CUDA out of memory") if node == 11 else ok(node, cid, rnd, payload)

    replies, failures, _ = FlowerExchange(FakeGrid(node_crash), cfg(), retry_pause_s=0)(
        1, {c: b"m" for c in range(4)}, {"compute_s": 0.0})
    assert set(replies) == {1, 3} and all("CUDA out of memory" in failures[c] for c in (0, 2))

    def leaves_one_out(node, cid, rnd, payload):
        return None if cid == 2 else ok(node, cid, rnd, payload)

    replies, failures, _ = FlowerExchange(FakeGrid(leaves_one_out), cfg(), retry_pause_s=0)(
        1, {c: b"m" for c in range(4)}, {"compute_s": 0.0})
    assert set(replies) == {0, 1, 3} and "no record for client 2" in failures[2]


def test_silent_clients_are_retried_then_the_round_proceeds_or_stops():
    calls = {}

    def flaky(node, cid, rnd, payload):
        calls[cid] = calls.get(cid, 0) + 1
        return ok(node, cid, rnd, payload) if (cid != 1 or calls[cid] > 1) else None  # client 1 silent once

    grid = FakeGrid(flaky)
    replies, failures, diagnostics = FlowerExchange(grid, cfg(min_reply_fraction=1.0, max_round_retries=1), retry_pause_s=0)(
        2, {c: b"m" for c in range(4)}, {"compute_s": 0.0})
    assert diagnostics == {}  # nothing but payloads crosses the network
    assert set(replies) == {0, 1, 2, 3} and failures == {}
    assert calls == {0: 1, 1: 2, 2: 1, 3: 1}  # only the silent client was asked again

    dead = FakeGrid(lambda node, cid, rnd, payload: None if node == 11 else ok(node, cid, rnd, payload))
    replies, failures, diagnostics = FlowerExchange(dead, cfg(min_reply_fraction=0.5), retry_pause_s=0)(
        2, {c: b"m" for c in range(4)}, {"compute_s": 0.0})
    assert diagnostics == {}  # nothing but payloads crosses the network
    assert set(replies) == {1, 3} and set(failures) == {0, 2} and "no reply" in failures[0]
    with pytest.raises(TooFewReplies, match="can be resumed"):
        FlowerExchange(dead, cfg(min_reply_fraction=0.75), retry_pause_s=0)(2, {c: b"m" for c in range(4)},
                                                                           {"compute_s": 0.0})


def test_hosted_clients_split_by_partition_and_bad_node_config_is_a_config_error():
    assert hosted_clients({"partition-id": 1, "num-partitions": 3}, 8) == [1, 4, 7]
    assert hosted_clients({}, 3) == [0, 1, 2]
    with pytest.raises(ConfigError):
        hosted_clients({"partition-id": 3, "num-partitions": 3}, 8)


def test_deploy_commands_refuse_to_start_insecure_by_accident(tmp_path, capsys):
    from fedzip.cli import main

    assert main(["deploy", "supernode", "--superlink", "h:9092", "--partition-id", "0", "--num-partitions", "2"]) == 2
    assert "--credentials DIR is required" in capsys.readouterr().err
    assert main(["deploy", "superlink", "--credentials", str(tmp_path)]) == 2  # no ca.crt there
    assert "ca.crt not found" in capsys.readouterr().err
    assert main(["deploy", "local", "--tls", str(tmp_path), "--out", str(tmp_path / "run")]) == 1
    assert "needs ca.crt" in capsys.readouterr().err


def test_credentials_make_a_ca_signed_server_cert_and_openssh_node_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    from fedzip.deploy.credentials import make_credentials

    paths = make_credentials(tmp_path, nodes=2, hosts=["10.1.2.3", "link.example.org"])
    ca = x509.load_pem_x509_certificate(paths["ca_cert"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "link.example.org" in san.get_values_for_type(x509.DNSName)
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.1.2.3"]
    load_ssh_public_key(paths["node1_pub"].read_bytes())
    assert oct(paths["node0_key"].stat().st_mode & 0o777) == "0o600"


def test_credentials_are_private_from_their_first_byte_and_never_silently_replaced(tmp_path, monkeypatch):
    import os
    import stat

    from fedzip.deploy.credentials import make_credentials

    made = {}  # every file the credentials are written to, with the mode it was created with
    real_open = os.open

    def spy(path, flags, mode=0o777, *a, **k):
        if flags & os.O_CREAT:
            made[os.path.basename(path)] = (mode, bool(flags & os.O_EXCL))
        return real_open(path, flags, mode, *a, **k)

    monkeypatch.setattr(os, "open", spy)
    out = tmp_path / "creds"
    paths = make_credentials(out, nodes=2, hosts=[])
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for key in ("ca.key", "superlink.key", "node0.key", "node1.key"):
        assert made[key] == (0o600, True), key  # created 0600 and exclusively, not chmod-ed afterwards
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600
    ca = paths["ca_key"].read_bytes()
    with pytest.raises(ConfigError, match="already holds ca.crt"):
        make_credentials(out, nodes=2, hosts=[])
    assert paths["ca_key"].read_bytes() == ca
    make_credentials(out, nodes=2, hosts=[], force=True)
    assert paths["ca_key"].read_bytes() != ca
