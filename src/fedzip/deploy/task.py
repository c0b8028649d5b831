"""What the Flower ServerApp and ClientApp share: the experiment config and the message layout.

A ``train`` message carries one ConfigRecord per logical client of the node it goes to, named
``fedzip.<cid>``: ``payload`` (the fedzip payload bytes that the ledger counts), ``cid`` and ``round``; the reply has one
per client too, with the reply's ``payload`` and the client's ``client_s``, or an ``error``. ``query``
messages use one record named ``fedzip``. Nothing in them is pickled.
"""

from __future__ import annotations

from fedzip.config import ExperimentConfig, load_config
from fedzip.errors import ConfigError

RECORD = "fedzip"


def client_record(cid: int) -> str:
    return f"{RECORD}.{cid}"


def split_overrides(text: str) -> list[str]:
    return [x.strip() for x in str(text or "").split(";") if x.strip()]


def experiment_config(run_config, node_config=None) -> ExperimentConfig:
    """The run's config (from ``flwr run``'s run config), with a SuperNode's local settings applied."""
    overrides = split_overrides(run_config.get("overrides", ""))
    node_config = node_config or {}
    for node_key, cfg_key in (("data-root", "data.root"), ("model-cache", "model.cache_dir"),
                              ("threads", "train.threads")):
        if node_config.get(node_key) not in (None, ""):
            overrides.append(f"{cfg_key}={node_config[node_key]}")
    return load_config(str(run_config.get("config") or "") or None, overrides)


def hosted_clients(node_config, num_clients: int) -> list[int]:
    """The logical clients a SuperNode serves: ``cid % num-partitions == partition-id``."""
    try:
        part = int(node_config.get("partition-id", 0))
        parts = int(node_config.get("num-partitions", 1))
    except (TypeError, ValueError):
        raise ConfigError("node config: partition-id and num-partitions must be integers") from None
    if parts < 1 or not 0 <= part < parts:
        raise ConfigError(f"node config: partition-id {part} must be in [0, num-partitions={parts})")
    return [c for c in range(num_clients) if c % parts == part]
