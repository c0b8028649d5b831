"""A whole Flower federation on this machine: one SuperLink, N SuperNodes, and ``flwr run`` of the fedzip app.

For trying a deployment out and for tests; real machines run the same three commands by hand
(docs/how-to/deploy-on-flower.md). Flower runs offline: no update check, no telemetry, no dependency installation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedzip.deploy import node_worker
from fedzip.errors import FedzipError
from fedzip.progress import round_line
from fedzip.rundir import RunDir, read_jsonl

APP_DIR = Path(__file__).resolve().parent / "app"
CONNECTION = "fedzip-local"


def flower_env(home: Path) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)  # flower-superexec etc. are found on PATH
    return dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0",
                PATH=bindir + os.pathsep + os.environ.get("PATH", ""), PYTHONUNBUFFERED="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise FedzipError(f"the SuperLink exited at start-up (code {proc.returncode}); see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FedzipError(f"the SuperLink did not open port {port} within {timeout:.0f} s; see {log}")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class LocalFederation:
    """SuperLink + SuperNodes as child processes; every log goes to ``home``."""

    def __init__(self, home: Path, nodes: int, node_config: dict[str, str] | None = None,
                 credentials: Path | None = None, per_node: dict[int, dict] | None = None, app_dir: Path = APP_DIR):
        if nodes < 1:
            raise FedzipError("a federation needs at least one SuperNode")
        self.home = Path(home).resolve()
        self.nodes = nodes
        self.node_config = node_config or {}  # every node's
        self.per_node = per_node or {}  # node i's own settings on top, e.g. {0: {"data-file": ...}}
        self.app_dir = Path(app_dir)  # the Flower App that `submit` runs (fedzip's own by default)
        # With credentials (fedzip deploy credentials): TLS everywhere and only registered SuperNodes.
        self.creds = Path(credentials).resolve() if credentials else None
        self.port = free_port()
        self.env = flower_env(self.home)
        self.superlink: subprocess.Popen | None = None
        self.supernodes: dict[int, subprocess.Popen] = {}
        self._cli_log_from = 0  # where the latest submission's CLI output starts in flwr-run.log

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.home / f"{name}.log", "a")
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.home,
                                start_new_session=True)  # its own group: stopping it stops its children

    def start(self, timeout: float = 60.0) -> "LocalFederation":
        self.home.mkdir(parents=True, exist_ok=True)
        security = (f'root-certificates = "{self.creds / "ca.crt"}"\n' if self.creds else "insecure = true\n")
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\n{security}')
        tls = (["--ssl-ca-certfile", str(self.creds / "ca.crt"), "--ssl-certfile", str(self.creds / "superlink.crt"),
                "--ssl-keyfile", str(self.creds / "superlink.key"), "--enable-supernode-auth"]
               if self.creds else ["--insecure"])
        self.superlink = self._spawn("superlink", [
            "flower-superlink", *tls, "--disable-runtime-dependency-installation",
            "--database", str(self.home / "superlink.db"), "--host", "127.0.0.1", "--port", str(self.port)])
        wait_for_port(self.port, timeout, self.superlink, self.home / "superlink.log")
        for i in range(self.nodes):
            if self.creds:
                self.register_node(self.creds / f"node{i}.pub")
            self.start_node(i)
        return self

    def register_node(self, public_key: Path) -> None:
        """Allow a SuperNode's key in (SuperNode authentication), as the SuperLink's operator would."""
        try:
            res = subprocess.run(["flwr", "supernode", "register", str(public_key), CONNECTION], env=self.env,
                                 cwd=self.home, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise FedzipError(f"registering {public_key.name}: the SuperLink did not answer within 120 s") from None
        if res.returncode != 0:
            raise FedzipError(f"registering {public_key.name} failed: {(res.stdout + res.stderr).strip()[-300:]}")

    def start_node(self, i: int) -> None:
        cfg = {"partition-id": i, "num-partitions": self.nodes, **self.node_config, **self.per_node.get(i, {}),
               "state-dir": str(self.state_dir(i))}
        node_cfg = " ".join(f"{k}={toml_value(v)}" for k, v in cfg.items())
        security = (["--root-certificates", str(self.creds / "ca.crt"),
                     "--auth-supernode-private-key", str(self.creds / f"node{i}.key")] if self.creds else ["--insecure"])
        self.supernodes[i] = self._spawn(f"supernode{i}", [
            "flower-supernode", *security, "--superlink", f"127.0.0.1:{self.port}",
            "--port", str(free_port()), "--node-config", node_cfg])

    def kill_node(self, i: int) -> None:
        _kill(self.supernodes.pop(i))

    def submit(self, config: str, overrides: list[str], out: Path, resume: bool = False) -> subprocess.Popen:
        """``flwr run`` the fedzip app; the CLI exits once the SuperLink has accepted the run.

        Without ``--stream``: Flower 1.41's HTTP SuperLink was twice seen to stop answering every client (the
        CLI, the SuperNodes, the ServerApp) about a second after a log stream opened on a loaded machine, so
        the run is watched through its own files instead (``wait_for_run``; ``deploy_local`` echoes rounds)."""
        bad = [o for o in overrides if ";" in o]
        if bad:
            raise FedzipError(f"overrides cannot contain ';' in a deployment: {bad[0]}")
        run_cfg = self.home / "run-config.toml"
        run_cfg.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in {
            "config": config, "overrides": ";".join(overrides), "out": str(Path(out).resolve()),
            "resume": resume}.items()))
        self._cli_log_from = self.cli_log.stat().st_size if self.cli_log.exists() else 0
        log = open(self.cli_log, "a")
        return subprocess.Popen(["flwr", "run", str(self.app_dir), CONNECTION, "--run-config", str(run_cfg)],
                                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.home,
                                start_new_session=True)

    @property
    def cli_log(self) -> Path:
        return self.home / "flwr-run.log"

    def submitted_run_id(self) -> int | None:
        """The id ``flwr run`` printed for the latest submission, once it has."""
        if not self.cli_log.exists():
            return None
        with open(self.cli_log, "rb") as f:
            f.seek(self._cli_log_from)
            found = re.findall(rb"started run (\d+)", f.read())
        return int(found[-1]) if found else None

    def run_status(self, run_id: int) -> str | None:
        """Flower's status of a run (pending, starting, running, finished:completed|failed|stopped), or None
        when the SuperLink does not say."""
        runs = self.runs(run_id)
        return runs[0].get("status") if runs else None

    def runs(self, run_id: int | None = None) -> list[dict]:
        """The SuperLink's record of its runs (``flwr ls --format json``): status, and the run's network traffic
        as Flower counts it (the protobuf messages and objects to and from SuperNodes, without gRPC framing)."""
        try:
            only = ["--run-id", str(run_id)] if run_id is not None else []
            res = subprocess.run(["flwr", "ls", CONNECTION, *only, "--format", "json"], env=self.env, cwd=self.home,
                                 capture_output=True, text=True, timeout=120)
            return json.loads(res.stdout).get("runs", [])
        except (subprocess.TimeoutExpired, json.JSONDecodeError, AttributeError):
            return []

    def traffic(self, ledger_path: Path) -> dict | None:
        """:func:`flower_traffic` of this federation's latest run, or None when the SuperLink gave no record."""
        runs = self.runs()
        return flower_traffic(max(runs, key=lambda r: int(r["run-id"])), ledger_path) if runs else None

    def kill_serverapps(self) -> int:
        """Kill the ServerApp processes (as a crash of the server would); returns how many."""
        mine = self.serverapp_pids()
        for pid in mine:
            os.kill(pid, signal.SIGKILL)
        return len(mine)

    def serverapp_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-f", "flwr-serverapp"], capture_output=True, text=True).stdout.split()
        return [int(p) for p in out if _env_home(int(p)) == str(self.home)]

    def wait_for_run(self, run: subprocess.Popen, out: Path, deadline: float | None = None, tick=None,
                     status_every_s: float = 5.0) -> bool:
        """Wait until a submitted run ends; True when it wrote its summary.

        The run has ended when its summary is written and its ServerApp has exited, or when Flower reports it
        finished without a summary (a failed or stopped run). Errors at once when ``flwr run`` could not
        submit, or when the SuperLink itself has exited."""
        def fail(why: str):
            raise FedzipError(f"{why} ({self.diagnosis(run, out)}); logs in {self.home}")

        last_status_check = 0.0
        while True:
            if tick is not None:
                tick()
            if self.superlink is not None and self.superlink.poll() is not None:
                fail(f"the SuperLink exited (code {self.superlink.returncode})")
            if run.poll() not in (None, 0):
                fail(f"flwr run could not submit the run (code {run.returncode}): {_tail(self.cli_log, 400)}")
            alive = self.serverapp_pids()
            if RunDir(out).finished() and not alive:
                return True
            run_id = self.submitted_run_id()
            if not alive and run_id is not None and time.time() - last_status_check > status_every_s:
                last_status_check = time.time()
                status = self.run_status(run_id) or ""
                if status.startswith("finished"):
                    return RunDir(out).finished()
            if deadline is not None and time.time() > deadline:
                fail("the run did not finish in time")
            time.sleep(0.5)

    def diagnosis(self, run: subprocess.Popen, out: Path) -> str:
        """Where a run stands, for the error that reports it."""
        link = ("no SuperLink" if self.superlink is None else "SuperLink alive" if self.superlink.poll() is None
                else f"SuperLink exited with code {self.superlink.returncode}")
        return (f"{link}, flwr run {'still running' if run.poll() is None else f'exited with {run.returncode}'}, "
                f"{len(self.serverapp_pids())} ServerApp process(es) alive, "
                f"summary {'written' if (out / 'summary.json').exists() else 'not written'}, "
                f"ledger lines {_count_lines(out / 'ledger.jsonl')}")

    def save_serverapp_log(self) -> Path | None:
        """The latest run's ServerApp output as the SuperLink kept it (``flwr log --show``), saved beside the
        other logs; None when there is no run or the SuperLink does not answer."""
        run_id = self.submitted_run_id()
        if run_id is None:
            return None
        try:
            res = subprocess.run(["flwr", "log", str(run_id), CONNECTION, "--show"], env=self.env, cwd=self.home,
                                 capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return None
        path = self.home / "serverapp.log"
        path.write_text(res.stdout + res.stderr)
        return path

    def state_dir(self, i: int) -> Path:
        own = {**self.node_config, **self.per_node.get(i, {})}
        return Path(str(own.get("state-dir") or self.home / f"node{i}-state"))

    def stop(self) -> None:
        """Stop the SuperNodes, each node's worker (node_worker.py outlives its ClientApps) and the SuperLink, all
        at once: each takes seconds to exit after SIGTERM, and none waits on another to do so."""
        stops = [lambda proc=proc: _kill(proc) for proc in self.supernodes.values()]
        stops += [lambda i=i: node_worker.stop(self.state_dir(i)) for i in range(self.nodes)]
        if self.superlink is not None:
            stops.append(lambda proc=self.superlink: _kill(proc))
        with ThreadPoolExecutor(max_workers=len(stops)) as pool:
            for done in [pool.submit(stop) for stop in stops]:
                done.result()
        self.supernodes.clear()
        self.superlink = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _env_home(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"FLWR_HOME="):
            return kv[len(b"FLWR_HOME="):].decode()
    return None


def _kill(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except (subprocess.TimeoutExpired, ProcessLookupError, PermissionError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def deploy_local(config: str | None, overrides: list[str], nodes: int, out: Path, resume: bool = False,
                 timeout_s: float | None = None, credentials: str | None = None) -> Path:
    """Start a federation, run one experiment on it to the end, stop everything. Returns the run dir."""
    out = Path(out).resolve()
    home = out.parent / f".{out.name}.flower"
    if home.exists() and not resume:
        shutil.rmtree(home)
    needed = ["ca.crt", "superlink.crt", "superlink.key"] + [f"node{i}.key" for i in range(nodes)]
    if credentials and not all((Path(credentials) / f).exists() for f in needed):
        raise FedzipError(f"--tls {credentials}: needs {', '.join(needed)} (`fedzip deploy credentials --nodes {nodes}`)")
    print(f"fedzip: starting a SuperLink and {nodes} SuperNode(s); Flower logs in {home}", flush=True)
    with LocalFederation(home, nodes, credentials=credentials) as fed:
        run = fed.submit(config or "quickstart", overrides, out, resume)
        rounds = RoundEcho(out)
        deadline = None if timeout_s is None else time.time() + timeout_s
        try:
            fed.wait_for_run(run, out, deadline, tick=rounds.echo)
        finally:
            rounds.echo()
            _kill(run)
        if RunDir(out).finished() and RunDir(out).ledger.exists():
            traffic = fed.traffic(RunDir(out).ledger)
            if traffic:
                RunDir(out).flower_traffic.write_text(json.dumps(traffic, indent=1) + "\n")
                print(f"fedzip: Flower counted {traffic['flower_down_bytes']:,} B down and "
                      f"{traffic['flower_up_bytes']:,} B up; the ledger {traffic['ledger_down_bytes']:,} and "
                      f"{traffic['ledger_up_bytes']:,}: Flower's envelope is {traffic['envelope_down_per_message']:.0f} "
                      f"B a message down, {traffic['envelope_up_per_message']:.0f} B up", flush=True)
        else:
            server_log = fed.save_serverapp_log()
            if server_log:
                print(f"fedzip: the ServerApp's last lines ({server_log}):\n{_tail(server_log, 1500)}", flush=True)
    if not RunDir(out).finished():
        raise FedzipError(f"the Flower run ended without a summary in {out}; see {home} "
                          "(an interrupted run continues with --resume)")
    summary = RunDir(out).read_summary()
    print(f"fedzip: {summary.get('rounds_completed', '?')} rounds, final {summary.get('final_metrics')}; "
          f"bytes up {summary.get('bytes_up_total', 0):,}, down {summary.get('bytes_down_total', 0):,}", flush=True)
    return out


class RoundEcho:
    """Prints each round of a deployed run as its ServerApp appends it to ``metrics.jsonl``."""

    def __init__(self, out: Path):
        self.metrics, self.config, self.shown = RunDir(out).metrics, RunDir(out).config, 0

    def echo(self) -> None:
        if not self.metrics.exists():
            return
        text = self.metrics.read_text()
        complete = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]  # a line being written waits
        for line in complete[self.shown:]:
            row = json.loads(line)
            print(round_line(row["round"], self.total_rounds(), row), flush=True)
        self.shown = max(self.shown, len(complete))

    def total_rounds(self) -> int | str:
        try:
            import yaml

            return int(yaml.safe_load(self.config.read_text())["rounds"])
        except (OSError, KeyError, TypeError, ValueError):
            return "?"


def _tail(path: Path, chars: int) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


def _count_lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


def flower_traffic(run: dict, ledger_path: Path) -> dict:
    """Flower's byte count of one run beside fedzip's ledger. The ledger counts payloads (what a method sends);
    Flower counts its messages and objects on the SuperLink, so the difference is Flower's envelope: record
    framing, message metadata, and the few ``query`` messages that ask each node which clients it hosts. It
    is shared out over the payload messages of each direction."""
    entries = [e for e in read_jsonl(ledger_path) if "status" not in e]  # failed sends may not have crossed
    down = [e["bytes"] for e in entries if e["direction"] == "down"]
    up = [e["bytes"] for e in entries if e["direction"] == "up"]
    traffic = run.get("network-traffic", {})
    out = {"run_id": run.get("run-id"), "flower_down_bytes": int(traffic.get("outbound-bytes", 0)),
           "flower_up_bytes": int(traffic.get("inbound-bytes", 0)), "ledger_down_bytes": sum(down),
           "ledger_up_bytes": sum(up), "down_messages": len(down), "up_messages": len(up)}
    out["envelope_down_per_message"] = (out["flower_down_bytes"] - out["ledger_down_bytes"]) / max(len(down), 1)
    out["envelope_up_per_message"] = (out["flower_up_bytes"] - out["ledger_up_bytes"]) / max(len(up), 1)
    return out
