"""Federated methods. Each registers itself under its name (``fedzip.registry``); configs choose one with ``method:``."""

from fedzip.methods.base import ClientContext, Method
from fedzip.methods.cgfedllm import CgFedLLM
from fedzip.methods.fedbiot import FedBiOT, FedOT, OffsiteTuning
from fedzip.methods.fedit import Centralised, FedIT, FFALoRA, FullFedAvg
from fedzip.methods.fedkseed import FedKSeed
from fedzip.methods.fedsa import FedSALoRA
from fedzip.methods.fedsb import FedSB
from fedzip.methods.flasc import Flasc
from fedzip.methods.hafl import FlexLoRA, Hafl, HaflTruncate, HetLoRA
from fedzip.registry import METHODS, method_class, register_method

__all__ = [
    "METHODS", "CgFedLLM", "Centralised", "ClientContext", "FFALoRA", "FedBiOT", "FedIT", "FedKSeed", "FedOT",
    "FedSALoRA", "FedSB", "Flasc", "FlexLoRA", "FullFedAvg", "Hafl", "HaflTruncate", "HetLoRA", "Method",
    "OffsiteTuning", "method_class", "register_method",
]
