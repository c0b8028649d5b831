"""FedSA-LoRA (Guo et al., ICLR 2025): share LoRA's A, keep B on the client.

The paper finds that A learns what clients have in common and B what is their own. Per round t:
    server: send the global A_t (and the head when it is shared) to the sampled clients
    client k: (A, B_k, head_k) <- local training from (A_t, its own B_k, its own head); keep B_k (and head_k)
              reply A_k and n_k
    server: A_{t+1} = sum_k (n_k / sum_j n_j) A_k
A client's first round starts its B from LoRA's zero init (and the head from the shared seeded init). B never
leaves the client, so there is no one global model: each client's model is the global A with its own B, and a
run is judged by client models (the engine's personalised evaluation). The paper's GLUE code keeps the
classifier local too (``local_head``); sharing it is the switch.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedzip import privacy
from fedzip.methods.base import ClientContext, weighted_average
from fedzip.methods.fedit import FedIT
from fedzip.methods.training import round_train_config, train_locally
from fedzip.models.lora import is_lora, is_lora_a
from fedzip.registry import register_method
from fedzip.wire import Message


class FedSAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    local_head: bool = Field(True, description="keep the classification head on the client with B, as the paper's "
                                               "code does; false: average it with A")


@register_method(aliases=("fedsa",))
class FedSALoRA(FedIT):
    name = "fedsa_lora"
    Options = FedSAOptions
    personalised = True
    client_dp = local_dp = False  # what a client keeps shapes what it sends: not analysed, so not offered
    record_dp = True  # every tensor, kept or sent, is post-processing of the client's DP-SGD steps

    def __init__(self, cfg, runtime):
        super().__init__(cfg, runtime)
        names = runtime.view.names()
        self.shared = [n for n in names if is_lora_a(n) or (not is_lora(n) and not self.opts.local_head)]
        self.local = [n for n in names if n not in self.shared]
        self.initial_local = runtime.view.get(self.local)  # B's zero init and the seeded head: the same everywhere

    def describe(self) -> dict:
        shapes = self.rt.view.shapes()
        count = lambda names: sum(int(torch.Size(shapes[n]).numel()) for n in names)  # noqa: E731
        return {"shared_values": count(self.shared), "local_values": count(self.local), "local_head": self.opts.local_head}

    # -- server ------------------------------------------------------------------------------------
    def configure(self, rnd: int, cids: list[int]) -> dict[int, Message]:
        msg = Message(tensors={n: self.global_[n] for n in self.shared}, meta={"round": rnd})
        return {cid: msg for cid in cids}

    def down_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        return self.rt.view.shapes(self.shared)

    def up_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        return self.rt.view.shapes(self.shared)

    def aggregate(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        self.global_ = self.global_ | weighted_average(replies, self.shared)
        return {}

    # -- client ------------------------------------------------------------------------------------
    def own_tensors(self, cid: int, store) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """What client ``cid`` keeps: its B (and head), or their initial values before its first round; and its
        optimizer state."""
        stored = store.load(cid)
        own = {n: stored.get(f"own::{n}", self.initial_local[n]) for n in self.local}
        return own, {k[5:]: v for k, v in stored.items() if k.startswith("opt::")}

    def fit(self, client: ClientContext, message: Message) -> Message:
        view = self.rt.view
        own, opt_state = self.own_tensors(client.cid, client.store)
        view.set(message.tensors | own)
        persist = self.cfg.train.persist_optimizer_state
        steps, loss, opt_state = train_locally(
            self.rt.model, view.params, self.rt.task, client.indices, round_train_config(self.cfg, client.round),
            client.seed, opt_state=opt_state if persist else None, progress=self.rt.step_progress,
            records=privacy.records(self.cfg, client))
        trained = view.get()
        client.store.save(client.cid, client.round, {f"own::{n}": trained[n] for n in self.local} |
                          ({f"opt::{k}": v for k, v in opt_state.items()} if persist else {}))
        return Message(tensors={n: trained[n] for n in self.shared},
                       meta={"num_examples": client.num_examples, "steps": steps, "train_loss": loss,
                             **privacy.record_meta(self.cfg, client.num_examples, steps, client.round)})

    def personal_spec(self) -> dict[str, tuple[int, ...]]:
        return self.rt.view.shapes(self.shared)  # B (and the head) are the client's own: they never travel

    def personal_tensors(self, cid: int, store, global_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        own, _ = self.own_tensors(cid, store)
        return {n: global_tensors[n] for n in self.shared} | own
