"""The SuperNode's worker (model and data kept between Flower messages) and nodes with data of their own.

The Flower legs (a real SuperLink and SuperNodes) are in test_deploy.py; these check the worker and the
node-side data path directly.
"""

import json
import os
import socket
import stat

import pytest
import torch
from helpers import node_file

from fedzip.config import load_config
from fedzip.deploy import node_worker
from fedzip.deploy.node_worker import NodeWorker, recv_frame, send_frame
from fedzip.engine import run_experiment
from fedzip.errors import ConfigError


def test_frames_round_trip_and_bad_frames_are_refused():
    a, b = socket.socketpair()
    with a, b:
        send_frame(a, {"op": "train", "cid": 3}, b"\x00payload\xff")
        assert recv_frame(b) == ({"op": "train", "cid": 3}, b"\x00payload\xff")
        a.sendall((node_worker.MAX_HEADER + 1).to_bytes(4, "big"))
        with pytest.raises(ValueError, match="header"):
            recv_frame(b)
    a, b = socket.socketpair()
    with a, b:
        head = json.dumps([1, 2]).encode()
        a.sendall(len(head).to_bytes(4, "big") + head + (0).to_bytes(8, "big"))
        with pytest.raises(ValueError, match="JSON object"):
            recv_frame(b)


def test_the_first_call_starts_one_private_worker_that_later_calls_reuse(tmp_path):
    state = tmp_path / "node-state"
    try:
        first, _ = node_worker.call(state, {"op": "ping"}, b"", idle_s=60)
        second, _ = node_worker.call(state, {"op": "ping"}, b"", idle_s=60)
        assert first["ok"] and first["pid"] == second["pid"] != os.getpid()
        sock = node_worker.socket_path(state)
        assert stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0  # only the node's user may connect
        reply, _ = node_worker.call(state, {"op": "explode"}, b"")
        assert reply == {"error": "unknown request 'explode'", "kind": "PayloadError"}
    finally:
        assert node_worker.stop(state)
    assert not (state / "worker.pid").exists() and not node_worker.socket_path(state).exists()
    assert not node_worker.stop(state)  # nothing left to stop


def test_a_state_dir_too_deep_for_a_unix_socket_gets_a_private_socket_elsewhere(tmp_path):
    deep = tmp_path.joinpath(*["d" * 30] * 5)
    path = node_worker.socket_path(deep)
    assert len(str(path).encode()) < 100 and path.parent != deep
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert node_worker.socket_path(deep) == path  # every ClientApp of that node finds the same one


def on_nodes(tiny_cfg, *extra):
    return load_config("quickstart", tiny_cfg + ["deploy.client_data=on_nodes",
                                                 "data.label_names=[sport, politics, tech]", *extra])


def train_request(cfg_overrides, node_config, cid=0, rnd=1, run_id="0" * 32, epoch=1):
    return {"op": "train", "cid": cid, "round": rnd, "node_config": node_config, "run_id": run_id, "epoch": epoch,
            "run_config": {"config": "quickstart", "overrides": ";".join(cfg_overrides)}}


def test_a_node_with_its_own_file_splits_only_that_file_among_its_clients(tmp_path, tiny_cfg):
    cfg = on_nodes(tiny_cfg)
    own = node_file(tmp_path / "node1.jsonl", 30, ["tech", "sport"])
    method = NodeWorker().client_method(cfg, {"partition-id": 1, "num-partitions": 2, "data-file": str(own)})
    rt = method.rt
    assert rt.task.train_data.texts[0].startswith("node text 0")
    assert len(rt.task.train_data) == 30 and len(rt.task.test_data) == 0  # a node evaluates nothing
    hosted, others = [1, 3], [0, 2]
    assert sorted(int(i) for c in hosted for i in rt.parts[c]) == list(range(30))
    assert all(len(rt.parts[c]) == 0 for c in others)
    assert rt.task.train_data.label_names == ["sport", "politics", "tech"]  # the run's ids, not the file's order
    assert set(rt.task.train_data.labels) == {0, 2}


def test_node_data_that_disagrees_with_the_run_gives_one_clear_error(tmp_path, tiny_cfg):
    overrides = tiny_cfg + ["deploy.client_data=on_nodes", "data.label_names=[sport, politics, tech]"]
    stray = node_file(tmp_path / "stray.jsonl", 12, ["sport", "weather"])
    reply, up = NodeWorker().handle(train_request(overrides, {"data-file": str(stray)}), b"")
    assert up == b"" and reply["kind"] == "DataError"
    assert "labels ['weather'] are not in data.label_names" in reply["error"]
    reply, _ = NodeWorker().handle(train_request(overrides, {}), b"")
    assert reply["kind"] == "ConfigError" and "no data-file" in reply["error"]
    good = node_file(tmp_path / "good.jsonl", 12, ["sport"])
    reply, _ = NodeWorker().handle(train_request(tiny_cfg, {"data-file": str(good)}), b"")
    assert reply["kind"] == "ConfigError" and "deploy.client_data: on_nodes" in reply["error"]
    unlabelled = tiny_cfg + ["deploy.client_data=on_nodes"]
    reply, _ = NodeWorker().handle(train_request(unlabelled, {"data-file": str(good)}), b"")
    assert reply["kind"] == "DataError" and "needs data.label_names" in reply["error"]


def test_a_simulation_refuses_client_data_on_nodes(tmp_path, tiny_cfg):
    with pytest.raises(ConfigError, match="run it on Flower"):
        run_experiment(on_nodes(tiny_cfg), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# -- a worker that no peer can stop, and client state that no stale message can roll back ---------------------
@pytest.fixture
def serving(tmp_path, monkeypatch):
    """A worker serving from a thread of this process, with a 1 s timeout for silent connections."""
    import threading

    monkeypatch.setattr(node_worker, "CONNECTION_TIMEOUT_S", 1.0)
    state = tmp_path / "node-state"
    thread = threading.Thread(target=node_worker.serve, args=(state, 30.0), daemon=True)
    thread.start()
    path = node_worker.socket_path(state)
    for _ in range(200):
        if path.exists():
            break
        import time

        time.sleep(0.05)
    yield state, path
    (state / "worker.pid").unlink(missing_ok=True)


def dropped(sock) -> bool:
    """The worker closed the connection without a reply (a reset when it left our bytes unread)."""
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def ping(state):
    reply, _ = node_worker.call(state, {"op": "ping"}, b"")
    return reply.get("ok") is True


def test_the_worker_survives_hostile_peers_and_serves_the_next_request(serving):
    import time

    state, path = serving
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    # a header nested 100,000 deep: refused before the parser recurses, the worker and its socket stay
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        head = b'{"op":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        s.sendall(len(head).to_bytes(4, "big") + head + (0).to_bytes(8, "big"))
        assert dropped(s)
    assert ping(state)
    # a payload frame larger than the run's wire.max_payload_bytes: refused before a byte of it is read
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        head = json.dumps({"op": "train", "run_config": {"config": "quickstart",
                                                         "overrides": "wire.max_payload_bytes=1000"}}).encode()
        s.sendall(len(head).to_bytes(4, "big") + head + (16 << 30).to_bytes(8, "big") + b"x" * 4096)
        assert dropped(s)
    assert ping(state)
    # a peer that connects and sends nothing holds the worker up for the connection timeout, not forever
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(str(path))
    t0 = time.time()
    assert ping(state) and time.time() - t0 < 5
    silent.close()
    assert path.exists()


def test_a_stale_request_is_refused_before_it_touches_the_runs_state(tmp_path, tiny_cfg):
    """A killed attempt's round-3 message (epoch 1) that arrives after the resumed run (epoch 2) served round 5
    must not roll client 0 back; a request without the run's identity is refused too."""
    from fedzip.engine.state import ClientStateStore

    node = {"state-dir": str(tmp_path / "state"), "partition-id": 0, "num-partitions": 1}
    run_id = "ab" * 16
    store = ClientStateStore(tmp_path / "state" / run_id)
    store.save(0, 5, {"residual": torch.ones(3)})
    node_worker.admit(store.root, 2, 5)  # the resumed run's round 5 has been served
    stale = train_request(tiny_cfg, node, cid=0, rnd=3, run_id=run_id, epoch=1)
    reply, up = NodeWorker().handle(stale, b"")
    assert reply["kind"] == "PayloadError" and "stale request refused" in reply["error"] and up == b""
    assert torch.equal(store.load(0)["residual"], torch.ones(3))  # round 5's state is still there
    old_server = {k: v for k, v in train_request(tiny_cfg, node, cid=0, rnd=6).items() if k not in ("run_id", "epoch")}
    for request in (old_server, train_request(tiny_cfg, node, cid=0, rnd=6, run_id="../../etc", epoch=3)):
        reply, _ = NodeWorker().handle(request, b"")
        assert reply["kind"] == "PayloadError" and "run_id" in reply["error"]
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [run_id]  # nothing made for a bad id


def test_each_run_keeps_its_own_client_state(tmp_path, tiny_cfg):
    """A fresh run of the same config (a new run id) starts from no client state, not the previous run's."""
    node = {"state-dir": str(tmp_path / "state"), "partition-id": 0, "num-partitions": 1}
    worker = NodeWorker()
    for run_id in ("01" * 16, "02" * 16):
        request = train_request(tiny_cfg, node, cid=0, rnd=1, run_id=run_id)
        _, store, _, _ = worker._client(request)
        assert store.root == tmp_path / "state" / run_id and store.load(0) == {}
        store.save(0, 1, {"opt": torch.ones(2)})
