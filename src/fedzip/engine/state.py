"""On-disk client state (optimizer state, residuals): only the clients of the current round are in memory.

Each save is versioned by round so that a resumed run sees exactly the state an uninterrupted run
would have: versions newer than the last checkpoint are dropped on resume.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_VERSION = re.compile(r"^r(\d+)\.safetensors$")


class ClientStateStore:
    def __init__(self, root: Path):
        self.root = root

    def _versions(self, cid: int) -> list[tuple[int, Path]]:
        folder = self.root / str(cid)
        if not folder.is_dir():
            return []
        out = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _VERSION.match(p.name))]
        return sorted(out)

    def load(self, cid: int) -> dict[str, torch.Tensor]:
        versions = self._versions(cid)
        return load_file(str(versions[-1][1])) if versions else {}

    def save(self, cid: int, rnd: int, tensors: dict[str, torch.Tensor]) -> None:
        folder = self.root / str(cid)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".r{rnd}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(folder / f"r{rnd}.safetensors")

    def secret(self, cid: int) -> bytes:
        """Client ``cid``'s own 32-byte key (the randomness of its DP noise): drawn from the operating system's
        entropy on first use, kept in a file only this user can read, never sent and never rolled back."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder = self.root / str(cid)
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / "key"
        if not path.exists():
            from fedzip.engine.checkpoint import write_private

            tmp = folder / f".key.{os.getpid()}.tmp"
            write_private(tmp, secrets.token_bytes(32))
            try:
                os.link(tmp, path)  # atomic, and never replaces a key another process made first
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        key = path.read_bytes()
        if len(key) != 32:
            from fedzip.errors import RunDirError

            raise RunDirError(f"{path}: a client key must be 32 bytes, found {len(key)}; the client's state is damaged")
        return key

    def _clients(self, cid: int | None) -> list[int]:
        if cid is not None:
            return [cid]
        return [int(f.name) for f in self.root.iterdir() if f.is_dir()] if self.root.is_dir() else []

    def commit(self, completed_round: int, cid: int | None = None) -> None:
        """After a checkpoint: keep only the newest version of each client (or of client ``cid``)."""
        for c in self._clients(cid):
            for _, p in self._versions(c)[:-1]:
                p.unlink()

    def rollback(self, completed_round: int, cid: int | None = None) -> None:
        """On resume: forget versions written by rounds that did not complete (all clients, or ``cid``)."""
        for c in self._clients(cid):
            for rnd, p in self._versions(c):
                if rnd > completed_round:
                    p.unlink()
