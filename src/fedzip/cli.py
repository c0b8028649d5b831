"""The ``fedzip`` command: ``run`` an experiment, ``report`` on run directories, ``deploy`` on Flower."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fedzip.errors import FedzipError

log = logging.getLogger("fedzip")


def _setup_env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "peft", "httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars are noise next to fedzip's own progress


def cmd_run(args) -> int:
    from fedzip.config import load_config
    from fedzip.engine import run_experiment

    if args.resume and args.config is None and args.out:
        config_path = Path(args.out) / "config.yaml"
        if not config_path.exists():
            from fedzip.errors import RunDirError

            raise RunDirError(f"nothing to resume in {args.out}: no config.yaml")
    else:
        config_path = args.config or "quickstart"
    cfg = load_config(config_path, args.set)
    out = Path(args.out) if args.out else Path(args.runs_dir) / cfg.run_name()
    summary = run_experiment(cfg, out, resume=args.resume, progress=not args.quiet)
    run_dir = Path(summary["run_dir"])
    from fedzip.report import write_report

    report_path = write_report([run_dir], run_dir)
    fm = summary["final_metrics"]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in fm.items())
    print(f"{summary['method']}: {summary['rounds_completed']} rounds, {shown}")
    print(f"bytes up {summary['bytes_up_total']:,} ({summary['bytes_up_total'] / 1e6:.2f} MB), "
          f"down {summary['bytes_down_total']:,} ({summary['bytes_down_total'] / 1e6:.2f} MB), "
          f"{summary['wall_seconds']:.0f} s")
    print(f"run directory: {run_dir}")
    print(f"report: {report_path}")
    return 0


def cmd_report(args) -> int:
    from fedzip.report import print_table, write_report

    dirs = [Path(d) for d in args.run_dirs]
    out = Path(args.out) if args.out else (dirs[0] if len(dirs) == 1 else Path("report"))
    print_table(dirs)
    path = write_report(dirs, out)
    print(f"report: {path}")
    return 0


def cmd_deploy_local(args) -> int:
    from fedzip.config import load_config
    from fedzip.deploy.local import deploy_local
    from fedzip.engine.simulation import prepare_run_dir

    cfg = load_config(args.config or "quickstart", args.set)  # a bad config fails here, before Flower starts
    out = prepare_run_dir(Path(args.out) if args.out else Path(args.runs_dir) / f"{cfg.run_name()}-flower",
                          args.resume)
    run_dir = deploy_local(args.config, args.set, args.nodes, out, args.resume, args.timeout)
    summary = __import__("json").loads((run_dir / "summary.json").read_text())
    shown = ", ".join(f"{k} {v:.4f}" for k, v in summary["final_metrics"].items())
    print(f"{summary['method']} on Flower ({args.nodes} SuperNodes): {summary['rounds_completed']} rounds, {shown}")
    print(f"bytes up {summary['bytes_up_total']:,}, down {summary['bytes_down_total']:,}; run directory: {run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedzip", description="Federated fine-tuning with every byte counted.")
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="run an experiment (no config: the quickstart)")
    r.add_argument("config", nargs="?", help="YAML config file or packaged config name (default: quickstart)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    r.add_argument("--out", help="run directory (default: runs/<name>)")
    r.add_argument("--runs-dir", default="runs", help="parent folder of run directories")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    r.set_defaults(func=cmd_run)
    rep = sub.add_parser("report", help="compare run directories: table, plots, report.html")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--out", help="folder for plots and report.html")
    rep.set_defaults(func=cmd_report)
    dep = sub.add_parser("deploy", help="run on Flower (SuperLink + SuperNodes)")
    dsub = dep.add_subparsers(dest="target", required=True)
    loc = dsub.add_parser("local", help="try a deployment out: a SuperLink and N SuperNodes on this machine")
    loc.add_argument("config", nargs="?", help="YAML config file or packaged config name (default: quickstart)")
    loc.add_argument("--nodes", type=int, default=2, help="SuperNodes to start (clients are spread over them)")
    loc.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    loc.add_argument("--out", help="run directory (default: runs/<name>-flower)")
    loc.add_argument("--runs-dir", default="runs", help="parent folder of run directories")
    loc.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    loc.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    loc.set_defaults(func=cmd_deploy_local)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["run"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_env()
    if args.command in ("run", "deploy") and getattr(args, "resume", False) and not args.out:
        print("fedzip: error: --resume needs --out RUN_DIR", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except FedzipError as exc:
        print(f"fedzip: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fedzip: interrupted; the last completed round is checkpointed (resume with --resume --out RUN_DIR)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
