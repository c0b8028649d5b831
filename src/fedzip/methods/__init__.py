"""Federated methods. Each registers under its name; configs choose one with ``method:``."""

from fedzip.methods.base import ClientContext, Method
from fedzip.methods.cgfedllm import CgFedLLM
from fedzip.methods.fedbiot import FedBiOT, FedOT, OffsiteTuning
from fedzip.methods.fedit import Centralised, FedIT, FFALoRA, FullFedAvg
from fedzip.methods.flasc import Flasc
from fedzip.methods.hafl import Hafl

METHODS: dict[str, type[Method]] = {m.name: m for m in (FedIT, FFALoRA, FullFedAvg, Centralised, Flasc)}
METHODS["centralized"] = Centralised
METHODS["flasc"] = Flasc
METHODS["hafl"] = Hafl
METHODS["cgfedllm"] = CgFedLLM
for _m in (FedBiOT, FedOT, OffsiteTuning):
    METHODS[_m.name] = _m


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


__all__ = ["METHODS", "ClientContext", "Method", "register_method"]
