"""FedIT and its family: LoRA FedAvg, FFA-LoRA, full fine-tuning FedAvg, centralised.

FedIT (ALGORITHMS.md section 1), per round t:
    server: send the global trainable tensors theta_t (LoRA A, B and the head) to the sampled clients
    client k: theta_k <- local training from theta_t on its data; reply theta_k and n_k
    server: theta_{t+1} = sum_k (n_k / sum_j n_j) * theta_k
The variants change only which tensors are trainable and exchanged, or how many clients there are.

With client-level DP (``privacy.mode``, fedzip.privacy) the update theta_k - theta_t is clipped on the client
and sent as theta_t + its clipped update; the server averages the updates with ``private_mean`` (clipped
again, noised, a fixed denominator) instead of weighting by n_k.

``upload: update`` (method_options) sends theta_k - theta_t itself, and the server steps its own exact
theta_t by their weighted mean: the same average, but a lossy uplink codec then rounds the small change
rather than the whole state. With whole states each round's rounding stays in theta_{t+1} and adds up over
the rounds (a random walk several quantiser steps wide after a hundred rounds); with updates the server's
state carries only the rounding of the updates, and the downlink's rounding only moves where clients start.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedzip import privacy
from fedzip.methods.base import ClientContext, Method, one_client, reply_weight, weighted_average
from fedzip.methods.state import ServerState
from fedzip.methods.training import round_train_config, train_locally
from fedzip.models.lora import canonical, is_lora_a
from fedzip.registry import register_method
from fedzip.wire import Message


class FedITOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    upload: Literal["model", "update"] = Field(
        "model", description="what a client sends: its trained tensors (model, the papers' FedAvg) or their change "
                             "from the round's global ones (update: the same mean, and a lossy uplink codec rounds "
                             "only the change while the server's state stays exact)")


@register_method
class FedIT(Method):
    name = "fedit"
    Options = FedITOptions
    runs_on_accelerator = True
    client_dp = local_dp = record_dp = True

    def init_global(self) -> None:
        self.global_ = self.rt.view.get()
        self.clip_bound = privacy.ClipBound(self.cfg)  # read only under DP

    def server_state(self) -> ServerState:
        return ServerState({"global": dict(self.global_)}, self.clip_bound.facts())

    def load_server_state(self, state: ServerState) -> None:
        self.global_ = {n: state.group("global")[n].clone() for n in self.rt.view.names()}
        self.clip_bound.load(state.facts)

    def global_tensors(self) -> dict[str, torch.Tensor]:
        return self.global_

    def down_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        return self.rt.view.shapes()

    def up_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        return self.rt.view.shapes()

    def configure(self, rnd: int, cids: list[int]) -> dict[int, Message]:
        msg = Message(tensors=self.global_, meta={"round": rnd, **self.clip_bound.meta()})
        return {cid: msg for cid in cids}  # one object: the engine encodes it once, counts it per client

    def fit(self, client: ClientContext, message: Message) -> Message:
        view = self.rt.view
        view.set(message.tensors)
        steps, loss, opt_state = train_locally(
            self.rt.model, view.params, self.rt.task, client.indices, round_train_config(self.cfg, client.round), client.seed,
            opt_state=client.store.load(client.cid) if self.cfg.train.persist_optimizer_state else None,
            progress=self.rt.step_progress, records=privacy.records(self.cfg, client))
        if self.cfg.train.persist_optimizer_state:
            client.store.save(client.cid, client.round, opt_state)
        trained = view.get()
        if privacy.enabled(self.cfg):  # what leaves is the received model plus a clipped (and noised) update
            start = message.tensors
            update, dp_meta = privacy.private_update(self.cfg, {n: trained[n] - start[n] for n in trained},
                                                     client, message.meta)
            trained = update if self.opts.upload == "update" else {n: start[n] + update[n] for n in trained}
        else:
            dp_meta = {}
            if self.opts.upload == "update":
                trained = {n: trained[n] - message.tensors[n] for n in trained}
        return Message(tensors=trained, meta={"num_examples": client.num_examples, "steps": steps, "train_loss": loss,
                                              **dp_meta, **privacy.record_meta(self.cfg, client.num_examples, steps,
                                                                                client.round)})

    def aggregate(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        names = self.rt.view.names()
        sent_updates = self.opts.upload == "update"
        if not privacy.enabled(self.cfg):
            mean = weighted_average(replies, names)
            self.global_ = {n: self.global_[n] + mean[n] for n in names} if sent_updates else mean
            return {}
        for r in replies.values():
            reply_weight(r)  # validated as without DP, though DP weighs every client alike
        updates = [{n: r.tensors[n] if sent_updates else r.tensors[n] - self.global_[n] for n in names}
                   for r in replies.values()]
        mean, stats = privacy.private_mean(self.cfg, updates, self.global_, rnd, self.rt.randomness, self.clip_bound,
                                           [r.meta for r in replies.values()])
        self.global_ = {n: self.global_[n] + mean[n] for n in names}
        return stats


@register_method
class FFALoRA(FedIT):
    """FFA-LoRA: A stays at its (seeded, shared) random init; only B and the head train and travel."""

    name = "ffa_lora"

    @classmethod
    def prepare_model(cls, model, cfg) -> None:
        for n, p in model.named_parameters():
            if is_lora_a(canonical(n)):
                p.requires_grad_(False)


@register_method
class FullFedAvg(FedIT):
    """FedAvg over every weight of the model (no LoRA)."""

    name = "full_ft"
    uses_lora = False

    @classmethod
    def prepare_model(cls, model, cfg) -> None:
        for p in model.parameters():
            p.requires_grad_(True)


@register_method(aliases=("centralized",))
class Centralised(FedIT):
    """The reference: all training data on one client, which trains every round."""

    name = "centralised"
    client_dp = local_dp = False  # one client holding all the data: client-level DP protects no one
    record_dp = True  # record-level DP-SGD is what protects it

    @classmethod
    def adjust_config(cls, cfg):
        return one_client(cfg)
