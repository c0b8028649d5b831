"""Fed-SB (Singhal et al., 2025): federated LoRA-SB, ``W + B R A`` with only the r x r matrix R trained and sent.

LoRA-SB fixes A and B after its initialisation and trains the small matrix R between them. Every client
shares the same A and B, so averaging R is exact: B (sum_k w_k R_k) A = sum_k w_k (B R_k A), which FedAvg of
(A, B) pairs is not. Per round t:
    server: send R_t (every adapted module) and the head; A and B once, to a client that has not got them
    client k: R_k <- local training from R_t with A and B frozen; reply R_k and n_k
    server: R_{t+1} = sum_k (n_k / sum_j n_j) R_k      (FedIT's step on R: exact on the products)

Initialisation (``init``), from the paper's code:
- ``gradient`` (the paper's): round 1 estimates the first full fine-tuning update of every adapted weight and
  trains nothing. Its clients send the summed gradient of each adapted weight over ``init_examples`` of their
  examples; the server takes Delta = -init_step * sign(mean gradient) (Adam's first step) and its truncated SVD
  Delta ~ U S V^T, and sets B = U_r, A = V_r^T, R = S_r / scaling, so that the model starts one step along
  full fine-tuning and R trains in the subspace that step spans. The paper estimates the gradient on pooled
  data before federation; here the first cohort sends it, and those bytes (a dense weight-sized gradient per
  adapted module and client, once) and the basis each client downloads once are in the ledger.
- ``random``: A as peft initialises it, B a seeded Gaussian, R = 0: no data, no extra bytes; both sides build the
  same basis from the seed, as every method's LoRA A is built.

R is a parametrisation of LoRA's A (A's weight reads R @ A0), so peft's forward, merge and save see an ordinary
LoRA pair (B, R A0); the exported adapter is a plain peft LoRA adapter.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from fedzip.data.task import model_device, to_device
from fedzip.errors import ConfigError, PayloadError
from fedzip.methods.base import ClientContext, OneTimePayload, reply_weight
from fedzip.methods.fedit import FedIT, FedITOptions
from fedzip.methods.state import ServerState
from fedzip.models.lora import canonical
from fedzip.registry import register_method
from fedzip.wire import Message

R_SUFFIX = ".lora_A.parametrizations.weight.0.R"  # canonical name of a module's R in the trainable view
A_SUFFIX, B_SUFFIX, GRAD_SUFFIX = ".lora_A.weight", ".lora_B.weight", ".weight_grad"


class FedSBOptions(FedITOptions):  # and FedIT's ``upload``: R itself (the paper) or its change
    init: Literal["gradient", "random"] = Field(
        "gradient", description="gradient: LoRA-SB's initialisation from the first cohort's gradients (round 1 "
                                "trains nothing); random: a seeded basis and R = 0")
    init_examples: int = Field(64, ge=1, description="examples each client of the first cohort computes gradients on")
    init_step: float = Field(1e-4, gt=0, description="size of the sign step the initial B R A imitates")


class LatentR(nn.Module):
    """A's parametrisation: the weight LoRA's forward reads is R @ A0, with R trainable and A0 frozen."""

    def __init__(self, rank: int):
        super().__init__()
        self.R = nn.Parameter(torch.zeros(rank, rank))

    def forward(self, a0: torch.Tensor) -> torch.Tensor:
        return self.R @ a0


def latent_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Canonical module name -> peft LoRA layer, for every adapted linear layer (in the model's order)."""
    return {canonical(name): m for name, m in model.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "base_layer") and "default" in getattr(m, "lora_A", {})}


def _a_module(layer) -> nn.Linear:
    return layer.lora_A["default"]


def _b_module(layer) -> nn.Linear:
    return layer.lora_B["default"]


def get_basis(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in latent_layers(model).items():
        out[name + A_SUFFIX] = _a_module(layer).parametrizations.weight.original.detach().to("cpu", copy=True)
        out[name + B_SUFFIX] = _b_module(layer).weight.detach().to("cpu", copy=True)
    return out


def set_basis(model, basis: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, layer in latent_layers(model).items():
            _a_module(layer).parametrizations.weight.original.copy_(basis[name + A_SUFFIX])
            _b_module(layer).weight.copy_(basis[name + B_SUFFIX])


def basis_shapes(model) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, layer in latent_layers(model).items():
        out[name + A_SUFFIX] = tuple(_a_module(layer).parametrizations.weight.original.shape)
        out[name + B_SUFFIX] = tuple(_b_module(layer).weight.shape)
    return out


def lora_scaling(layer) -> float:
    return float(layer.scaling["default"])


def basis_from_update(update: torch.Tensor, rank: int, scaling: float):
    """LoRA-SB's factorisation of an update Delta (out x in): B = U_r, A = V_r^T, R = S_r / scaling."""
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
    r = min(rank, s.numel())
    a0 = torch.zeros(rank, update.shape[1], dtype=torch.float64)
    b0 = torch.zeros(update.shape[0], rank, dtype=torch.float64)
    a0[:r], b0[:, :r] = vh[:r], u[:, :r]
    latent = torch.zeros(rank, rank, dtype=torch.float64)
    latent[:r, :r] = torch.diag(s[:r]) / scaling
    return a0.float(), b0.float(), latent.float()


@register_method(aliases=("fed_sb",))
class FedSB(FedIT):
    name = "fedsb"
    Options = FedSBOptions
    record_dp = False  # Opacus computes no per-example gradients through a parametrised weight

    @classmethod
    def adjust_config(cls, cfg):
        opts = FedSBOptions.model_validate(cfg.method_options)
        if opts.init == "gradient" and cfg.privacy.mode != "off":
            raise ConfigError("method fedsb: init: gradient sends raw gradients in round 1, which client-level DP "
                              "does not cover; use method_options.init: random under privacy")
        return cfg

    @classmethod
    def prepare_model(cls, model, cfg) -> None:
        layers = latent_layers(model)
        if not layers:
            raise ConfigError("method fedsb needs LoRA layers (lora.target_modules)")
        basis_rng = torch.Generator().manual_seed(cfg.seed + 1)  # B's seeded init: the same on every side
        for layer in layers.values():
            a, b = _a_module(layer), _b_module(layer)
            rank = a.weight.shape[0]
            with torch.no_grad():
                b.weight.copy_(torch.randn(b.weight.shape, generator=basis_rng) / rank ** 0.5)
            parametrize.register_parametrization(a, "weight", LatentR(rank))
            a.parametrizations.weight.original.requires_grad_(False)
            b.weight.requires_grad_(False)

    @classmethod
    def before_export(cls, model) -> None:
        """Bake R into A (A := R A0): what is saved is a plain peft LoRA adapter (B, R A0)."""
        for layer in latent_layers(model).values():
            parametrize.remove_parametrizations(_a_module(layer), "weight", leave_parametrized=True)

    def describe(self) -> dict:
        layers = latent_layers(self.rt.model)
        return {"init": self.opts.init, "adapted_modules": len(layers),
                "latent_values": sum(p.numel() for n, p in self.rt.view.params.items() if n.endswith(R_SUFFIX))}

    # -- server ------------------------------------------------------------------------------------
    def init_global(self) -> None:
        super().init_global()
        self.basis_ready = self.opts.init == "random"  # a random basis is built from the seed on every side
        self.has_basis = OneTimePayload()

    def gradient_round(self, rnd: int) -> bool:
        return self.opts.init == "gradient" and rnd == 1

    def server_state(self) -> ServerState:
        state = super().server_state()
        state.facts |= {"basis_ready": self.basis_ready, "has_basis": self.has_basis.fact()}
        if self.basis_ready and self.opts.init == "gradient":
            state.tensors["basis"] = get_basis(self.rt.model)
        return state

    def load_server_state(self, state: ServerState) -> None:
        super().load_server_state(state)
        self.basis_ready = bool(state.facts["basis_ready"])
        self.has_basis = OneTimePayload(state.facts["has_basis"])
        if state.group("basis"):
            set_basis(self.rt.model, state.group("basis"))

    def configure(self, rnd: int, cids: list[int]) -> dict[int, Message]:
        plain = Message(tensors=self.global_, meta={"round": rnd, "phase": "init" if self.gradient_round(rnd) else
                                                    "train", **self.clip_bound.meta()})
        if self.opts.init == "random" or self.gradient_round(rnd):
            return {cid: plain for cid in cids}
        # the basis goes once to each client, counted then
        return self.has_basis.messages(cids, plain, lambda: Message(self.global_ | get_basis(self.rt.model), plain.meta))

    def up_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        if self.gradient_round(rnd):
            return {name + GRAD_SUFFIX: tuple(layer.base_layer.weight.shape)
                    for name, layer in latent_layers(self.rt.model).items()}
        return super().up_spec(cid, rnd)

    def down_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        return super().down_spec(cid, rnd) | (basis_shapes(self.rt.model) if self.opts.init == "gradient" else {})

    def down_optional(self, cid: int, rnd: int) -> set[str]:
        return set(basis_shapes(self.rt.model)) if self.opts.init == "gradient" else set()

    def aggregate(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        if not self.gradient_round(rnd):
            metrics = super().aggregate(rnd, replies)  # validates every reply before anything changes
            # a client holds the basis once it has replied: one whose message or reply was lost gets it again
            self.has_basis.replied(replies)
            return metrics
        examples = sum(reply_weight(r) for r in replies.values())
        latent = {}
        basis = {}
        for name, layer in latent_layers(self.rt.model).items():
            grad = sum(r.tensors[name + GRAD_SUFFIX].double() for r in replies.values()) / examples
            update = -self.opts.init_step * torch.sign(grad)
            a0, b0, latent[name + R_SUFFIX] = basis_from_update(update, _a_module(layer).weight.shape[0],
                                                                lora_scaling(layer))
            basis[name + A_SUFFIX], basis[name + B_SUFFIX] = a0, b0
        set_basis(self.rt.model, basis)
        self.global_ = self.global_ | latent
        self.basis_ready = True
        return {"init_examples": float(examples)}

    # -- client ------------------------------------------------------------------------------------
    def fit(self, client: ClientContext, message: Message) -> Message:
        if message.meta.get("phase") == "init":
            self.rt.view.set(message.tensors)  # the global head; R is still zero
            return self._init_gradients(client)
        if self.opts.init == "random":
            return super().fit(client, message)
        basis = self._receive_basis(client, message)
        reply = super().fit(client, Message({n: t for n, t in message.tensors.items() if n in self.rt.view.params},
                                            message.meta))
        # keep the basis beside whatever this round stored (FedIT's optimizer state replaces the latest version)
        kept = {k: v for k, v in client.store.load(client.cid).items() if not k.startswith("basis::")}
        client.store.save(client.cid, client.round, kept | {f"basis::{n}": t for n, t in basis.items()})
        return reply

    def _receive_basis(self, client: ClientContext, message: Message) -> dict[str, torch.Tensor]:
        """The basis the message brings (a client's first training round) or the one the client kept; set on
        the model."""
        names = set(basis_shapes(self.rt.model))
        basis = {n: t for n, t in message.tensors.items() if n in names}
        if basis and set(basis) != names:
            raise PayloadError("fedsb: a message with part of the basis")
        if not basis:
            stored = client.store.load(client.cid)
            basis = {n[7:]: t for n, t in stored.items() if n.startswith("basis::")}
            if set(basis) != names:
                raise PayloadError(f"fedsb: client {client.cid} holds no basis and the message brought none")
        set_basis(self.rt.model, basis)
        return basis

    def _init_gradients(self, client: ClientContext) -> Message:
        """The sum over ``init_examples`` of this client's examples of each adapted weight's loss gradient."""
        model, task = self.rt.model, self.rt.task
        layers = latent_layers(model)
        rng = np.random.default_rng(client.seed)
        chosen = client.indices if len(client.indices) <= self.opts.init_examples else \
            rng.choice(client.indices, self.opts.init_examples, replace=False)
        weights = [layer.base_layer.weight for layer in layers.values()]
        sums = [torch.zeros_like(w) for w in weights]
        model.train()
        torch.manual_seed(client.seed)  # dropout
        device = model_device(model)
        try:
            for w in weights:
                w.requires_grad_(True)
            batch_size = self.cfg.train.batch_size
            for start in range(0, len(chosen), batch_size):
                part = chosen[start:start + batch_size]
                out = model(**to_device(task.collate(task.train, part), device))
                model.zero_grad(set_to_none=True)
                (out.loss * len(part)).backward()  # the batch's summed per-example gradient
                for s, w in zip(sums, weights):
                    s += w.grad
        finally:
            for w in weights:
                w.requires_grad_(False)
                w.grad = None
            model.zero_grad(set_to_none=True)
        return Message(tensors={name + GRAD_SUFFIX: s.detach().cpu() for name, s in zip(layers, sums)},
                       meta={"num_examples": int(len(chosen)), "steps": 0})
