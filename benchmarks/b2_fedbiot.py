"""B2 FedBiOT vs FedOT, offsite-tuning and FedIT on the full model (SmolLM2-135M-Instruct, GSM8K, 3 iid clients).

Each method runs as an ordinary ``fedzip run`` of ``configs/b2_fedbiot.yaml``. A client is then profiled
in a process of its own, as a deployed client would run: it builds only what the method gives it (the
compressed model for the FedBiOT family, the full model for FedIT), decodes the method's real first
message, trains, and reports its peak RSS and seconds per local step. Writes ``results/b2_fedbiot.json``,
``results/b2_fedbiot.md`` and ``results/b2_fedbiot_<profile>.png``.

    python benchmarks/b2_fedbiot.py --profile smoke|full
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, collect, merge_results, profile_sections, run_profile  # noqa: E402

PROFILES = {
    "smoke": ["rounds=2", "train.max_steps=2", "data.max_test_examples=16", "eval.max_examples=8",
              "eval.exact_match_examples=4", "eval.max_new_tokens=48",
              "method_options={adapter_layers: 2, drop: 0.5, prealign_steps: 2, align_steps: 1, align_batch: 2, "
              "public_max_examples: 32}"],
    "full": [],
}
RUNS = [
    ("fedbiot", ["method=fedbiot"]),
    ("fedot", ["method=fedot", "method_options={drop: 0.5}"]),
    ("offsite_tuning", ["method=offsite_tuning", "method_options={drop: 0.5}"]),
    ("fedit_full_model", ["method=fedit", "method_options={}"]),
]


def one_time_bytes(run_dir: Path) -> int:
    """Bytes of the compressed model inside first messages: their size minus a plain message's that round."""
    ledger = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    plain = {e["round"]: e["bytes"] for e in ledger if e["direction"] == "down" and e["kind"] == "update"}
    any_plain = min(plain.values()) if plain else 0
    return sum(e["bytes"] - plain.get(e["round"], any_plain) for e in ledger
               if e["direction"] == "down" and e["kind"] == "update+compressed_model")


def profile_client(config: str, overrides: list[str], workdir: Path) -> dict:
    """Run one client in a fresh process (see ``client_main``) and return what it measured."""
    out = workdir / "client_profile.json"
    for f in workdir.glob("client_profile*"):
        f.unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--client", config, str(out), *overrides]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT.parent)  # the server side writes the first message
    subprocess.run(cmd, check=True, env=env, cwd=ROOT.parent)  # the client alone, measured
    return json.loads(out.read_text())


def client_main(config: str, out: str, overrides: list[str]) -> None:
    """In its own process: the server side writes a real first message to disk and exits; then the client."""
    import resource

    from fedzip.config import load_config
    from fedzip.engine.runtime import build_runtime
    from fedzip.engine.state import ClientStateStore
    from fedzip.methods import METHODS, ClientContext
    from fedzip.wire import decode, encode

    cfg = load_config(config, overrides + ["train.threads=1"])
    cls = METHODS[cfg.method]
    cfg = cls.adjust_config(cfg)
    msg_path = Path(out).with_suffix(".msg")
    if not msg_path.exists():  # phase 1 (a child of its own): the server's first message to client 0
        server = cls(cfg, build_runtime(cfg, cls))
        server.init_global()
        msg_path.write_bytes(encode(server.configure(1, [0])[0], server.wire_codec("down")))
        return
    client = cls(cfg, build_runtime(cfg, cls, with_model=not cls.client_builds_model))
    steps = []
    client.rt.step_progress = lambda done, total: steps.append(time.perf_counter())
    received = decode(msg_path.read_bytes(), client.down_spec(0, 1), require_all=False)
    ctx = ClientContext(cid=0, round=1, indices=client.rt.parts[0], store=ClientStateStore(Path(out).parent / "store"),
                        seed=0)
    t0 = time.perf_counter()
    client.fit(ctx, received)
    times = [b - a for a, b in zip([t0] + steps[:-1], steps)]
    Path(out).write_text(json.dumps({
        "client_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "client_step_seconds": sum(times[1:]) / max(len(times) - 1, 1),  # the first step warms up
        "client_steps": len(times)}))


def main() -> None:
    profile, runs, dirs = run_profile("b2_fedbiot", "b2_fedbiot", PROFILES, lambda _: RUNS)
    results = []
    for label, config, overrides, *_ in runs:
        r = collect(dirs[label], profile, label)
        work = dirs[label].parent / f"{label}.client"
        work.mkdir(exist_ok=True)
        for f in work.glob("client_profile*"):
            f.unlink()
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--client", config, str(work / "client_profile.json"),
               *overrides]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT.parent)  # phase 1: the message
        r |= profile_client(config, overrides, work)  # phase 2: the client alone
        r["bytes_one_time"] = one_time_bytes(dirs[label])
        results.append(r)
    data = merge_results(RESULTS / "b2_fedbiot.json", results)
    write_outputs(data)


def write_outputs(data: dict) -> None:
    lines = ["# B2: FedBiOT vs FedOT, offsite-tuning, FedIT full model (SmolLM2-135M-Instruct, GSM8K, 3 iid clients)", "",
             "AdapFu = the adapter plugged into the full model (the run's main metrics); AdapEmu = the adapter on the",
             "emulator (`emu_*`). Client RSS and step time come from one client run alone in a fresh process.", ""]
    columns = ["run", "AdapFu loss", "AdapEmu loss", "AdapFu EM", "AdapEmu EM", "client peak RSS MB",
               "client s/step", "MB up", "MB down (per round)", "MB one-time"]
    for _profile, runs, header in profile_sections(data["runs"], columns):
        lines += header
        fedit = next((r for r in runs if r["label"] == "fedit_full_model"), None)
        for r in runs:
            fm = r["final_metrics"]
            get = lambda k: f"{fm[k]:.4f}" if k in fm else "-"  # noqa: E731
            rounds = max(r["rounds"], 1)
            per_round = (r["bytes_down_total"] - r["bytes_one_time"]) / rounds / 1e6
            lines.append(f"| {r['label']} | {get('loss')} | {get('emu_loss')} | {get('exact_match')} | "
                         f"{get('emu_exact_match')} | {r['client_peak_rss_bytes'] / 1e6:.0f} | "
                         f"{r['client_step_seconds']:.3f} | {r['bytes_up_total'] / 1e6:.2f} | {per_round:.2f} | "
                         f"{r['bytes_one_time'] / 1e6:.1f} |")
        if fedit:
            lines.append("")
            for r in runs:
                if r is not fedit:
                    rss = r["client_peak_rss_bytes"] / fedit["client_peak_rss_bytes"]
                    lines.append(f"- {r['label']}: client RSS {rss:.2f}x "
                                 f"and step time {r['client_step_seconds'] / fedit['client_step_seconds']:.2f}x FedIT's "
                                 "full-model client.")
        lines.append("")
    (RESULTS / "b2_fedbiot.md").write_text("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
