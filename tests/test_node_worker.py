"""The SuperNode's worker (model and data kept between Flower messages) and nodes with data of their own.

The Flower legs (a real SuperLink and SuperNodes) are in test_deploy.py; these check the worker and the
node-side data path directly.
"""

import json
import os
import socket
import stat

import pytest
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


def train_request(cfg_overrides, node_config, cid=0, rnd=1):
    return {"op": "train", "cid": cid, "round": rnd, "node_config": node_config,
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
