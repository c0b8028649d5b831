"""Engines: the in-process simulation (and, later, Flower), the ledger, client state, checkpoints."""

from fedzip.engine.simulation import run_experiment

__all__ = ["run_experiment"]
