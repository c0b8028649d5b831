"""Engines: the round engine with its in-process exchange (Flower's is in fedzip.deploy), the ledger, client state."""

from fedzip.engine.rounds import run_experiment

__all__ = ["run_experiment"]
