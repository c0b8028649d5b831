"""The server's checkpoint: written so that a crash leaves a complete one, verified before a run resumes from it.

``checkpoints/`` holds ``server.safetensors`` (the method's server state) and ``state.json``: the round it
follows, how many lines of each run file belong to it, the run's DP randomness key (fedzip.privacy), the SHA-256
of every other checkpoint file, and a checksum of itself. A truncated file, a flipped bit or an edited round
number is one error line naming the file, never a resumed run that silently differs.

Writing: every file into ``checkpoints.tmp``, each fsynced, the folder fsynced, then ``checkpoints`` becomes
``checkpoints.old``, the new folder ``checkpoints``, and only then is the old one removed: at every instant
one complete checkpoint exists under one of the three names (:func:`recover_checkpoint` finds it).
The folder is 0700 and its files 0600: it holds the DP key, which must never leave the server.

The run's identity (``run.json``, beside the checkpoint): a random run id minted at a fresh start and an epoch
that rises each time the run starts or resumes. Every request to a deployed node carries both, so that a
node keys its client state by run and refuses a message from an earlier attempt (fedzip.engine.state).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from fedzip.errors import RunDirError
from fedzip.methods.state import ServerState, load_server_state, save_server_state
from fedzip.rundir import RunDir

STATE = "state.json"
SERVER = "server.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _self_checksum(state: dict) -> str:
    body = {k: v for k, v in state.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """``data`` into a new file only this user can read, flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(ckpt_dir: Path, server_state: ServerState, facts: dict) -> None:
    """Atomic: write into a temporary folder, then swap it in. ``facts``: the round and the engine's counters."""
    tmp = ckpt_dir.with_name("checkpoints.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(mode=0o700, parents=True)
    save_server_state(server_state, tmp / SERVER)
    os.chmod(tmp / SERVER, 0o600)
    _fsync(tmp / SERVER)
    state = dict(facts, files={SERVER: _sha256(tmp / SERVER)})
    state["checksum"] = _self_checksum(state)
    # state.json last: its presence marks the folder complete (recover_checkpoint relies on it)
    write_private(tmp / STATE, json.dumps(state).encode())
    _fsync(tmp)
    old = ckpt_dir.with_name("checkpoints.old")
    if old.exists():
        shutil.rmtree(old)
    if ckpt_dir.exists():
        ckpt_dir.rename(old)
    tmp.rename(ckpt_dir)
    _fsync(ckpt_dir.parent)
    if old.exists():
        shutil.rmtree(old)


def read_checkpoint(ckpt_dir: Path) -> dict:
    """``state.json`` of a checkpoint, after checking it and every file it lists; one error line naming a file."""
    path = ckpt_dir / STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path}: missing; the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunDirError(f"{path}: unreadable ({exc}); the checkpoint is damaged") from None
    if not isinstance(state, dict) or not isinstance(state.get("round"), int):
        raise RunDirError(f"{path}: not a fedzip checkpoint state")
    if "checksum" not in state:
        raise RunDirError(f"{path}: a checkpoint from an older fedzip, without checksums; start the run afresh")
    if state["checksum"] != _self_checksum(state):
        raise RunDirError(f"{path}: checksum mismatch (the file was changed or damaged); the run cannot resume from it")
    for name, digest in (state.get("files") or {}).items():
        file = ckpt_dir / name
        if not file.is_file():
            raise RunDirError(f"{file}: missing; the checkpoint is incomplete")
        if _sha256(file) != digest:
            raise RunDirError(f"{file}: checksum mismatch (the file was changed or damaged); the run cannot resume "
                              "from it")
    return state


def load_checkpoint(ckpt_dir: Path) -> tuple[dict, ServerState]:
    state = read_checkpoint(ckpt_dir)
    try:
        return state, load_server_state(ckpt_dir / SERVER)
    except RunDirError:
        raise
    except Exception as exc:  # verified above: only a fedzip that wrote another layout gets here
        raise RunDirError(f"{ckpt_dir / SERVER}: unreadable ({exc})") from None


def recover_checkpoint(out: Path) -> None:
    """A crash in the middle of swapping checkpoints leaves a complete one under another name."""
    ckpt = RunDir(out).checkpoints
    if (ckpt / STATE).exists():
        return
    for name in ("checkpoints.tmp", "checkpoints.old"):  # the newer complete one first
        cand = out / name
        if not (cand / STATE).exists():
            continue
        try:
            read_checkpoint(cand)
        except RunDirError:
            continue  # a half-written one: the older one is next
        if ckpt.exists():
            shutil.rmtree(ckpt)
        cand.rename(ckpt)
        return


@dataclass(frozen=True)
class RunIdentity:
    """Who sends a request: the run (minted at a fresh start) and its attempt (one more on each start)."""

    run_id: str
    epoch: int


def start_identity(out: Path, resume: bool) -> RunIdentity:
    """A fresh run's new identity, or a resumed run's with its epoch one higher; saved before any message."""
    path = RunDir(out).identity
    previous = None
    if resume and path.exists():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            raise RunDirError(f"{path}: unreadable; the run cannot resume") from None
    if previous and isinstance(previous.get("run_id"), str) and isinstance(previous.get("epoch"), int):
        identity = RunIdentity(previous["run_id"], previous["epoch"] + 1)
    else:
        identity = RunIdentity(secrets.token_hex(16), 1)
    tmp = path.with_name("run.json.tmp")
    write_private(tmp, json.dumps({"run_id": identity.run_id, "epoch": identity.epoch}).encode())
    tmp.replace(path)
    return identity
