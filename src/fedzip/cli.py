"""The ``fedzip`` command: ``run`` an experiment, ``report`` on run directories, ``deploy`` on Flower."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fedzip.errors import ConfigError, FedzipError

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
        from fedzip.rundir import RunDir

        config_path = RunDir(args.out).config
        if not config_path.exists():
            from fedzip.errors import RunDirError

            raise RunDirError(f"nothing to resume in {args.out}: no config.yaml")
    else:
        config_path = args.config or "quickstart"
    cfg = load_config(config_path, args.set)
    out = Path(args.out) if args.out else Path(args.runs_dir) / cfg.run_name()
    if args.stop_after is not None and args.stop_after < 1:
        raise ConfigError(f"--stop-after: a round number from 1, got {args.stop_after}")
    summary = run_experiment(cfg, out, resume=args.resume, progress=not args.quiet, stop_after=args.stop_after)
    if "interrupted_after" in summary:  # a split run: the checkpoint holds everything so far
        print(f"stopped after round {summary['interrupted_after']} of {cfg.rounds}: {summary['run_dir']} "
              f"(fedzip run ... --out {summary['run_dir']} --resume continues)")
        return 0
    run_dir = Path(summary["run_dir"])
    from fedzip.report import write_report

    report_path = write_report([run_dir], run_dir)
    fm = summary["final_metrics"]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in fm.items())
    print(f"{summary['method']}: {summary['rounds_completed']} rounds, {shown}")
    print(f"bytes up {summary['bytes_up_total']:,} ({summary['bytes_up_total'] / 1e6:.2f} MB), "
          f"down {summary['bytes_down_total']:,} ({summary['bytes_down_total'] / 1e6:.2f} MB), "
          f"{summary['wall_seconds']:.0f} s")
    if summary.get("bytes_eval_total"):
        print(f"personalised evaluation: {summary['bytes_eval_total']:,} bytes more, both ways (ledger kind 'eval')")
    if "privacy" in summary:
        p = summary["privacy"]
        print(f"client-level DP ({p['mode']}): epsilon {p['epsilon']:.3g} at delta {p['delta']:.3g} "
              f"(noise multiplier {p['noise_multiplier']:.3g}, clip {p['clip']:g})"
              + ("" if p.get("private", True) else "; NOT PRIVATE: privacy.reproducible (seeded noise)"))
    print(f"run directory: {run_dir}")
    print(f"report: {report_path}")
    return 0


def cmd_report(args) -> int:
    from fedzip.report import print_table, write_report
    from fedzip.report.links import LINKS
    from fedzip.report.report import Comparison, load_run

    dirs = [Path(d) for d in args.run_dirs]
    out = Path(args.out) if args.out else (dirs[0] if len(dirs) == 1 else Path("report"))
    names = [n for n in (args.links or "").split(",") if n]
    unknown = sorted(set(names) - set(LINKS))
    if unknown:
        raise ConfigError(f"--links: unknown link {unknown[0]!r}; known: {', '.join(LINKS)}")
    if args.leaderboard:
        return leaderboard_report(dirs, args, out)
    comparison = None
    if args.reference or names:
        comparison = Comparison(load_run(Path(args.reference)) if args.reference else None,
                                [LINKS[n] for n in names], window=args.window)
    print_table(dirs, comparison)
    path = write_report(dirs, out, comparison)
    print(f"report: {path}")
    return 0


def leaderboard_report(dirs: list[Path], args, out: Path) -> int:
    """Finished runs grouped by label (a run directory's name without ``-s<seed>``), judged seed by seed."""

    from fedzip.errors import ConfigError
    from fedzip.report.compact import compact_run, seedless_label
    from fedzip.report.leaderboard import build_leaderboard, leaderboard_figure, leaderboard_markdown

    if not args.reference:
        raise ConfigError("--leaderboard needs --reference RUN_DIR (one seed of the reference, e.g. runs/fedit-s0)")
    records = [compact_run(d) for d in dirs]
    reference = seedless_label(Path(args.reference).name)
    try:
        board = build_leaderboard(records, reference, window=args.window)
    except ValueError as exc:
        raise ConfigError(f"--leaderboard: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaderboard.json").write_text(json.dumps(board, indent=1) + "\n")
    table = leaderboard_markdown(board)
    (out / "leaderboard.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    try:
        leaderboard_figure(board, records, out / "leaderboard.png", f"reference: {reference}")
    except ImportError:
        print("no figure: matplotlib is missing (pip install 'fedzip[report]')")
    print(f"leaderboard: {out / 'leaderboard.md'}")
    return 0


def cmd_deploy_local(args) -> int:
    from fedzip.config import load_config
    from fedzip.deploy.local import deploy_local
    from fedzip.engine.rounds import prepare_run_dir

    cfg = load_config(args.config or "quickstart", args.set)  # a bad config fails here, before Flower starts
    out = prepare_run_dir(Path(args.out) if args.out else Path(args.runs_dir) / f"{cfg.run_name()}-flower",
                          args.resume)
    run_dir = deploy_local(args.config, args.set, args.nodes, out, args.resume, args.timeout, credentials=args.tls)
    from fedzip.rundir import RunDir

    summary = RunDir(run_dir).read_summary()
    shown = ", ".join(f"{k} {v:.4f}" for k, v in summary["final_metrics"].items())
    print(f"{summary['method']} on Flower ({args.nodes} SuperNodes): {summary['rounds_completed']} rounds, {shown}")
    print(f"bytes up {summary['bytes_up_total']:,}, down {summary['bytes_down_total']:,}; run directory: {run_dir}")
    return 0


def cmd_deploy_credentials(args) -> int:
    from fedzip.deploy.credentials import make_credentials

    paths = make_credentials(Path(args.out), args.nodes, args.host, force=args.force)
    print(f"wrote {len(paths)} files to {args.out}: CA ca.crt (share) / ca.key (keep offline), "
          f"superlink.crt/.key, node<i>.key (SuperNode i only) / node<i>.pub (register on the SuperLink)")
    return 0


def _exec_flower(cmd: list[str]) -> int:
    from fedzip.deploy.local import flower_env

    env = flower_env(Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")))
    print("fedzip: " + " ".join(cmd), flush=True)
    os.execvpe(cmd[0], cmd, env)  # Flower takes over this process (Ctrl-C stops it)
    return 0


def _credential(creds: str | None, name: str, insecure: bool) -> str | None:
    if insecure:
        return None
    if not creds:
        from fedzip.errors import ConfigError

        raise ConfigError("--credentials DIR is required (TLS and node authentication are on by default); "
                          "create it with `fedzip deploy credentials`, or pass --insecure to try things out")
    path = Path(creds) / name
    if not path.exists():
        from fedzip.errors import ConfigError

        raise ConfigError(f"{path} not found (made by `fedzip deploy credentials`)")
    return str(path.resolve())


def cmd_deploy_superlink(args) -> int:
    cmd = ["flower-superlink", "--disable-runtime-dependency-installation", "--host", args.host, "--port", str(args.port),
           "--database", args.database]
    if args.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", _credential(args.credentials, "ca.crt", False),
                "--ssl-certfile", _credential(args.credentials, "superlink.crt", False),
                "--ssl-keyfile", _credential(args.credentials, "superlink.key", False), "--enable-supernode-auth"]
    return _exec_flower(cmd)


def cmd_deploy_supernode(args) -> int:
    from fedzip.deploy.local import toml_value

    node_cfg = {"partition-id": args.partition_id, "num-partitions": args.num_partitions}
    if not args.worker:
        node_cfg["worker"] = False
    for key in ("data_root", "model_cache", "state_dir", "threads", "data_file", "worker_idle_s"):
        if getattr(args, key) is not None:
            node_cfg[key.replace("_", "-")] = getattr(args, key)
    cmd = ["flower-supernode", "--superlink", args.superlink, "--port", str(args.port),
           "--node-config", " ".join(f"{k}={toml_value(v)}" for k, v in node_cfg.items())]
    if args.insecure:
        cmd.append("--insecure")
    else:
        key = args.key or _credential(args.credentials, f"node{args.partition_id}.key", False)
        cmd += ["--root-certificates", _credential(args.credentials, "ca.crt", False),
                "--auth-supernode-private-key", str(Path(key).resolve())]
    return _exec_flower(cmd)


def cmd_deploy_app(args) -> int:
    from fedzip.deploy.local import APP_DIR

    print(APP_DIR)
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
    r.add_argument("--stop-after", type=int, metavar="ROUND", help="stop once round ROUND is checkpointed (a long "
                   "run split across sessions, or a phase studied on its own); --resume continues it")
    r.set_defaults(func=cmd_run)
    rep = sub.add_parser("report", help="compare run directories: table, plots, report.html")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--out", help="folder for plots and report.html")
    rep.add_argument("--reference", metavar="RUN_DIR", help="judge every run against this run's smoothed final "
                     "value minus 1 point: round, MB and link time to reach it")
    rep.add_argument("--links", metavar="LINKS", help="comma-separated link profiles for time columns: "
                     "3g, 4g, home, datacenter")
    rep.add_argument("--window", type=int, default=3, help="evaluations in the moving average (default 3)")
    rep.add_argument("--leaderboard", action="store_true", help="one row per label (run directory name without "
                     "-s<seed>), mean +- std over seeds, each seed judged against the reference's run of that seed")
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
    loc.add_argument("--tls", metavar="CREDENTIALS_DIR", help="use TLS and SuperNode authentication with "
                     "credentials from `fedzip deploy credentials` (default: insecure, for trying out)")
    loc.set_defaults(func=cmd_deploy_local)
    cr = dsub.add_parser("credentials", help="make a CA, the SuperLink's TLS certificate and SuperNode keys")
    cr.add_argument("--out", required=True, help="folder to write them to")
    cr.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to make")
    cr.add_argument("--host", action="append", default=[], help="the SuperLink's DNS name or IP (repeatable)")
    cr.add_argument("--force", action="store_true", help="replace credentials already in --out (a new CA: every "
                    "SuperNode and flwr user must get the new ca.crt)")
    cr.set_defaults(func=cmd_deploy_credentials)
    sl = dsub.add_parser("superlink", help="start a SuperLink (TLS + SuperNode authentication unless --insecure)")
    sl.add_argument("--credentials", help="folder from `fedzip deploy credentials`")
    sl.add_argument("--host", default="0.0.0.0")
    sl.add_argument("--port", type=int, default=9092)
    sl.add_argument("--database", default="superlink.db", help="state file (keeps runs across restarts)")
    sl.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (trying out only)")
    sl.set_defaults(func=cmd_deploy_superlink)
    sn = dsub.add_parser("supernode", help="start a SuperNode serving clients cid %% num-partitions == partition-id")
    sn.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    sn.add_argument("--partition-id", type=int, required=True)
    sn.add_argument("--num-partitions", type=int, required=True)
    sn.add_argument("--credentials", help="folder with ca.crt (and node<partition-id>.key unless --key)")
    sn.add_argument("--key", help="this SuperNode's private key")
    sn.add_argument("--port", type=int, default=9094, help="the SuperNode's local runtime port")
    sn.add_argument("--data-root", help="where this machine keeps the datasets")
    sn.add_argument("--model-cache", help="where this machine caches models")
    sn.add_argument("--state-dir", help="where client state lives between rounds")
    sn.add_argument("--threads", type=int, help="torch threads for local training")
    sn.add_argument("--data-file", help="this node's own training data (jsonl/csv/tsv/parquet), split among the "
                    "clients it hosts; the run must say deploy.client_data=on_nodes and list data.label_names")
    sn.add_argument("--worker-idle-s", type=float, help="the node worker (model and data kept loaded between "
                    "messages) exits after this many idle seconds (default 900)")
    sn.add_argument("--no-worker", dest="worker", action="store_false", help="load the model in every ClientApp "
                    "process instead of keeping it in a node worker (slower)")
    sn.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (trying out only)")
    sn.set_defaults(func=cmd_deploy_supernode)
    ap = dsub.add_parser("app", help="print the folder of fedzip's Flower App (for `flwr run`)")
    ap.set_defaults(func=cmd_deploy_app)
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
        if args.command == "deploy" and args.target != "app":
            from fedzip.errors import require

            require(("flwr", "cryptography"), "flower", "deploying on Flower")
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
