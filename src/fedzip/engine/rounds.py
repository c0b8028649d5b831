"""The round engine that a simulation and a Flower deployment share: bytes out, bytes back, counted, a round at a time.

Per round: sample clients -> ``method.configure`` -> encode + ledger -> an *exchange* carries the bytes to the
clients and their replies back -> ledger + decode -> ``method.aggregate`` -> evaluate -> write metrics ->
checkpoint. The exchange is the only part that differs between a laptop simulation
(:class:`fedzip.engine.simulation.InProcessExchange`: clients run here, one after another) and a deployment
(the Flower exchange in ``fedzip.deploy``). The engine knows the Method protocol, never a particular method.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fedzip import privacy
from fedzip.config import ExperimentConfig, dump_config
from fedzip.data.task import model_device
from fedzip.engine.checkpoint import RunIdentity, load_checkpoint, recover_checkpoint, start_identity, write_checkpoint
from fedzip.engine.ledger import Ledger
from fedzip.engine.personal import PersonalEvaluation, personal_clients
from fedzip.engine.runtime import Runtime, build_runtime, client_runtime
from fedzip.engine.simulation import InProcessExchange, export_personal_models
from fedzip.engine.state import ClientStateStore
from fedzip.errors import ConfigError, PayloadError, RunDirError, TooFewReplies
from fedzip.methods.base import Method, ReplyMeta
from fedzip.methods.state import ServerState
from fedzip.models import TrainableView, save_adapter
from fedzip.progress import RunProgress
from fedzip.registry import method_class
from fedzip.rundir import RunDir
from fedzip.wire import decode, encode
from fedzip.wire.payload import MAGIC as WIRE_FORMAT

log = logging.getLogger(__name__)


def sample_clients(seed: int, rnd: int, num_clients: int, per_round: int) -> list[int]:
    rng = np.random.default_rng([seed, rnd, 0x5A])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def prepare_run_dir(out: Path, resume: bool) -> Path:
    if resume:
        recover_checkpoint(out)
        if not (RunDir(out).checkpoints / "state.json").exists():
            raise RunDirError(f"nothing to resume in {out}: no checkpoint found")
        return out
    if out.exists() and any(out.iterdir()):
        n = 2
        while (out.parent / f"{out.name}-{n}").exists():
            n += 1
        out = out.parent / f"{out.name}-{n}"  # never overwrite an earlier run
    out.mkdir(parents=True, exist_ok=True)
    return out


def _comparable(config: dict, method_cls) -> dict:
    """A dumped config without the method options a resumed run may change (``Method.resumable_options``)."""
    options = {k: v for k, v in (config.get("method_options") or {}).items() if k not in method_cls.resumable_options}
    return config | {"method_options": options}


def _truncate_lines(path: Path, keep: int) -> None:
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()[:keep]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


@dataclass
class OpenRun:
    """A run between its start (or resume) and its end: what the round loop reads and writes."""

    cfg: ExperimentConfig
    method_cls: type[Method]
    dir: RunDir
    rt: Runtime
    method: Method
    store: ClientStateStore
    ledger: Ledger
    bar: RunProgress
    exchange: Any  # InProcessExchange, the Flower exchange, or a test's
    personal: PersonalEvaluation | None
    identity: RunIdentity
    start: int  # the first round to run
    elapsed_before: float  # seconds the run spent before this start
    metrics_lines: int = 0
    private_lines: int = 0

    @property
    def view(self) -> TrainableView:
        """The server's trainable view (a server always loads its model)."""
        assert self.rt.view is not None
        return self.rt.view


def run_experiment(cfg: ExperimentConfig, out: Path, resume: bool = False, progress: bool = True,
                   stop_after: int | None = None, exchange=None) -> dict:
    """Run (or resume) an experiment into run directory ``out``. Returns the summary.

    ``exchange(rnd, {cid: bytes}, timing) -> ({cid: reply bytes}, {cid: failure reason}, {cid: diagnostics})``
    carries a round's messages; by default clients run in this process (:class:`InProcessExchange`), the only
    exchange whose diagnostics are not empty. Its ``evaluate`` carries personalised evaluation's
    (``fedzip.engine.personal``).
    ``stop_after`` ends the process after that round's checkpoint, as an interruption would (tests).
    """
    run = open_run(cfg, Path(out), resume, progress, exchange)
    t_start = time.time()
    try:
        for rnd in range(run.start, run.cfg.rounds + 1):
            row = run_round(run.cfg, run.method, run.ledger, rnd, run.bar, run.exchange)
            if rnd % run.cfg.eval.every == 0 or rnd == run.cfg.rounds:
                row |= evaluate_round(run, rnd)
            row["wall_seconds"] = run.elapsed_before + time.time() - t_start
            record_round(run, rnd, row)
            if stop_after is not None and stop_after <= rnd < run.cfg.rounds:
                return {"interrupted_after": rnd, "run_dir": str(run.dir.path)}
    finally:
        run.bar.close()
        run.ledger.close()
    return finish_run(run, run.elapsed_before + time.time() - t_start)


def open_run(cfg: ExperimentConfig, out: Path, resume: bool, progress: bool, exchange) -> OpenRun:
    """The run directory, the server's method and runtime, and the exchange: fresh, or as the verified checkpoint
    left them."""
    method_cls = method_class(cfg.method)
    cfg = method_cls.adjust_config(cfg)
    if cfg.deploy.client_data == "on_nodes" and exchange is None:
        raise ConfigError("deploy.client_data: on_nodes means clients read files on their SuperNodes; "
                          "run it on Flower (fedzip deploy), or use shared data in a simulation")
    out = prepare_run_dir(out, resume)
    run_dir = RunDir(out)
    if resume:
        _check_same_config(run_dir, cfg, method_cls)
    run_dir.config.write_text(dump_config(cfg))
    checkpoint: dict[str, Any] = {}
    server_state: ServerState | None = None
    if resume:  # verified before anything is built: a damaged checkpoint is one line, not a resumed run that differs
        checkpoint, server_state = load_checkpoint(run_dir.checkpoints)
        _check_run_files(run_dir, checkpoint)
    rt = build_runtime(cfg, method_cls)
    rt.run_dir = out
    if resume and privacy.is_private(cfg):  # the DP key: the runtime's fresh one at a fresh start, else the checkpoint's
        key = checkpoint.get("randomness_key")
        if not key:
            raise RunDirError(f"{run_dir.checkpoints}: the checkpoint holds no DP randomness key; the run cannot "
                              "resume privately")
        rt.randomness = privacy.Randomness(bytes.fromhex(key), cfg.seed)
    # With data on the nodes the server's own partition is of its evaluation data, not of any client's.
    run_dir.partition.write_text(json.dumps(rt.stats if cfg.deploy.client_data == "shared" else {
        "clients": "on their SuperNodes (deploy.client_data: on_nodes); the server sees only the example "
                   "counts their replies carry"}, indent=1))
    method = method_cls(cfg, rt)
    method.init_global()
    run_dir.method_facts.write_text(json.dumps(
        {"method": cfg.method, **method.describe(), **({"privacy": privacy.describe(cfg)} if privacy.enabled(cfg) else {}),
         **({"record_privacy": privacy.describe_records(cfg)} if cfg.privacy.records.noise_multiplier is not None else {})},
        indent=1))
    store = ClientStateStore(run_dir.client_state)
    identity = start_identity(out, resume)

    start, elapsed_before = 1, 0.0
    if server_state is not None:
        method.load_server_state(server_state)
        start, elapsed_before = checkpoint["round"] + 1, checkpoint["wall_seconds"]
        _truncate_lines(run_dir.ledger, checkpoint["ledger_lines"])
        _truncate_lines(run_dir.metrics, checkpoint["metrics_lines"])
        _truncate_lines(run_dir.private_rows, checkpoint.get("private_lines", 0))
        store.rollback(checkpoint["round"])
        log.info("resuming %s after round %d", out, checkpoint["round"])
    else:
        for f in (run_dir.ledger, run_dir.metrics, run_dir.private_rows):
            f.write_text("")
    if privacy.any_enabled(cfg):  # they name each round's clients: the operator's alone
        for f in (run_dir.ledger, run_dir.private_rows):
            os.chmod(f, 0o600)

    ledger = Ledger(run_dir.ledger)
    bar = RunProgress(cfg.rounds, start, enabled=progress)
    rt.step_progress = bar.step
    if exchange is None:
        exchange = InProcessExchange(method_cls(cfg, client_runtime(rt, method_cls)), store, bar)
    if hasattr(exchange, "begin"):
        exchange.begin(identity)
    personal = None
    if personal_clients(cfg, method_cls):
        personal = PersonalEvaluation(cfg, rt, method, exchange, ledger)
    elif method_cls.personalised:
        log.warning("%s: its clients keep models of their own and eval.personal_clients is 0: nothing is evaluated",
                    cfg.method)
    return OpenRun(cfg, method_cls, run_dir, rt, method, store, ledger, bar, exchange, personal, identity, start,
                   elapsed_before, _count_lines(run_dir.metrics), _count_lines(run_dir.private_rows))


def evaluate_round(run: OpenRun, rnd: int) -> dict:
    """The round's evaluations: the global model on the test subset (the whole test split in the last round),
    personalised evaluation where the method's clients keep models of their own, and the method's own."""
    cfg, rt, method, personal, t0 = run.cfg, run.rt, run.method, run.personal, time.time()
    row: dict = {}
    full = rnd == cfg.rounds
    if not run.method_cls.personalised:
        run.view.set(method.global_tensors())
        row |= rt.task.evaluate(rt.model, cfg.eval.batch_size, None if full else cfg.eval.max_examples, seed=cfg.seed)
    if personal is not None:
        row |= personal(rnd, full)
    if full and cfg.eval.max_examples and cfg.eval.max_examples < row.get("eval_examples", 0):
        # the last round on the fixed subset too, so the run's curve ends where the run ends
        run.view.set(method.global_tensors())
        row["fixed_subset"] = (personal(rnd, False, own=False) if personal is not None and run.method_cls.personalised else
                               rt.task.evaluate(rt.model, cfg.eval.batch_size, cfg.eval.max_examples, seed=cfg.seed))
    own = method.evaluate(rnd, None if full else cfg.eval.max_examples)
    if own:
        row |= own
        row["method_eval_keys"] = sorted(own)  # which of the row's metrics are the method's own
    row["eval_s"] = time.time() - t0
    if rnd in run.ledger.eval_bytes:  # personalised evaluation's traffic, apart from training's
        row |= {"bytes_eval_up": run.ledger.eval_bytes[rnd]["up"], "bytes_eval_down": run.ledger.eval_bytes[rnd]["down"]}
    return row


def record_round(run: OpenRun, rnd: int, row: dict) -> None:
    """The round's row (what a private run may release, and what only the server keeps), then its checkpoint."""
    released, kept = privacy.split_row(run.cfg, row)  # a private run releases no cohort and no unnoised figure
    with open(run.dir.metrics, "a", encoding="utf-8") as f:
        f.write(json.dumps(released) + "\n")
    run.metrics_lines += 1
    if kept:
        with open(run.dir.private_rows, "a", encoding="utf-8") as f:
            f.write(json.dumps(kept) + "\n")
        run.private_lines += 1
    run.ledger.flush()
    key = run.rt.randomness.key if run.rt.randomness is not None else None
    write_checkpoint(run.dir.checkpoints, run.method.server_state(), {
        "round": rnd, "ledger_lines": run.ledger.lines(), "metrics_lines": run.metrics_lines,
        "private_lines": run.private_lines, "wall_seconds": row["wall_seconds"],
        "randomness_key": key.hex() if key else None})
    run.store.commit(rnd)
    run.bar.round_done(rnd, row)


def finish_run(run: OpenRun, wall: float) -> dict:
    """The exported model (and, in a simulation, the evaluated clients' own), and the summary."""
    cfg, rt, method, out = run.cfg, run.rt, run.method, run.dir.path
    run.view.set(method.global_tensors())
    export_model(rt.model, run.method_cls, out)
    if run.personal is not None and run.method_cls.personalised and run.method_cls.uses_lora and \
            isinstance(run.exchange, InProcessExchange):
        # adapter/ is no client's model: what only the clients keep is at its initial value there
        export_personal_models(run.exchange, method.global_tensors(), run.personal.cids, out)
        log.info("%s: adapter/ holds the shared tensors only; the evaluated clients' own models are in %s",
                 cfg.method, run.dir.personal)
    summary = write_summary(cfg, out, wall, device_name(rt.model))
    return {**summary, "run_dir": str(out)}


def _check_same_config(run_dir: RunDir, cfg: ExperimentConfig, method_cls) -> None:
    saved = yaml.safe_load(run_dir.config.read_text())
    try:  # a run started by an older fedzip lacks keys added since, which then hold their defaults
        saved = yaml.safe_load(dump_config(ExperimentConfig.model_validate(saved)))
    except Exception:
        raise RunDirError(f"{run_dir.config} is not a config this fedzip reads; start the run afresh") from None
    if _comparable(saved, method_cls) != _comparable(yaml.safe_load(dump_config(cfg)), method_cls):
        raise RunDirError(f"{run_dir.config} differs from the config being resumed; resume with the same config")


def run_round(cfg, method, ledger: Ledger, rnd: int, bar: RunProgress, exchange) -> dict:
    t_round = time.time()
    # Under client-level DP each client joins independently (Poisson), as the accountant assumes, with a draw
    # no one can replay (fedzip.privacy); a round may then sample no one, and still adds its noise.
    cids = (method.rt.randomness.cohort(rnd, cfg.num_clients, privacy.sampling_rate(cfg)) if privacy.enabled(cfg)
            else sample_clients(cfg.seed, rnd, cfg.num_clients, cfg.clients_per_round))
    bar.round_start(rnd, len(cids))
    timing = dict.fromkeys(("compute_s", "encode_s", "decode_s", "aggregate_s"), 0.0)
    messages = method.configure(rnd, cids)
    encoded: dict[int, bytes] = {}  # a message object sent to many clients is encoded once
    downs: dict[int, bytes] = {}
    t0 = time.time()
    for cid in cids:
        msg = messages[cid]
        if id(msg) not in encoded:
            encoded[id(msg)] = encode(msg, method.wire_codec("down"))
        downs[cid] = encoded[id(msg)]
    timing["encode_s"] += time.time() - t0

    ups, failures, diagnostics = exchange(rnd, downs, timing)
    replies, losses, rejected, client_steps, client_examples, record_epsilon = {}, [], [], 0, {}, {}
    for cid in cids:
        kind = messages[cid].ledger_tag  # e.g. a one-time model inside the message
        if cid in failures:  # never reached the client, or no reply in time: logged, not fatal
            ledger.record(rnd, cid, "down", len(downs[cid]), kind, status=failures[cid])
            continue
        ledger.record(rnd, cid, "down", len(downs[cid]), kind)
        up = ups[cid]
        t0 = time.time()
        try:  # the payload, then the meta every reply carries, validated once: the rest of the round trusts both
            replies[cid] = decode(up, method.up_spec(cid, rnd), max_bytes=cfg.wire.max_payload_bytes)
            facts = ReplyMeta.parse(replies[cid].meta)
        except Exception as exc:  # noqa: BLE001 - a bad reply is dropped and logged, never fatal to the server
            reason = str(exc) if isinstance(exc, PayloadError) else f"{type(exc).__name__}: {exc}"
            log.warning("round %d: reply from client %d rejected: %s", rnd, cid, reason[:300])
            rejected.append(cid)
            replies.pop(cid, None)
            ledger.record(rnd, cid, "up", len(up), rejected=reason[:300])  # it arrived: its bytes count
            continue
        finally:
            timing["decode_s"] += time.time() - t0
        ledger.record(rnd, cid, "up", len(up))
        replies[cid].diagnostics = diagnostics.get(cid, {})
        if facts.train_loss is not None:
            losses.append(facts.train_loss)
        client_examples[str(cid)] = facts.num_examples  # what weighting uses: all a server learns of a client's data
        if facts.record_epsilon is not None:  # record-level DP-SGD: the client's own accountant
            record_epsilon[str(cid)] = facts.record_epsilon
        client_steps += facts.steps or 0

    need = math.ceil(cfg.deploy.min_reply_fraction * len(cids))
    if len(replies) < need:
        reasons = "; ".join(f"client {c}: {r}" for c, r in list(failures.items())[:3])
        raise TooFewReplies(f"round {rnd}: only {len(replies)} of {len(cids)} sampled clients replied with a valid "
                            f"update (deploy.min_reply_fraction needs {need})" + (f" ({reasons})" if reasons else "") +
                            "; the run stopped after its last completed round and can be resumed")
    t0 = time.time()
    # Under DP a round with no reply still releases noise (what it releases must not say that no one took part).
    extra: dict[str, Any] = {}
    if replies or privacy.enabled(cfg):
        extra, dropped = aggregate_valid(method, rnd, replies)
        for cid, reason in dropped.items():
            log.warning("round %d: reply from client %d rejected: %s", rnd, cid, reason[:300])
            rejected.append(cid)
    timing["aggregate_s"] = time.time() - t0
    up_b, down_b = ledger.round_bytes[rnd]["up"], ledger.round_bytes[rnd]["down"]
    row = {"round": rnd, "clients": cids, "bytes_up": up_b, "bytes_down": down_b,
           "bytes_up_per_client": up_b / max(len(cids), 1), "bytes_down_per_client": down_b / max(len(cids), 1),
           "cohort_size": len(cids), "replied": len(replies) - len([c for c in rejected if c in replies]),
           "train_loss": float(np.mean(losses)) if losses else None, "rejected": rejected,
           "client_steps": client_steps,  # local steps the replies report: compute_s / client_steps = step time
           "client_examples": client_examples,
           **({"client_record_epsilon": record_epsilon, "record_epsilon_max": max(record_epsilon.values())}
              if record_epsilon else {}),
           **({"failed": sorted(failures)} if failures else {}), **timing, **(extra or {})}
    if privacy.enabled(cfg):
        row["epsilon"] = privacy.run_epsilon(cfg, rnd)  # the guarantee after this round, at the run's delta
    row["round_s"] = time.time() - t_round
    return row


def aggregate_valid(method, rnd: int, replies: dict) -> tuple[dict, dict[int, str]]:
    """``method.aggregate`` of the replies it accepts, and the reason for each it refused.

    A reply that decodes (names, shapes, finite values) can still carry meta the method refuses in ``aggregate``
    (a negative example count, a HAFL mask of the wrong rank): the method raises PayloadError without saying
    whose, before it has changed anything (``Method.aggregate``'s contract). Then each reply is tried alone to
    find the ones refused, the server state put back after each try, and the rest are aggregated: the result is
    the round in which those clients did not reply. Nothing is copied in a round where every reply is accepted."""
    try:
        return method.aggregate(rnd, replies), {}
    except PayloadError:
        before = _copy_state(method.server_state())
    refused = {}
    for cid in list(replies):
        method.load_server_state(_copy_state(before))
        try:
            method.aggregate(rnd, {cid: replies[cid]})
        except PayloadError as exc:
            refused[cid] = str(exc)
    method.load_server_state(_copy_state(before))
    kept = {c: r for c, r in replies.items() if c not in refused}
    if not refused:  # refused only together: no client to blame, so the round is not aggregated
        raise PayloadError(f"round {rnd}: the replies could not be aggregated together") from None
    return (method.aggregate(rnd, kept) if kept or privacy.enabled(method.cfg) else {}), refused


def _copy_state(state):
    from fedzip.methods.state import ServerState

    return ServerState({g: {n: t.clone() for n, t in ts.items()} for g, ts in state.tensors.items()},
                       json.loads(json.dumps(state.facts)))


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def _check_run_files(run: RunDir, checkpoint: dict) -> None:
    """The run's files hold at least the lines the checkpoint counts (else they were cut or replaced)."""
    for path, key in ((run.metrics, "metrics_lines"), (run.ledger, "ledger_lines"), (run.private_rows, "private_lines")):
        if _count_lines(path) < checkpoint.get(key, 0):
            raise RunDirError(f"{path}: shorter than the checkpoint of round {checkpoint['round']} records; "
                              "the run cannot resume from it")


def export_model(model, method_cls, out: Path) -> None:
    method_cls.before_export(model)
    if method_cls.uses_lora:
        save_adapter(model, RunDir(out).adapter)
    else:
        model.save_pretrained(str(RunDir(out).model))


def code_version() -> dict:
    """fedzip's version and, when it runs from a git checkout, the commit and whether the tree had changes."""
    import subprocess

    from fedzip import __version__

    out: dict[str, Any] = {"version": __version__, "commit": None, "dirty": None}
    here = Path(__file__).resolve().parent.parent  # the package: src/fedzip in a checkout
    try:
        git = ["git", "-C", str(here)]
        out["commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                       check=True).stdout.strip() or None
        status = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no", "--", "."], capture_output=True,
                                text=True, timeout=10, check=True).stdout
        out["dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # an installed package: the version is all there is
    return out


def device_name(model) -> str:
    """Where the model actually trained (``auto`` keeps a CPU-only method on the CPU)."""
    device = model_device(model) if model is not None else torch.device("cpu")
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def write_summary(cfg, out: Path, wall: float, device: str = "cpu") -> dict:
    rows = RunDir(out).rows()
    metric_keys = ("accuracy", "macro_f1", "loss", "perplexity", "ceval_accuracy", "exact_match")
    evaluated = [r for r in rows if any(k in r for k in metric_keys)]
    last = evaluated[-1] if evaluated else {}
    own = set(last.get("method_eval_keys", ()))  # plus the method's own evaluations of that round
    final = {k: v for k, v in last.items() if k in metric_keys or (k in own and isinstance(v, float))}
    summary = {
        "method": cfg.method, "name": out.name, "rounds_completed": len(rows), "final_metrics": final,
        "bytes_up_total": sum(r["bytes_up"] for r in rows), "bytes_down_total": sum(r["bytes_down"] for r in rows),
        **({"bytes_eval_total": sum(r.get("bytes_eval_up", 0) + r.get("bytes_eval_down", 0) for r in rows)}
           if any("bytes_eval_up" in r for r in rows) else {}),
        "wall_seconds": wall,
        "time_split_s": {k: sum(r.get(k, 0.0) or 0.0 for r in rows)
                         for k in ("compute_s", "encode_s", "decode_s", "aggregate_s", "eval_s")},
        "model": cfg.model.name, "data": cfg.data.source, "seed": cfg.seed,
        "num_clients": cfg.num_clients, "clients_per_round": cfg.clients_per_round,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": device,
        "torch": torch.__version__,
        "wire_format": WIRE_FORMAT.decode(),  # what the ledger's bytes are bytes of (FZP1: the header as plain JSON)
        "code": code_version(),  # which fedzip produced the run
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        # what a method flagged while going on (e.g. a learned codec below its quality gate): every report repeats it
        "warnings": [f"round {r['round']}: {r['warning']}" for r in rows if r.get("warning")],
    }
    if privacy.enabled(cfg):
        summary["privacy"] = privacy.describe(cfg) | {"epsilon": rows[-1].get("epsilon") if rows else 0.0}
    if cfg.privacy.records.noise_multiplier is not None:
        summary["record_privacy"] = privacy.describe_records(cfg)
    if privacy.any_enabled(cfg) and not privacy.is_private(cfg):
        summary["warnings"].insert(0, privacy.NOT_PRIVATE)
    RunDir(out).summary.write_text(json.dumps(summary, indent=1))
    return summary
