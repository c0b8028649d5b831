"""A SuperNode's long-lived fedzip worker: model, tokenizer and tokenised data loaded once per node, not per message.

Flower 1.41 starts a fresh ClientApp process for every message, and Flower's ways of keeping state between
messages (``Context.state``) hold records, not a loaded model. Loading the model and tokenising the data in
every ClientApp process cost about as much as training a client (B4 deploy), so the ClientApp only relays: it
hands the message's payload bytes to this worker over a Unix socket and returns the worker's reply bytes. The
worker keeps one experiment's client side in memory and runs it with the same ``run_client`` as a simulation.

* One worker per client-state directory (``state-dir`` in the node config); the first message starts it and it
  exits after ``worker-idle-s`` seconds (default 900) without a message. ``worker = false`` in the node config
  runs each message in the ClientApp process instead (Flower's plain model).
* It serves one message at a time, in the order they connect: a node's clients train one after another, as
  in a simulation.
* Frames: a 4-byte big-endian header length, the header (UTF-8 JSON), an 8-byte payload length, the payload.
  Nothing is pickled. The socket lives in a directory only this user can enter; the worker and the ClientApp
  run as the node's user. A payload longer than the run's ``wire.max_payload_bytes`` is refused before it is
  read; a connection that sends nothing for ``CONNECTION_TIMEOUT_S`` is dropped; any error stays within its
  connection: the worker, its socket and its loaded model stay up.
* Client state is kept per run (``state-dir/<run id>/``): the server mints the run id at a fresh start and
  raises an epoch each time it starts or resumes, and sends both with every request. The node keeps the
  highest (epoch, round) it has served and refuses any request below it before touching state, so a message
  from a killed attempt that arrives late cannot roll back what the resumed run has done, and a new run of the
  same config never starts from an older run's state.

The module imports only the standard library at the top: a relaying ClientApp process never loads torch.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("fedzip.node_worker")

MAX_HEADER = 1 << 20  # a request header is a few hundred bytes: anything near this is not ours
DEFAULT_MAX_PAYLOAD = 2**31  # wire.max_payload_bytes's default, for a request whose run config cannot be read
DEFAULT_IDLE_S = 900.0
START_TIMEOUT_S = 120.0
CONNECTION_TIMEOUT_S = 60.0  # a peer that connects and then sends nothing holds up no one for longer


def default_state_dir() -> Path:
    return Path.home() / ".fedzip" / "client-state"


def state_dir_of(node_config) -> Path:
    return Path(str(node_config.get("state-dir") or default_state_dir())).expanduser().resolve()


def socket_path(state_dir: Path) -> Path:
    """``state-dir/worker.sock``, or (when that path is too long for a Unix socket, ~100 bytes) a private
    per-user directory under the temp dir, keyed by the state dir."""
    own = state_dir / "worker.sock"
    if len(str(own).encode()) < 100:
        return own
    private = Path(tempfile.gettempdir()) / f"fedzip-{os.getuid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    st = private.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise OSError(f"{private} must belong to this user and be closed to others (mode 700)")
    return private / (hashlib.sha256(str(state_dir).encode()).hexdigest()[:20] + ".sock")


# -- frames ---------------------------------------------------------------------------------------------
def _read_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError(f"connection closed with {left} of {n} bytes unread")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def send_frame(sock: socket.socket, header: dict, payload: bytes = b"") -> None:
    head = json.dumps(header).encode()
    sock.sendall(struct.pack(">I", len(head)) + head + struct.pack(">Q", len(payload)))
    if payload:  # the peer may already have answered an empty-payload frame and closed
        sock.sendall(payload)


def recv_frame(sock: socket.socket, max_payload=lambda header: DEFAULT_MAX_PAYLOAD) -> tuple[dict, bytes]:
    """One frame; ``max_payload(header)`` bounds the payload before a byte of it is read. ValueError (or
    ConnectionError, TimeoutError) for anything that is not a well-formed frame within its bounds."""
    (n,) = struct.unpack(">I", _read_exact(sock, 4))
    if n > MAX_HEADER:
        raise ValueError(f"frame header of {n} bytes")
    try:  # JSON nested thousands deep ends in RecursionError: a refused frame, like any other bad one
        header = json.loads(_read_exact(sock, n))
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"frame header is not JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise ValueError("frame header is not a JSON object")
    (m,) = struct.unpack(">Q", _read_exact(sock, 8))
    limit = max_payload(header)
    if m > limit:
        raise ValueError(f"frame payload of {m} bytes exceeds the limit of {limit}")
    return header, _read_exact(sock, m)


def request_payload_limit(header: dict) -> int:
    """The run's ``wire.max_payload_bytes`` for a request (its run config), else the default."""
    try:
        from fedzip.deploy.task import experiment_config

        return int(experiment_config(header.get("run_config") or {}, header.get("node_config") or {})
                   .wire.max_payload_bytes)
    except Exception:  # noqa: BLE001 - a request whose config does not load is refused later, with its reason
        return DEFAULT_MAX_PAYLOAD


# -- the work: one experiment's client side, kept between messages ----------------------------------------
class NodeWorker:
    """Answers ``train`` and ``evaluate`` requests; used by the worker process and, with ``worker = false``, by
    the ClientApp."""

    def __init__(self):
        self._key: str | None = None
        self._method = None

    def client_method(self, cfg, node_config):
        """The client side of ``cfg`` on this node, built on the first message of an experiment."""
        from fedzip.config import dump_config
        from fedzip.data.sources import load_node_data
        from fedzip.deploy.task import hosted_clients
        from fedzip.engine.runtime import build_runtime
        from fedzip.errors import ConfigError
        from fedzip.registry import method_class

        data_file = str(node_config.get("data-file") or "")
        if cfg.deploy.client_data == "on_nodes" and not data_file:
            raise ConfigError("the run keeps client data on the nodes (deploy.client_data: on_nodes), but this "
                              "SuperNode has no data-file in its node config")
        if cfg.deploy.client_data == "shared" and data_file:
            raise ConfigError(f"this SuperNode has its own data-file {data_file}, but the run derives every client's "
                              "data from its shared data set (set deploy.client_data: on_nodes)")
        stamp = ""
        if data_file:  # a changed file is a new experiment for this node
            st = Path(data_file).expanduser().stat() if Path(data_file).expanduser().is_file() else None
            stamp = f"{data_file}:{st.st_size}:{st.st_mtime_ns}" if st else data_file
        key = dump_config(cfg) + "\n" + stamp + "\n" + str(hosted_clients(node_config, cfg.num_clients))
        if key != self._key:  # a new experiment: the previous one's model is let go first
            self._key, self._method = None, None
            method_cls = method_class(cfg.method)
            cfg = method_cls.adjust_config(cfg)
            own = load_node_data(Path(data_file), cfg.data) if data_file else None
            rt = build_runtime(cfg, method_cls, with_model=not method_cls.client_builds_model, own_train=own,
                               hosted=hosted_clients(node_config, cfg.num_clients) if own is not None else None)
            self._method = method_cls(cfg, rt)
            self._key = key
        return self._method

    def train(self, request: dict, down: bytes) -> tuple[dict, bytes]:
        from fedzip.engine.client import run_client

        method, store, cid, rnd = self._client(request)
        # the request is the newest this run has sent (_client checked it): state from an attempt at this round
        # (or a later one) that the server never completed is dropped
        store.rollback(rnd - 1, cid)
        store.commit(rnd - 1, cid)
        t0 = time.time()
        up = run_client(method, store, rnd, cid, down).up  # diagnostics stay on the node
        return self._audited(store, {"round": rnd, "client": cid}, down, up, t0)

    def evaluate(self, request: dict, down: bytes) -> tuple[dict, bytes]:
        """Personalised evaluation after round ``round``: the client's model as that round left it."""
        from fedzip.engine.personal import evaluate_client

        method, store, cid, rnd = self._client(request)
        store.rollback(rnd, cid)  # state from rounds after it belongs to an attempt the server never completed
        t0 = time.time()
        up = evaluate_client(method, store, cid, down, {"round": rnd, "own": request.get("own"),
                                                         "share": request.get("share")})
        return self._audited(store, {"round": rnd, "client": cid, "kind": "eval"}, down, up, t0)

    def _client(self, request: dict):
        """(client-side method, the experiment's state store, client id, round) of a checked request."""
        from fedzip.deploy.task import experiment_config, hosted_clients
        from fedzip.engine.state import ClientStateStore
        from fedzip.errors import PayloadError

        node_config, cid, rnd = request.get("node_config") or {}, request.get("cid"), request.get("round")
        run_id, epoch = request.get("run_id"), request.get("epoch")
        if not isinstance(cid, int) or not isinstance(rnd, int) or rnd < 1:
            raise PayloadError(f"a {request.get('op')} request needs int 'cid' and int 'round' >= 1")
        if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id) or not isinstance(epoch, int) or epoch < 1:
            raise PayloadError(f"a {request.get('op')} request needs the server's 'run_id' (32 hex digits) and "
                               "'epoch' (int >= 1); the server is a fedzip older than this node")
        cfg = experiment_config(request.get("run_config") or {}, node_config)
        if cid not in hosted_clients(node_config, cfg.num_clients):
            raise PayloadError(f"client {cid} is not hosted on this SuperNode")
        root = state_dir_of(node_config) / run_id  # the run's own state: another run never reads it
        admit(root, epoch, rnd)  # before anything touches the state
        method = self.client_method(cfg, node_config)
        return method, ClientStateStore(root), cid, rnd

    @staticmethod
    def _audited(store, entry: dict, down: bytes, up: bytes, t0: float) -> tuple[dict, bytes]:
        client_s = time.time() - t0
        store.root.mkdir(parents=True, exist_ok=True)
        with open(store.root / "wire.jsonl", "a", encoding="utf-8") as f:  # the node's own audit of the ledger
            f.write(json.dumps({**entry, "down": len(down), "up": len(up)}) + "\n")
        return {"client_s": client_s}, up

    def handle(self, request: dict, payload: bytes) -> tuple[dict, bytes]:
        """Never raises: an error becomes ``{"error": ..., "kind": ...}`` for the ClientApp to raise."""
        from fedzip.errors import FedzipError

        try:
            if request.get("op") == "ping":
                return {"ok": True, "pid": os.getpid()}, b""
            if request.get("op") not in ("train", "evaluate"):
                return {"error": f"unknown request {request.get('op')!r}", "kind": "PayloadError"}, b""
            reply, up = (self.train if request["op"] == "train" else self.evaluate)(request, payload)
            return {"ok": True, **reply}, up
        except FedzipError as exc:
            return {"error": str(exc), "kind": type(exc).__name__}, b""
        except Exception as exc:  # noqa: BLE001 - the node stays up; the server records a failed client
            log.exception("request failed")
            return {"error": f"{type(exc).__name__}: {exc}", "kind": "internal"}, b""


RUN_ID = re.compile(r"[0-9a-f]{32}")


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user may enter (0700), made if missing."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def admit(root: Path, epoch: int, rnd: int) -> None:
    """Record (epoch, round) as the run's high-water mark, or refuse a request below it (a message from an attempt
    the server has since abandoned, or an earlier round of this one): PayloadError, and the state is untouched."""
    from fedzip.errors import PayloadError

    private_dir(root.parent)
    private_dir(root)
    mark_file = root / "high_water.json"
    try:
        mark = json.loads(mark_file.read_text())
        seen = (int(mark["epoch"]), int(mark["round"]))
    except FileNotFoundError:
        seen = (0, 0)
    except (ValueError, KeyError, TypeError):
        raise PayloadError(f"{mark_file} is damaged; remove the run's state folder to start its clients afresh") from None
    if (epoch, rnd) < seen:
        raise PayloadError(f"stale request refused: epoch {epoch} round {rnd} is older than epoch {seen[0]} round "
                           f"{seen[1]}, which this node has already served for the run")
    if (epoch, rnd) > seen:
        tmp = mark_file.with_name(".high_water.tmp")
        tmp.write_text(json.dumps({"epoch": epoch, "round": rnd}))
        tmp.replace(mark_file)


# -- the worker process ---------------------------------------------------------------------------------
def serve(state_dir: Path, idle_s: float) -> None:
    private_dir(state_dir)  # client state, keys and the socket: this user's alone
    path = socket_path(state_dir)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket: the caller holds the start lock, so no live worker owns it
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created 0600
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    server.listen(64)
    server.settimeout(min(idle_s, 30.0))
    (state_dir / "worker.pid").write_text(str(os.getpid()))
    if threading.current_thread() is threading.main_thread():  # (tests serve from a thread)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    worker, last = NodeWorker(), time.time()
    log.info("serving on %s (exits after %.0f s idle)", path, idle_s)
    try:
        while time.time() - last < idle_s:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    conn.settimeout(CONNECTION_TIMEOUT_S)
                    request, payload = recv_frame(conn, request_payload_limit)
                    conn.settimeout(None)  # the work may take long; the reply is sent when it is done
                    reply, up = worker.handle(request, payload)
                    conn.settimeout(CONNECTION_TIMEOUT_S)
                    send_frame(conn, reply, up)
                except Exception as exc:  # noqa: BLE001 - one bad connection never takes the worker down
                    log.warning("request dropped: %s: %s", type(exc).__name__, str(exc)[:300])
            last = time.time()
        log.info("idle for %.0f s: exiting", idle_s)
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(FileNotFoundError):
            (state_dir / "worker.pid").unlink()


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return None
        raise


def connect_or_start(state_dir: Path, idle_s: float = DEFAULT_IDLE_S, timeout_s: float = START_TIMEOUT_S) -> socket.socket:
    """A connection to the node's worker, starting the worker first if none is running."""
    private_dir(state_dir)
    path = socket_path(state_dir)
    sock = _connect(path)
    if sock is not None:
        return sock
    with open(state_dir / "worker.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one ClientApp starts the worker; the others wait here, then connect
        sock = _connect(path)
        if sock is not None:
            return sock
        logfile = open(state_dir / "worker.log", "a")
        proc = subprocess.Popen([sys.executable, "-m", "fedzip.deploy.node_worker", "--state-dir", str(state_dir),
                                 "--idle-s", str(idle_s)], stdin=subprocess.DEVNULL, stdout=logfile,
                                stderr=subprocess.STDOUT, start_new_session=True)  # outlives this ClientApp
        end = time.time() + timeout_s
        while time.time() < end:
            sock = _connect(path)
            if sock is not None:
                return sock
            if proc.poll() is not None:
                raise RuntimeError(f"the node worker exited at start-up (code {proc.returncode}); "
                                   f"see {state_dir / 'worker.log'}")
            time.sleep(0.05)
        raise RuntimeError(f"the node worker did not open {path} within {timeout_s:.0f} s")


def call(state_dir: Path, request: dict, payload: bytes, idle_s: float = DEFAULT_IDLE_S) -> tuple[dict, bytes]:
    """The worker's reply to one request. The reply comes from this user's own worker, which already held the
    encoded reply to the run's bound, so its size is not bounded again here (that would need the run's config,
    and this module stays free of torch for the relaying ClientApp)."""
    with connect_or_start(state_dir, idle_s) as sock:
        send_frame(sock, request, payload)
        return recv_frame(sock, lambda header: 1 << 40)


def stop(state_dir: Path, grace_s: float = 10.0) -> bool:
    """Stop the worker of ``state_dir`` if one runs; True when one was stopped."""
    pidfile = Path(state_dir) / "worker.pid"
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return False
    end = time.time() + grace_s
    while time.time() < end:
        try:
            os.kill(pid, 0)
        except OSError:
            return True
        time.sleep(0.1)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description="fedzip's per-node worker (started by the ClientApp)")
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--idle-s", type=float, default=DEFAULT_IDLE_S)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    serve(Path(args.state_dir).resolve(), args.idle_s)


if __name__ == "__main__":
    main()
