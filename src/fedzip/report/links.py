"""From bytes to wall time: what a run would take over a given network link.

A round lasts as long as its slowest sampled client (it waits for the download, trains, then uploads;
each message pays half a round trip of latency) plus the server's own work (encoding, decoding,
aggregation). Message sizes come from the ledger, exactly; client compute from each client's measured
``client_compute_s`` (in-process runs), else the round's compute shared evenly among its clients.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    name: str
    up_mbit_s: float
    down_mbit_s: float
    rtt_ms: float

    def message_seconds(self, nbytes: int, direction: str) -> float:
        rate = self.up_mbit_s if direction == "up" else self.down_mbit_s
        return self.rtt_ms / 2000 + nbytes * 8 / (rate * 1e6)


# Typical links a federated client sits behind (upload is the scarce direction on all but a datacenter).
LINKS = {link.name: link for link in (
    Link("3g", up_mbit_s=1, down_mbit_s=5, rtt_ms=150),
    Link("4g", up_mbit_s=5, down_mbit_s=25, rtt_ms=60),
    Link("home", up_mbit_s=20, down_mbit_s=100, rtt_ms=20),
    Link("datacenter", up_mbit_s=1000, down_mbit_s=1000, rtt_ms=1),
)}


def client_compute(row: dict) -> dict[int, float]:
    """Each sampled client's local compute in a metrics row."""
    measured = row.get("client_compute_s")
    if measured:
        return {int(cid): float(s) for cid, s in measured.items()}
    clients = row.get("clients") or []
    share = float(row.get("compute_s", 0.0)) / max(len(clients), 1)
    return {int(cid): share for cid in clients}


def round_seconds(row: dict, ledger_rows: list[dict], link: Link) -> float:
    """Wall time of one round over ``link``: the slowest client's download + compute + upload, plus the server."""
    compute = client_compute(row)
    per_client: dict[int, float] = {}
    for entry in ledger_rows:
        if entry.get("status"):  # a message that never arrived does not hold the round up to its size
            continue
        if entry.get("kind") == "eval":  # personalised evaluation: after the round, not part of training's time
            continue
        cid = int(entry["client"])
        per_client[cid] = per_client.get(cid, compute.get(cid, 0.0)) + link.message_seconds(entry["bytes"],
                                                                                              entry["direction"])
    server = sum(float(row.get(k, 0.0)) for k in ("encode_s", "decode_s", "aggregate_s"))
    return max(per_client.values(), default=0.0) + server


def cumulative_seconds(rows: list[dict], ledger: list[dict], link: Link) -> dict[int, float]:
    """Round -> wall time over ``link`` from the start of the run to the end of that round."""
    by_round: dict[int, list[dict]] = {}
    for entry in ledger:
        by_round.setdefault(int(entry["round"]), []).append(entry)
    total, out = 0.0, {}
    for row in sorted(rows, key=lambda r: r["round"]):
        total += round_seconds(row, by_round.get(row["round"], []), link)
        out[row["round"]] = total
    return out
