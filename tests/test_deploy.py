"""Flower deployment: a real SuperLink and SuperNodes on 127.0.0.1 run fedzip's app.

Each run is checked against the in-process simulation with the same config and seed: the final
adapter must be bit-identical, and the ledger must equal the payload bytes the SuperNodes themselves
say they received and sent.
"""

import json
import subprocess
import time
from pathlib import Path

import pytest
from helpers import assert_same_adapter, flower_logs, flower_run, node_file, simulate

from fedzip.deploy.credentials import make_credentials
from fedzip.deploy.local import LocalFederation
from fedzip.engine.ledger import read_ledger
from fedzip.errors import FedzipError

pytestmark = pytest.mark.deploy


def test_a_killed_supernode_fails_its_clients_and_rejoins_later(tmp_path, tiny_cfg):
    # the timeout must cover a live node's two clients on a busy machine (a fresh ClientApp process each)
    overrides = tiny_cfg + ["rounds=6", "num_clients=4", "clients_per_round=4", "deploy.round_timeout_s=90",
                            "deploy.min_reply_fraction=0.5", "deploy.max_round_retries=0"]
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    rounds_done = lambda: len(metrics.read_text().splitlines()) if metrics.exists() else 0  # noqa: E731
    with LocalFederation(tmp_path / "flower", nodes=2) as fed:
        flower_run(fed, overrides, out, until=lambda: rounds_done() >= 1)
        fed.kill_node(0)  # hosts clients 0 and 2
        deadline = time.time() + 200
        while rounds_done() < 2:
            assert time.time() < deadline, flower_logs(fed)
            time.sleep(0.5)
        fed.start_node(0)  # comes back (as a new node id) with the same partition
        deadline = time.time() + 400
        while not (out / "summary.json").exists():
            assert time.time() < deadline, flower_logs(fed)
            time.sleep(0.5)
    ledger = read_ledger(out / "ledger.jsonl")
    failed = {(e["round"], e["client"]) for e in ledger if "status" in e}
    assert {c for r, c in failed if r == 2} == {0, 2}  # the dead node's clients, logged, not fatal
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert rows[1]["failed"] == [0, 2] and len(rows) == 6
    ups = {(e["round"], e["client"]) for e in ledger if e["direction"] == "up"}
    assert any((r, 0) in ups for r in range(3, 7)), "the restarted node never took part again"


def test_server_killed_after_a_round_resumes_to_the_same_adapter(tmp_path, tiny_cfg):
    overrides = tiny_cfg + ["rounds=3", "num_clients=4", "clients_per_round=2", "method=flasc",
                            "method_options={d_dl: 0.5, d_ul: 0.25, error_feedback: true}"]
    sim = simulate(tmp_path, overrides)
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "state.json"
    with LocalFederation(tmp_path / "flower", nodes=2) as fed:
        flower_run(fed, overrides, out, until=lambda: ckpt.exists() and json.loads(ckpt.read_text())["round"] >= 1)
        assert fed.kill_serverapps() >= 1
        assert not (out / "summary.json").exists()
        flower_run(fed, overrides, out, resume=True)
    assert_same_adapter(out, sim)
    assert read_ledger(out / "ledger.jsonl") == read_ledger(sim / "ledger.jsonl")


def test_a_hostile_supernode_cannot_stop_the_run_and_its_replies_count_as_silence(tmp_path, tiny_cfg, monkeypatch):
    """Node 1 (clients 1 and 3) answers every round with another attack (a 5,000-digit integer, another client's
    id, NaN meta, a stale round, a truncated payload, an oversized one, JSON nested 100,000 deep): the run
    completes, each of those replies is a logged failure, and the adapter is that of a simulation in which
    clients 1 and 3 never replied."""
    from test_robustness import Hostile

    import fedzip.engine.rounds as sim

    overrides = tiny_cfg + ["rounds=7", "num_clients=4", "clients_per_round=4", "deploy.max_round_retries=0",
                            "deploy.min_reply_fraction=0.5", "wire.max_payload_bytes=200000"]
    real = sim.InProcessExchange
    monkeypatch.setattr(sim, "InProcessExchange", lambda *a: Hostile(real(*a), {1, 3}, None))
    quiet = simulate(tmp_path, overrides)
    monkeypatch.setattr(sim, "InProcessExchange", real)
    out = tmp_path / "run"
    app = Path(__file__).resolve().parent / "flower_hostile_app"
    with LocalFederation(tmp_path / "flower", nodes=2, per_node={1: {"hostile": "true"}}, app_dir=app) as fed:
        flower_run(fed, overrides, out)
    assert_same_adapter(out, quiet)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 7
    for row in rows:  # refused by the exchange (failed) or by the decoder (rejected): never accepted
        assert sorted(row.get("failed", []) + row["rejected"]) == [1, 3], row
    ledger = read_ledger(out / "ledger.jsonl")
    for rnd in range(1, 8):  # each hostile reply has its reason in the ledger, beside the bytes that arrived
        for cid in (1, 3):
            lines = [e for e in ledger if (e["round"], e["client"]) == (rnd, cid)]
            assert any(e.get("status") or e.get("rejected") for e in lines), (rnd, cid, lines)


def test_tls_with_node_authentication_runs_and_refuses_unregistered_nodes(tmp_path, tiny_cfg):
    creds = tmp_path / "creds"
    make_credentials(creds, nodes=3, hosts=[])
    overrides = tiny_cfg + ["rounds=1", "num_clients=4", "clients_per_round=2"]
    sim = simulate(tmp_path, overrides)
    with LocalFederation(tmp_path / "flower", nodes=2, credentials=creds) as fed:
        config = (fed.home / "config.toml").read_text()
        assert "insecure" not in config and "root-certificates" in config
        fed.start_node(2)  # its key (node2) was never registered on the SuperLink
        intruder = fed.supernodes[2]
        flower_run(fed, overrides, tmp_path / "run")
        deadline = time.time() + 60
        while intruder.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert intruder.returncode not in (None, 0), "an unregistered SuperNode was let in"
    assert_same_adapter(tmp_path / "run", sim)


def test_the_documented_deploy_local_command_runs_a_federation(tmp_path, tiny_cfg, capsys):
    from fedzip.cli import main

    args = ["deploy", "local", "--nodes", "2", "--out", str(tmp_path / "run")]
    for o in tiny_cfg + ["rounds=1"]:
        args += ["--set", o]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "on Flower (2 SuperNodes): 1 rounds" in out
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert "round 1/1: up" in out and "Flower" in out.split("round 1/1: up")[1].splitlines()[0]  # the time split
    traffic = json.loads((tmp_path / "run" / "flower_traffic.json").read_text())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert traffic["ledger_up_bytes"] == summary["bytes_up_total"] and traffic["down_messages"] == 2
    # Flower's own count wraps every payload in an envelope: more bytes, but not many more a message
    assert 0 < traffic["envelope_down_per_message"] < 100_000 and 0 < traffic["envelope_up_per_message"] < 100_000
    assert "Flower's envelope is" in out
    assert main(["deploy", "app"]) == 0 and (Path(capsys.readouterr().out.strip()) / "pyproject.toml").exists()


def test_the_documented_real_machine_commands_work(tmp_path, tiny_cfg):
    """The deployment guide's "Real machines": credentials, `fedzip deploy superlink/supernode`, register, `flwr run`."""
    import os
    import subprocess
    import sys

    from fedzip.deploy.local import APP_DIR, _kill, flower_env, free_port, toml_value, wait_for_port

    home = tmp_path / "flwr-home"
    home.mkdir()
    env = flower_env(home)
    fz = [sys.executable, "-m", "fedzip.cli", "deploy"]
    subprocess.run(fz + ["credentials", "--out", str(tmp_path / "creds"), "--nodes", "2", "--host", "127.0.0.1"],
                   check=True, env=env, cwd=tmp_path)
    port = free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "prod"\n\n[superlink.prod]\naddress = "127.0.0.1:{port}"\n'
                                      f'root-certificates = "{tmp_path / "creds" / "ca.crt"}"\n')
    log = open(tmp_path / "flower.log", "a")
    spawn = lambda cmd: subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,  # noqa: E731
                                         start_new_session=True)
    procs = [spawn(fz + ["superlink", "--credentials", "creds", "--host", "127.0.0.1", "--port", str(port)])]
    try:
        wait_for_port(port, 60, procs[0], tmp_path / "flower.log")
        for i in range(2):
            subprocess.run(["flwr", "supernode", "register", f"creds/node{i}.pub", "prod"], check=True, env=env,
                           cwd=tmp_path, capture_output=True, timeout=120)
            procs.append(spawn(fz + ["supernode", "--superlink", f"127.0.0.1:{port}", "--credentials", "creds",
                                     "--partition-id", str(i), "--num-partitions", "2", "--port", str(free_port()),
                                     "--state-dir", str(tmp_path / f"state{i}")]))
        run_cfg = tmp_path / "run.toml"
        run_cfg.write_text(f'config = "quickstart"\noverrides = {toml_value(";".join(tiny_cfg + ["rounds=1"]))}\n'
                           f'out = "{tmp_path / "run"}"\n')
        res = subprocess.run(["flwr", "run", str(APP_DIR), "prod", "--run-config", str(run_cfg)],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        deadline = time.time() + 400  # the run goes on in the SuperLink; it ends with its summary
        while not (tmp_path / "run" / "summary.json").exists():
            assert time.time() < deadline, (tmp_path / "flower.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        for p in procs:
            _kill(p)
    assert os.path.exists(tmp_path / "superlink.db")  # state kept for a restarted SuperLink


def test_nodes_with_their_own_data_train_only_on_their_own_files(tmp_path, tiny_cfg):
    """deploy.client_data: on_nodes: each SuperNode's clients split its data-file; the server learns only
    the example counts the replies carry (here: node 0's clients share 40 examples, node 1's 70)."""
    files = {0: node_file(tmp_path / "a.jsonl", 40, ["sport", "politics"]),
             1: node_file(tmp_path / "b.jsonl", 70, ["tech", "sport"])}
    overrides = tiny_cfg + ["deploy.client_data=on_nodes", "data.label_names=[sport, politics, tech]",
                            "rounds=2", "clients_per_round=4"]
    out = tmp_path / "run"
    with LocalFederation(tmp_path / "flower", nodes=2, per_node={i: {"data-file": str(f)} for i, f in files.items()}
                         ) as fed:
        flower_run(fed, overrides, out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        seen = row["client_examples"]
        assert sorted(seen) == ["0", "1", "2", "3"]
        assert seen["0"] + seen["2"] == 40 and seen["1"] + seen["3"] == 70
    assert "on their SuperNodes" in (out / "partition.json").read_text()


def test_waiting_for_a_run_ends_when_its_summary_is_written_and_fails_at_once_when_submitting_failed(tmp_path):
    # no federation needed: a CLI still running, a run folder whose ServerApp has finished, and a CLI that failed
    fed = LocalFederation(tmp_path / "home", nodes=1)
    fed.home.mkdir(parents=True)
    cli = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        out = tmp_path / "run"
        out.mkdir()
        with pytest.raises(FedzipError, match="in time .*flwr run still running, 0 ServerApp process.*summary not written"):
            fed.wait_for_run(cli, out, deadline=time.time() + 1.0)
        (out / "summary.json").write_text("{}")
        assert fed.wait_for_run(cli, out, deadline=time.time() + 30.0)
    finally:
        cli.kill()
        cli.wait()
    fed.cli_log.write_text("Connection to the SuperLink is unavailable.\n")
    failed = subprocess.Popen(["false"])
    failed.wait()
    with pytest.raises(FedzipError, match="could not submit the run .code 1.: Connection to the SuperLink is unavail"):
        fed.wait_for_run(failed, tmp_path / "other", deadline=time.time() + 30.0)


def test_stopping_a_federation_stops_its_superlink_supernodes_and_node_workers(tmp_path):
    from fedzip.deploy import node_worker

    fed = LocalFederation(tmp_path / "flower", nodes=2).start()
    try:
        workers = [node_worker.call(fed.state_dir(i), {"op": "ping"}, b"", idle_s=60)[0]["pid"] for i in range(2)]
        procs = [fed.superlink, *fed.supernodes.values()]
    finally:
        fed.stop()
    assert all(p.poll() is not None for p in procs)  # each has exited and been waited for
    for i, pid in enumerate(workers):
        assert not (fed.state_dir(i) / "worker.pid").exists()
        status = Path(f"/proc/{pid}/status")  # started from this process, an exited worker stays a zombie until reaped
        assert not status.exists() or "\nState:\tZ" in status.read_text()
    assert fed.superlink is None and not fed.supernodes
