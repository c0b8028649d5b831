"""Shared test helpers."""

import json
import re
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedzip.config import load_config
from fedzip.deploy.local import LocalFederation
from fedzip.engine import run_experiment
from fedzip.engine.ledger import read_ledger
from fedzip.errors import FedzipError


def server_and_client(overrides: list[str]):
    """(cfg, server runtime, server part initialised, client part on a runtime of its own), as a simulation
    builds them: for tests that drive a method's rounds by hand."""
    from fedzip.engine.runtime import build_runtime, client_runtime
    from fedzip.methods import METHODS

    cfg = load_config(None, overrides)
    cls = METHODS[cfg.method]
    cfg = cls.adjust_config(cfg)
    rt = build_runtime(cfg, cls)
    server, client = cls(cfg, rt), cls(cfg, client_runtime(rt, cls))
    server.init_global()
    return cfg, rt, server, client


def play_round(cfg, rt, server, client, rnd, store, cids=None, lost=(), codec="fp32"):
    """One round through the wire (encode with ``codec`` both ways, decode against both sides' specs) for
    ``cids`` (default: the round's sample); the replies of clients in ``lost`` never reach the server. Returns
    the decoded replies."""
    from fedzip.engine.rounds import sample_clients
    from fedzip.methods import ClientContext
    from fedzip.wire import decode, encode

    cids = sample_clients(cfg.seed, rnd, cfg.num_clients, cfg.clients_per_round) if cids is None else cids
    replies = {}
    for cid, msg in server.configure(rnd, cids).items():
        down = decode(encode(msg, codec), client.down_spec(cid, rnd), require_all=False)
        ctx = ClientContext(cid=cid, round=rnd, indices=rt.parts[cid], store=store, seed=cfg.seed * 1000 + cid)
        reply = decode(encode(client.fit(ctx, down), codec), server.up_spec(cid, rnd))
        if cid not in lost:
            replies[cid] = reply
    server.aggregate(rnd, replies)
    return replies


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def exported_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """What a run exports: its peft adapter, or the whole model for a method without LoRA (full_ft)."""
    run_dir = Path(run_dir)
    if (run_dir / "adapter").exists():
        return adapter_tensors(run_dir)
    return {k: v for f in sorted((run_dir / "model").glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def assert_resume_is_exact(tmp_path: Path, overrides: list[str], stop_after: int = 1) -> tuple[dict, dict]:
    """Run uninterrupted, and again interrupted after ``stop_after`` rounds then resumed: same export, same bytes."""
    full = run_experiment(load_config(None, overrides), tmp_path / "full", progress=False)
    part = run_experiment(load_config(None, overrides), tmp_path / "part", progress=False, stop_after=stop_after)
    assert part["interrupted_after"] == stop_after
    resumed = run_experiment(load_config(None, overrides), tmp_path / "part", resume=True, progress=False)
    a, b = exported_tensors(tmp_path / "full"), exported_tensors(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["bytes_up_total"] == full["bytes_up_total"] and resumed["final_metrics"] == full["final_metrics"]
    return full, resumed


# -- Flower: a real SuperLink and SuperNodes on 127.0.0.1 ----------------------------------------------
def simulate(tmp_path: Path, overrides: list[str]) -> Path:
    return Path(run_experiment(load_config("quickstart", overrides), tmp_path / "sim", progress=False)["run_dir"])


def flower_run(fed: LocalFederation, overrides, out: Path, resume=False, timeout=300.0, until=None) -> None:
    """Submit a run and wait for it to end (or for ``until()`` to hold, then return)."""
    proc = fed.submit("quickstart", overrides, out, resume)
    end = time.time() + timeout
    if until is not None:
        while not until():
            assert time.time() < end, f"the Flower run did not get there in time\n{flower_logs(fed)}"
            time.sleep(0.5)
        return
    try:
        ended = fed.wait_for_run(proc, out, end)
    except FedzipError as exc:
        raise AssertionError(f"{exc}\n{flower_logs(fed)}") from None
    assert ended, flower_logs(fed)


def flower_logs(fed: LocalFederation, tail: int = 1500) -> str:
    """Every log of a local federation (CLI, SuperLink, SuperNodes, node workers, and the ServerApp's as the
    SuperLink kept it), errors first and repeated lines collapsed: what a failed Flower test shows, since its
    temporary folder is gone by the time anyone reads the CI output."""
    fed.save_serverapp_log()
    logs = sorted(fed.home.glob("*.log")) + sorted(fed.home.glob("node*-state/worker.log"))
    return "\n".join(f"--- {p.relative_to(fed.home)}\n{condensed(p.read_text(errors='replace'), tail)}" for p in logs)


def condensed(text: str, tail: int) -> str:
    """A log's error lines (with the line after each), then its end, with runs of lines that differ only in
    their numbers (Flower's connection retries) shown once with a count."""
    lines, out = text.splitlines(), []
    errors = [i for i, line in enumerate(lines) if re.search(r"Traceback|ERROR|Error|Killed|exited", line)]
    if errors:
        out += ["(error lines)"] + [lines[j] for i in errors[:10] for j in (i, i + 1) if j < len(lines)] + ["(end)"]
    end, shape, count = [], None, 0
    for line in lines:
        s = re.sub(r"[0-9.]+", "#", line)
        if s == shape:
            count += 1
            continue
        if count:
            end.append(f"    (and {count} more like it)")
        end.append(line)
        shape, count = s, 0
    if count:
        end.append(f"    (and {count} more like it)")
    return "\n".join(out + ["\n".join(end)[-tail:]])


def wire_files(fed: LocalFederation) -> set[Path]:
    """The SuperNodes' wire records so far: one a node and experiment (``<state-dir>/<run key>/wire.jsonl``)."""
    return set(fed.home.glob("node*-state/*/wire.jsonl"))


def node_wire(fed: LocalFederation, earlier: set[Path] = frozenset(), kind: str = "update"
              ) -> dict[tuple[int, int], tuple[int, int]]:
    """(round, client) -> (down, up) payload bytes of the ``kind`` messages (``update``: training; ``eval``:
    personalised evaluation) as each SuperNode recorded them (the last attempt), leaving out the ``earlier``
    experiments' records (a federation shared by several runs)."""
    out = {}
    for f in sorted(wire_files(fed) - set(earlier)):
        for line in f.read_text().splitlines():
            e = json.loads(line)
            if e.get("kind", "update") == kind:
                out[(e["round"], e["client"])] = (e["down"], e["up"])
    return out


def ledger_pairs(run_dir: Path, kind: str = "update") -> dict[tuple[int, int], tuple[int, int]]:
    """(round, client) -> (down, up) bytes of the ledger's delivered ``kind`` messages (``update`` takes every
    training message, whatever it carried)."""
    pairs: dict[tuple[int, int], dict[str, int]] = {}
    for e in read_ledger(run_dir / "ledger.jsonl"):
        if "status" not in e and (e["kind"] == "eval") == (kind == "eval"):
            pairs.setdefault((e["round"], e["client"]), {})[e["direction"]] = e["bytes"]
    return {k: (v["down"], v["up"]) for k, v in pairs.items() if "up" in v}


def assert_same_adapter(a: Path, b: Path) -> None:
    """The same export (a peft adapter, or the whole model), bit for bit."""
    ta, tb = exported_tensors(a), exported_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert (ta[k] == tb[k]).all(), k


def node_file(path: Path, rows: int, labels: list[str]) -> Path:
    """A SuperNode's own JSONL training file: ``rows`` texts cycling through ``labels``."""
    with open(path, "w") as f:
        for i in range(rows):
            label = labels[i % len(labels)]
            f.write(json.dumps({"text": f"node text {i} {label}", "label": label}) + "\n")
    return path
