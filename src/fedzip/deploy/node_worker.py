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
  run as the node's user.

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
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("fedzip.node_worker")

MAX_HEADER = 1 << 20  # a request header is a few hundred bytes: anything near this is not ours
MAX_PAYLOAD = 1 << 34  # the wire format's own limit (wire.max_payload_bytes) is checked by the decoder
DEFAULT_IDLE_S = 900.0
START_TIMEOUT_S = 120.0


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


def recv_frame(sock: socket.socket) -> tuple[dict, bytes]:
    (n,) = struct.unpack(">I", _read_exact(sock, 4))
    if n > MAX_HEADER:
        raise ValueError(f"frame header of {n} bytes")
    header = json.loads(_read_exact(sock, n))
    if not isinstance(header, dict):
        raise ValueError("frame header is not a JSON object")
    (m,) = struct.unpack(">Q", _read_exact(sock, 8))
    if m > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {m} bytes")
    return header, _read_exact(sock, m)


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
        store.rollback(rnd - 1, cid)  # drop state from an attempt at this round the server never completed
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
        from fedzip.config import dump_config
        from fedzip.deploy.task import experiment_config, hosted_clients
        from fedzip.engine.state import ClientStateStore
        from fedzip.errors import PayloadError

        node_config, cid, rnd = request.get("node_config") or {}, request.get("cid"), request.get("round")
        if not isinstance(cid, int) or not isinstance(rnd, int) or rnd < 1:
            raise PayloadError(f"a {request.get('op')} request needs int 'cid' and int 'round' >= 1")
        cfg = experiment_config(request.get("run_config") or {}, node_config)
        if cid not in hosted_clients(node_config, cfg.num_clients):
            raise PayloadError(f"client {cid} is not hosted on this SuperNode")
        method = self.client_method(cfg, node_config)
        run_key = hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:16]  # the same experiment resumes its state
        return method, ClientStateStore(state_dir_of(node_config) / run_key), cid, rnd

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


# -- the worker process ---------------------------------------------------------------------------------
def serve(state_dir: Path, idle_s: float) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
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
                    request, payload = recv_frame(conn)
                except (OSError, ValueError) as exc:
                    log.warning("bad request dropped: %s", exc)
                    continue
                reply, up = worker.handle(request, payload)
                with contextlib.suppress(OSError):  # the ClientApp may have been stopped meanwhile
                    send_frame(conn, reply, up)
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
    state_dir.mkdir(parents=True, exist_ok=True)
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
    with connect_or_start(state_dir, idle_s) as sock:
        send_frame(sock, request, payload)
        return recv_frame(sock)


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
