"""The round engine: every message is encoded to bytes, counted, and decoded on the other side.

Per round: sample clients (seeded by round) -> ``method.configure`` -> encode + ledger -> an *exchange*
carries the bytes to the clients and their replies back -> ledger + decode -> ``method.aggregate`` ->
evaluate -> write metrics -> checkpoint. The exchange is the only part that differs between a laptop
simulation (:class:`InProcessExchange`: clients run here, one after another) and a deployment (the
Flower exchange in ``fedzip.deploy``). The engine knows the Method protocol, never a particular method.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from fedzip import privacy
from fedzip.config import ExperimentConfig, dump_config
from fedzip.data.task import model_device
from fedzip.engine.client import client_seed, run_client  # noqa: F401  (client_seed: re-exported)
from fedzip.engine.ledger import Ledger
from fedzip.engine.memory import PeakMemory
from fedzip.engine.personal import PersonalEvaluation, evaluate_client, personal_clients
from fedzip.engine.runtime import build_runtime, client_runtime
from fedzip.engine.state import ClientStateStore
from fedzip.errors import ConfigError, PayloadError, RunDirError
from fedzip.methods.state import load_server_state, save_server_state
from fedzip.models import save_adapter
from fedzip.progress import RunProgress
from fedzip.registry import method_class
from fedzip.wire import decode, encode
from fedzip.wire.payload import MAGIC as WIRE_FORMAT

log = logging.getLogger(__name__)


def sample_clients(seed: int, rnd: int, num_clients: int, per_round: int) -> list[int]:
    rng = np.random.default_rng([seed, rnd, 0x5A])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


class InProcessExchange:
    """Clients run in this process, one after another, each from the bytes it was sent.

    They use their own Method instance on their own runtime (``client_runtime``: the same read-only data,
    a model of their own), built like a deployed client's: nothing passes from the server side to a client
    except the message bytes. The process holds a second copy of the trainable model for them."""

    def __init__(self, client_method, store: ClientStateStore, bar: RunProgress):
        self.method, self.store, self.bar = client_method, store, bar
        self.memory = PeakMemory(model_device(client_method.rt.model) if client_method.rt.model is not None else None)

    def __call__(self, rnd: int, downs: dict[int, bytes], timing: dict):
        replies, diagnostics = {}, {}
        timing["client_compute_s"] = {}  # each client's own compute: what a link model needs per client
        timing["client_memory"] = {}  # each client's peak memory while it decoded, trained and encoded
        for cid, down in downs.items():
            self.bar.client_start(cid)
            before = timing["compute_s"]
            self.memory.start()
            result = run_client(self.method, self.store, rnd, cid, down, timing)
            replies[cid], diagnostics[cid] = result.up, result.diagnostics
            timing["client_memory"][str(cid)] = self.memory.stop()
            timing["client_compute_s"][str(cid)] = timing["compute_s"] - before
            self.bar.client_done()
        return replies, {}, diagnostics  # (replies, failures: cid -> reason, diagnostics)

    evaluates_clients = True

    def evaluate(self, rnd: int, down: bytes, requests: dict[int, dict]) -> tuple[dict[int, bytes], dict[int, str]]:
        """Personalised evaluation (``fedzip.engine.personal``): each client answers from its own state."""
        return {cid: evaluate_client(self.method, self.store, cid, down, req) for cid, req in requests.items()}, {}


def export_personal_models(exchange: InProcessExchange, glob: dict[str, torch.Tensor], cids: list[int],
                           out: Path) -> None:
    """The evaluated clients' own models at the end (the global tensors ``glob`` with what each keeps), each a
    peft adapter: ``personal/client_<cid>``. In a simulation only: a deployed client's model stays on its node."""
    method = exchange.method
    for cid in cids:
        method.rt.view.set(method.personal_tensors(cid, exchange.store, {n: glob[n] for n in method.personal_spec()}))
        save_adapter(method.rt.model, out / "personal" / f"client_{cid}")


def recover_checkpoint(out: Path) -> None:
    """A crash in the middle of swapping checkpoints leaves a complete one under another name."""
    ckpt = out / "checkpoints"
    if (ckpt / "state.json").exists():
        return
    for name in ("checkpoints.tmp", "checkpoints.old"):  # the newer complete one first
        cand = out / name
        if (cand / "state.json").exists() and (cand / "server.safetensors").exists():
            if ckpt.exists():
                shutil.rmtree(ckpt)
            cand.rename(ckpt)
            return


def prepare_run_dir(out: Path, resume: bool) -> Path:
    if resume:
        recover_checkpoint(out)
        if not (out / "checkpoints" / "state.json").exists():
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


def run_experiment(cfg: ExperimentConfig, out: Path, resume: bool = False, progress: bool = True,
                   stop_after: int | None = None, exchange=None) -> dict:
    """Run (or resume) an experiment into run directory ``out``. Returns the summary.

    ``exchange(rnd, {cid: bytes}, timing) -> ({cid: reply bytes}, {cid: failure reason}, {cid: diagnostics})``
    carries a round's messages; by default clients run in this process (:class:`InProcessExchange`), the only
    exchange whose diagnostics are not empty. Its ``evaluate`` carries personalised evaluation's
    (``fedzip.engine.personal``).
    ``stop_after`` ends the process after that round's checkpoint, as an interruption would (tests).
    """
    method_cls = method_class(cfg.method)
    cfg = method_cls.adjust_config(cfg)
    if cfg.deploy.client_data == "on_nodes" and exchange is None:
        raise ConfigError("deploy.client_data: on_nodes means clients read files on their SuperNodes; "
                          "run it on Flower (fedzip deploy), or use shared data in a simulation")
    out = prepare_run_dir(Path(out), resume)
    ckpt_dir = out / "checkpoints"
    if resume:
        saved = yaml.safe_load((out / "config.yaml").read_text())
        try:  # a run started by an older fedzip lacks keys added since, which then hold their defaults
            saved = yaml.safe_load(dump_config(ExperimentConfig.model_validate(saved)))
        except Exception:
            raise RunDirError(f"{out}/config.yaml is not a config this fedzip reads; start the run afresh") from None
        if _comparable(saved, method_cls) != _comparable(yaml.safe_load(dump_config(cfg)), method_cls):
            raise RunDirError(f"{out}/config.yaml differs from the config being resumed; resume with the same config")
    (out / "config.yaml").write_text(dump_config(cfg))

    rt = build_runtime(cfg, method_cls)
    rt.run_dir = out
    # With data on the nodes the server's own partition is of its evaluation data, not of any client's.
    (out / "partition.json").write_text(json.dumps(rt.stats if cfg.deploy.client_data == "shared" else {
        "clients": "on their SuperNodes (deploy.client_data: on_nodes); the server sees only the example "
                   "counts their replies carry"}, indent=1))
    method = method_cls(cfg, rt)
    method.init_global()
    (out / "method.json").write_text(json.dumps({"method": cfg.method, **method.describe(),
                                                 **({"privacy": privacy.describe(cfg)} if privacy.enabled(cfg) else {})},
                                                indent=1))
    store = ClientStateStore(out / "client_state")

    start, elapsed_before = 1, 0.0
    if resume:
        state = json.loads((ckpt_dir / "state.json").read_text())
        method.load_server_state(load_server_state(ckpt_dir / "server.safetensors"))
        start, elapsed_before = state["round"] + 1, state["wall_seconds"]
        _truncate_lines(out / "ledger.jsonl", state["ledger_lines"])
        _truncate_lines(out / "metrics.jsonl", state["metrics_lines"])
        store.rollback(state["round"])
        log.info("resuming %s after round %d", out, state["round"])
    else:
        for f in ("ledger.jsonl", "metrics.jsonl"):
            (out / f).write_text("")

    ledger = Ledger(out / "ledger.jsonl")
    bar = RunProgress(cfg.rounds, start, enabled=progress)
    rt.step_progress = bar.step
    if exchange is None:
        exchange = InProcessExchange(method_cls(cfg, client_runtime(rt, method_cls)), store, bar)
    personal = None
    if personal_clients(cfg, method_cls):
        personal = PersonalEvaluation(cfg, rt, method, exchange, ledger)
    elif method_cls.personalised:
        log.warning("%s: its clients keep models of their own and eval.personal_clients is 0: nothing is evaluated",
                    cfg.method)
    t_start = time.time()
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        metrics_lines = sum(1 for _ in f)
    try:
        for rnd in range(start, cfg.rounds + 1):
            row = run_round(cfg, method, ledger, rnd, bar, exchange)
            if rnd % cfg.eval.every == 0 or rnd == cfg.rounds:
                t0 = time.time()
                full = rnd == cfg.rounds
                if not method_cls.personalised:
                    rt.view.set(method.global_tensors())
                    row.update(rt.task.evaluate(rt.model, cfg.eval.batch_size, None if full else cfg.eval.max_examples,
                                                seed=cfg.seed))
                if personal is not None:
                    row.update(personal(rnd, full))
                if full and cfg.eval.max_examples and cfg.eval.max_examples < row.get("eval_examples", 0):
                    # the last round on the fixed subset too, so the run's curve ends where the run ends
                    rt.view.set(method.global_tensors())
                    row["fixed_subset"] = (personal(rnd, False, own=False) if method_cls.personalised else
                                           rt.task.evaluate(rt.model, cfg.eval.batch_size, cfg.eval.max_examples,
                                                            seed=cfg.seed))
                own = method.evaluate(rnd, None if full else cfg.eval.max_examples)
                if own:
                    row.update(own)
                    row["method_eval_keys"] = sorted(own)  # which of the row's metrics are the method's own
                row["eval_s"] = time.time() - t0
                if rnd in ledger.eval_bytes:  # personalised evaluation's traffic, apart from training's
                    row |= {"bytes_eval_up": ledger.eval_bytes[rnd]["up"], "bytes_eval_down": ledger.eval_bytes[rnd]["down"]}
            row["wall_seconds"] = elapsed_before + time.time() - t_start
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            metrics_lines += 1
            ledger.flush()
            _checkpoint(ckpt_dir, method, rnd, ledger.lines(), metrics_lines, row["wall_seconds"])
            store.commit(rnd)
            bar.round_done(rnd, row)
            if stop_after is not None and rnd >= stop_after and rnd < cfg.rounds:
                return {"interrupted_after": rnd, "run_dir": str(out)}
    finally:
        bar.close()
        ledger.close()

    rt.view.set(method.global_tensors())
    export_model(rt.model, method_cls, out)
    if personal is not None and method_cls.personalised and method_cls.uses_lora and \
            isinstance(exchange, InProcessExchange):
        # adapter/ is no client's model: what only the clients keep is at its initial value there
        export_personal_models(exchange, method.global_tensors(), personal.cids, out)
        log.info("%s: adapter/ holds the shared tensors only; the evaluated clients' own models are in %s",
                 cfg.method, out / "personal")
    summary = write_summary(cfg, out, elapsed_before + time.time() - t_start, device_name(rt.model))
    return {**summary, "run_dir": str(out)}


def run_round(cfg, method, ledger: Ledger, rnd: int, bar: RunProgress, exchange) -> dict:
    t_round = time.time()
    # Under client-level DP each client joins independently (Poisson), as the accountant assumes; a round may
    # then sample no one, and the model stays as it was.
    cids = (privacy.poisson_cohort(cfg.seed, rnd, cfg.num_clients, privacy.sampling_rate(cfg)) if privacy.enabled(cfg)
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
        ledger.record(rnd, cid, "up", len(up))
        t0 = time.time()
        try:
            replies[cid] = decode(up, method.up_spec(cid, rnd), max_bytes=cfg.wire.max_payload_bytes)
        except PayloadError as exc:  # a bad reply is dropped and logged, never fatal to the server
            log.warning("round %d: reply from client %d rejected: %s", rnd, cid, exc)
            rejected.append(cid)
            continue
        finally:
            timing["decode_s"] += time.time() - t0
        replies[cid].diagnostics = diagnostics.get(cid, {})
        if isinstance(replies[cid].meta.get("train_loss"), (int, float)):
            losses.append(float(replies[cid].meta["train_loss"]))
        examples = replies[cid].meta.get("num_examples")
        if isinstance(examples, int) and not isinstance(examples, bool):
            client_examples[str(cid)] = examples  # what weighting uses: all a server learns of a client's data
        record_eps = replies[cid].meta.get("record_epsilon")
        if isinstance(record_eps, float):  # record-level DP-SGD: the client's own accountant
            record_epsilon[str(cid)] = record_eps
        steps = replies[cid].meta.get("steps")
        if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
            client_steps += steps

    t0 = time.time()
    extra = method.aggregate(rnd, replies) if replies else {}
    timing["aggregate_s"] = time.time() - t0
    up_b, down_b = ledger.round_bytes[rnd]["up"], ledger.round_bytes[rnd]["down"]
    row = {"round": rnd, "clients": cids, "bytes_up": up_b, "bytes_down": down_b,
           "bytes_up_per_client": up_b / max(len(cids), 1), "bytes_down_per_client": down_b / max(len(cids), 1),
           "train_loss": float(np.mean(losses)) if losses else None, "rejected": rejected,
           "client_steps": client_steps,  # local steps the replies report: compute_s / client_steps = step time
           "client_examples": client_examples,
           **({"client_record_epsilon": record_epsilon, "record_epsilon_max": max(record_epsilon.values())}
              if record_epsilon else {}),
           **({"failed": sorted(failures)} if failures else {}), **timing, **extra}
    if privacy.enabled(cfg):
        row["epsilon"] = privacy.run_epsilon(cfg, rnd)  # the guarantee after this round, at the run's delta
    row["round_s"] = time.time() - t_round
    return row


def _checkpoint(ckpt_dir: Path, method, rnd: int, ledger_lines: int, metrics_lines: int, wall: float) -> None:
    """Atomic: write into a temporary folder, then swap it in."""
    tmp = ckpt_dir.with_name("checkpoints.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_server_state(method.server_state(), tmp / "server.safetensors")
    # state.json last: its presence marks the folder complete (recover_checkpoint relies on it)
    (tmp / "state.json").write_text(json.dumps({"round": rnd, "ledger_lines": ledger_lines,
                                                "metrics_lines": metrics_lines, "wall_seconds": wall}))
    old = ckpt_dir.with_name("checkpoints.old")
    if ckpt_dir.exists():
        ckpt_dir.rename(old)
    tmp.rename(ckpt_dir)
    if old.exists():
        shutil.rmtree(old)


def export_model(model, method_cls, out: Path) -> None:
    method_cls.before_export(model)
    if method_cls.uses_lora:
        save_adapter(model, out / "adapter")
    else:
        model.save_pretrained(str(out / "model"))


def device_name(model) -> str:
    """Where the model actually trained (``auto`` keeps a CPU-only method on the CPU)."""
    device = model_device(model) if model is not None else torch.device("cpu")
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def write_summary(cfg, out: Path, wall: float, device: str = "cpu") -> dict:
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
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
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        # what a method flagged while going on (e.g. a learned codec below its quality gate): every report repeats it
        "warnings": [f"round {r['round']}: {r['warning']}" for r in rows if r.get("warning")],
    }
    if privacy.enabled(cfg):
        summary["privacy"] = privacy.describe(cfg) | {"epsilon": rows[-1].get("epsilon") if rows else 0.0}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
