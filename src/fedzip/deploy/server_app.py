"""The fedzip ServerApp: the same round engine as a simulation, its messages carried by Flower.

Run config (``flwr run ... --run-config``): ``config`` (packaged name or YAML path), ``overrides``
(";"-separated ``key=value``), ``out`` (run directory) and ``resume``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedzip.deploy.exchange import FlowerExchange
from fedzip.deploy.task import experiment_config
from fedzip.engine import run_experiment
from fedzip.errors import FedzipError

log = logging.getLogger("fedzip.deploy")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s fedzip: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    rc = context.run_config
    try:
        cfg = experiment_config(rc)
        out = Path(str(rc.get("out") or "")).expanduser() if rc.get("out") else \
            Path.home() / "fedzip-runs" / f"flower-{context.run_id}"
        resume = bool(rc.get("resume", False))
        log.info("run %s: %s, %d rounds, %d clients (%d a round) -> %s%s", context.run_id, cfg.method, cfg.rounds,
                 cfg.num_clients, cfg.clients_per_round, out, " (resuming)" if resume else "")
        summary = run_experiment(cfg, out, resume=resume, progress=False, exchange=FlowerExchange(grid, cfg))
    except FedzipError as exc:  # one clear line, the checkpoint of the last completed round stays
        log.error("%s", exc)
        raise SystemExit(exc.exit_code) from None
    log.info("done: %s; final %s; %d bytes up, %d down", summary["run_dir"], summary["final_metrics"],
             summary["bytes_up_total"], summary["bytes_down_total"])
