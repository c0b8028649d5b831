"""A server that no client can stop, and a checkpoint that cannot resume silently wrong.

Hostile replies (huge integers, deep nesting, NaN, wrong shapes, oversized, truncated, lying meta) are each a
logged failure of their client, and the run ends with the adapter of a run in which those clients simply did not
reply. A damaged checkpoint is one error line naming the file.
"""

import json
import os
import struct

import pytest
import zstandard
from helpers import assert_same_adapter

import fedzip.engine.rounds as sim
from fedzip.config import load_config
from fedzip.engine import run_experiment
from fedzip.errors import PayloadError, RunDirError, TooFewReplies
from fedzip.wire import Message, decode, encode
from fedzip.wire.payload import PREFIX


def raw_payload(header: bytes, body: bytes = b"") -> bytes:
    """A payload whose header is exactly ``header`` (JSON text, compressed as the wire does)."""
    packed = zstandard.ZstdCompressor(write_checksum=True).compress(header)
    return PREFIX.pack(b"FZP2", len(packed)) + packed + body


def huge_integer(good: bytes) -> bytes:
    return raw_payload(b'{"meta":{"num_examples":' + b"9" * 5000 + b'},"tensors":[]}')


def deep_nesting(good: bytes) -> bytes:
    return raw_payload(b'{"meta":{"a":' + b"[" * 100_000 + b"]" * 100_000 + b'},"tensors":[]}')


def nan_meta(good: bytes) -> bytes:
    message = decode(good)
    header = json.dumps({"meta": {**message.meta, "train_loss": float("nan")}, "tensors": []}).encode()
    return raw_payload(header)


def wrong_shapes(good: bytes) -> bytes:
    message = decode(good)
    return encode(Message({n: t.reshape(-1) for n, t in message.tensors.items()}, message.meta))


def oversized(good: bytes) -> bytes:
    return good + b"\0" * (1 << 20)  # beyond wire.max_payload_bytes, set below to the honest size + 64 kB


def truncated(good: bytes) -> bytes:
    return good[: len(good) // 2]


def lying_meta(good: bytes) -> bytes:
    """Decodes (names, shapes and values are fine); the method refuses its example count in aggregate."""
    message = decode(good)
    return encode(Message(message.tensors, {**message.meta, "num_examples": -5}))


HOSTILE = [huge_integer, deep_nesting, nan_meta, wrong_shapes, oversized, truncated, lying_meta]


class Hostile:
    """The in-process exchange, but ``bad`` clients reply with a hostile payload (``attack``) or not at all."""

    def __init__(self, inner, bad: set[int], attack=None):
        self.inner, self.bad, self.attack = inner, bad, attack
        self.evaluates_clients = inner.evaluates_clients

    def begin(self, identity):
        self.inner.begin(identity)

    def __call__(self, rnd, downs, timing):
        replies, failures, diagnostics = self.inner(rnd, downs, timing)
        for cid in self.bad & set(replies):
            if self.attack is None:
                failures[cid] = "did not reply"
                del replies[cid]
            else:
                replies[cid] = self.attack(replies[cid])
        return replies, failures, diagnostics

    def evaluate(self, *a):
        return self.inner.evaluate(*a)


def run_with(tmp_path, name, overrides, bad, attack, monkeypatch):
    """A run whose in-process exchange is wrapped by :class:`Hostile`."""
    real = sim.InProcessExchange
    monkeypatch.setattr(sim, "InProcessExchange", lambda *a: Hostile(real(*a), bad, attack))
    try:
        return run_experiment(load_config("quickstart", overrides), tmp_path / name, progress=False)
    finally:
        monkeypatch.setattr(sim, "InProcessExchange", real)


def test_a_76_byte_reply_with_a_huge_integer_is_a_payload_error():
    payload = huge_integer(b"")
    with pytest.raises(PayloadError, match="not valid JSON"):
        decode(payload)
    with pytest.raises(PayloadError, match="not a JSON number"):
        decode(raw_payload(b'{"meta":{"train_loss":NaN},"tensors":[]}'))


@pytest.mark.parametrize("attack", HOSTILE, ids=lambda f: f.__name__)
def test_hostile_replies_are_logged_failures_and_the_run_ends_as_without_them(tmp_path, tiny_cfg, attack, monkeypatch):
    overrides = tiny_cfg + ["rounds=2", "num_clients=4", "clients_per_round=4", "wire.max_payload_bytes=200000"]
    bad = {1, 2}
    quiet = run_with(tmp_path, "quiet", overrides, bad, None, monkeypatch)
    attacked = run_with(tmp_path, "attacked", overrides, bad, attack, monkeypatch)
    assert attacked["rounds_completed"] == quiet["rounds_completed"] == 2
    assert_same_adapter(tmp_path / "quiet", tmp_path / "attacked")
    for row in map(json.loads, (tmp_path / "attacked" / "metrics.jsonl").read_text().splitlines()):
        assert sorted(row["rejected"]) == sorted(bad)
    ledger = [json.loads(x) for x in (tmp_path / "attacked" / "ledger.jsonl").read_text().splitlines()]
    if attack is not lying_meta:  # refused at decoding: the ledger says why beside the bytes that arrived
        assert {(e["round"], e["client"]) for e in ledger if e.get("rejected")} == {(r, c) for r in (1, 2) for c in bad}


def test_a_diverging_client_is_a_failed_client_and_too_many_stop_the_run_in_one_line(tmp_path, tiny_cfg, caplog):
    """train.lr=1e30: every client's loss goes non-finite. Each is a failure with a reason; with none left the run
    stops (resumable) with one error, never a bare ValueError from the encoder."""
    cfg = load_config("quickstart", tiny_cfg + ["train.lr=1e30", "train.max_steps=6", "rounds=2"])
    with pytest.raises(TooFewReplies, match="diverged"):
        run_experiment(cfg, tmp_path / "run", progress=False)
    assert "training diverged" in caplog.text


def test_a_diverging_client_among_good_ones_is_dropped_and_the_run_goes_on(tmp_path, tiny_cfg, monkeypatch):
    from fedzip.methods.fedit import FedIT

    real_fit = FedIT.fit

    def sometimes_nan(self, client, message):
        reply = real_fit(self, client, message)
        if client.cid == 1:
            reply.meta["train_loss"] = float("inf")
        return reply

    monkeypatch.setattr(FedIT, "fit", sometimes_nan)
    overrides = tiny_cfg + ["rounds=2", "num_clients=4", "clients_per_round=4"]
    summary = run_experiment(load_config("quickstart", overrides), tmp_path / "run", progress=False)
    assert summary["rounds_completed"] == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["failed"] == [1] for r in rows)


def test_the_cli_says_in_one_line_when_a_run_stops_for_lack_of_replies(tmp_path, tiny_cfg, capsys):
    from fedzip.cli import main

    args = ["run", "quickstart", "--out", str(tmp_path / "run"), "--quiet"]
    for o in tiny_cfg + ["train.lr=1e30", "train.max_steps=6"]:
        args += ["--set", o]
    assert main(args) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("fedzip: error:")]) == 1


# -- checkpoints ------------------------------------------------------------------------------------------
@pytest.fixture
def stopped_run(tmp_path, tiny_cfg):
    cfg = load_config("quickstart", tiny_cfg + ["rounds=3"])
    run_experiment(cfg, tmp_path / "run", progress=False, stop_after=2)
    return cfg, tmp_path / "run"


def damage_weights(path):
    """64 floats overwritten in place: the file's size and layout stay valid."""
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    data = bytearray(path.read_bytes())
    start = 8 + header
    data[start: start + 256] = struct.pack("<64f", *([1.5] * 64))
    path.write_bytes(bytes(data))


def edit_round(path):
    state = json.loads(path.read_text())
    state["round"] = 0
    path.write_text(json.dumps(state))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("file,damage", [("server.safetensors", truncate), ("server.safetensors", damage_weights),
                                         ("state.json", truncate), ("state.json", edit_round)],
                         ids=["truncated-weights", "overwritten-floats", "truncated-state", "state-edited-to-round-0"])
def test_a_damaged_checkpoint_is_one_error_naming_the_file(stopped_run, file, damage, capsys):
    cfg, run = stopped_run
    damage(run / "checkpoints" / file)
    with pytest.raises(RunDirError, match=file.replace(".", r"\.")):
        run_experiment(cfg, run, resume=True, progress=False)
    from fedzip.cli import main

    assert main(["run", "--out", str(run), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedzip: error:") and file in err[0]


def test_checkpoint_files_and_folders_are_synced_private_and_swapped_only_when_complete(stopped_run, monkeypatch):
    cfg, run = stopped_run
    ckpt = run / "checkpoints"
    assert oct(ckpt.stat().st_mode & 0o777) == "0o700"
    assert all(oct(f.stat().st_mode & 0o777) == "0o600" for f in ckpt.iterdir())  # it holds the DP key
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    from fedzip.methods import state as state_mod

    def crash(*a, **k):  # the next checkpoint dies half-way: the last complete one must still be there
        raise KeyboardInterrupt
    import fedzip.engine.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "save_server_state", crash)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, run, resume=True, progress=False)
    assert json.loads((ckpt / "state.json").read_text())["round"] == 2
    monkeypatch.setattr(checkpoint, "save_server_state", state_mod.save_server_state)
    run_experiment(cfg, run, resume=True, progress=False)
    names = {os.path.basename(p) for p in synced}
    assert {"server.safetensors", "state.json", "checkpoints.tmp", run.name} <= names


def test_a_replys_meta_is_validated_once_into_typed_facts():
    from fedzip.methods.base import ReplyMeta

    facts = ReplyMeta.parse({"num_examples": 12, "steps": 3, "train_loss": 0.5, "record_epsilon": 2.0, "own": 1})
    assert facts == ReplyMeta(12, 3, 0.5, 2.0)
    assert ReplyMeta.parse({"num_examples": 1}) == ReplyMeta(1)
    for bad in ({}, {"num_examples": True}, {"num_examples": 0}, {"num_examples": 10**13}, {"num_examples": 2.0},
                {"num_examples": 4, "steps": -1}, {"num_examples": 4, "steps": "3"},
                {"num_examples": 4, "train_loss": "low"}, {"num_examples": 4, "record_epsilon": -1.0}):
        with pytest.raises(PayloadError):
            ReplyMeta.parse(bad)
