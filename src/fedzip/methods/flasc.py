"""FLASC (Kuo et al., arXiv 2406.05233), shipped as CELLM: LoRA with sparse communication both ways.

ALGORITHMS.md section 2. Per round t, with P trainable entries (LoRA A, B and the head):
    server: d_dl(t) = d_dl * gamma^((t-1) // every);  M = top-k |theta_s| with k = ceil(d_dl(t) * P),
            one global threshold over all tensors;  send theta_s * M           (sparse, positions counted)
    client: theta_c <- dense local training from theta_s * M      (client_freeze: only entries in M move)
            delta = theta_c - theta_s * M  (+ residual, with error feedback)
            send the top ceil(d_ul(t) * P) entries of delta by magnitude       (sparse, positions counted)
    server: theta_s.grad = -mean_k delta_k;  server optimiser step (AdamW by default; SGD lr 1 = FedAvg)
Baselines from the same paper are switches: ``client_freeze`` (sparse fine-tuning), ``server_freeze``
(mask fixed after round 1), ``freeze_a``; lower-rank LoRA is just ``lora.rank``.

Evaluated and exported (``eval_masked``, as in the paper's code): theta_s * M, the model clients receive.
The dense theta_s is never trained as a whole (clients start from its top-k entries), and in B1 it drifts
away from the sparse model over 200 rounds.

Sparse fine-tuning inherits a property of the paper's own code: LoRA B starts at zero, so it never enters
the magnitude mask while the density is below the share of nonzero entries (A and the head), and stays
zero. A's gradient is zero while B is zero, so when the mask holds only A entries (B1 at 1/16: the head's
small init keeps it out too) nothing trains at all. The client reads the mask from the nonzero entries it
received, which is the server's mask whenever the kept entries are all nonzero.

Two download masks, both from the paper's code: by default one top-k over every trainable entry (its main
code path); with ``dense_head_download`` a top-k over the LoRA entries only while the head goes whole (its
heterogeneous-client code). On a small model the head's share decides a lot: MiniLM with LoRA on q/k/v has
3.4% of its P in the head, and at 1/16 the shared mask keeps 23-53% of the head, ~10% of A and ~0% of B.
The upload mask is always one top-k over all entries, as in both code paths.

The mask is global, so messages carry all trainable tensors flattened into one vector (in the trainable
view's order): one position stream over all P entries, and a header of a few dozen bytes instead of one
entry per tensor.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedzip import privacy
from fedzip.methods.base import ClientContext, Method, reply_weight
from fedzip.methods.state import ServerState
from fedzip.methods.training import load_optimizer_state, optimizer_state_to_tensors, round_train_config, train_locally
from fedzip.models.lora import canonical, is_lora, is_lora_a
from fedzip.registry import register_method
from fedzip.wire import Message


class FlascOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    d_dl: float = Field(1.0, gt=0, le=1, description="download density")
    d_ul: float = Field(1.0, gt=0, le=1, description="upload density")
    gamma: float = Field(1.0, gt=0, le=1, description="density decay factor")
    schedule_every: int = Field(1, ge=1, description="rounds between density decays")
    server_optimizer: Literal["adamw", "sgd"] = "adamw"
    server_lr: float = Field(1e-3, gt=0)
    server_weight_decay: float = Field(0.0, ge=0)
    weighting: Literal["uniform", "samples"] = "uniform"
    client_freeze: bool = False
    server_freeze: bool = False
    freeze_a: bool = False
    error_feedback: bool = False
    dense_head_download: bool = Field(
        False, description="download mask over the LoRA entries only (k = d_dl of them); other trainable tensors "
                           "(a classification head) go whole, as the paper's heterogeneous-client code does")
    eval_masked: bool = Field(True, description="evaluate and export the model the clients receive (theta_s "
                              "masked at the download density), as the paper's code does; false: dense theta_s")


def global_topk_masks(tensors: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Boolean masks keeping the k largest magnitudes over all tensors together (one threshold)."""
    flat = torch.cat([t.detach().flatten().abs() for t in tensors.values()])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.topk(flat, min(k, flat.numel()), sorted=False).indices] = True
    masks, start = {}, 0
    for name, t in tensors.items():
        masks[name] = keep[start:start + t.numel()].view(t.shape)
        start += t.numel()
    return masks


def flatten(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors.values()])


def unflatten(flat: torch.Tensor, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = flat[start:start + n].view(shape)
        start += n
    return out


@register_method(aliases=("cellm",))  # CELLM (arXiv 2407.20557) runs FLASC's algorithm; users type flasc
class Flasc(Method):
    name = "flasc"
    runs_on_accelerator = True
    Options = FlascOptions
    client_dp = True  # the sparse upload is clipped after top-k: the bound holds for what is sent
    local_dp = False  # but which entries top-k kept is itself data: local noise on the values would not hide it
    record_dp = True  # top-k, error feedback and clipping act on DP-SGD's output: post-processing

    def __init__(self, cfg, runtime):
        super().__init__(cfg, runtime)
        self.num_params = runtime.view.num_elements()  # P: both sides know it from the model

    @classmethod
    def prepare_model(cls, model, cfg) -> None:
        if cfg.method_options.get("freeze_a"):
            for n, p in model.named_parameters():
                if is_lora_a(canonical(n)):
                    p.requires_grad_(False)

    # -- densities and codecs --------------------------------------------------------------------
    def density(self, d0: float, rnd: int) -> float:
        return d0 * self.opts.gamma ** ((rnd - 1) // self.opts.schedule_every)

    def k_for(self, d0: float, rnd: int) -> int:
        return max(1, math.ceil(self.density(d0, rnd) * self.num_params))

    def wire_codec(self, direction: str) -> str:
        base = getattr(self.cfg.wire, direction)
        sparse = (self.opts.d_dl if direction == "down" else self.opts.d_ul) < 1
        if sparse and not base.startswith(("topk", "nonzero")):
            return f"nonzero+{base}"  # send only the kept entries, with their positions
        return base

    # -- server ------------------------------------------------------------------------------------
    def init_global(self) -> None:
        self.theta = {n: torch.nn.Parameter(t.clone()) for n, t in self.rt.view.get().items()}
        params = list(self.theta.values())
        if self.opts.server_optimizer == "adamw":
            self.opt = torch.optim.AdamW(params, lr=self.opts.server_lr, weight_decay=self.opts.server_weight_decay)
        else:
            self.opt = torch.optim.SGD(params, lr=self.opts.server_lr, weight_decay=self.opts.server_weight_decay)
        self.fixed_mask: dict[str, torch.Tensor] | None = None
        self.next_round = 1
        self.clip_bound = privacy.ClipBound(self.cfg)  # read only under DP

    def server_state(self) -> ServerState:
        state = ServerState({"theta": {n: p.detach().clone() for n, p in self.theta.items()},
                             "optimizer": optimizer_state_to_tensors(self.opt, list(self.theta))},
                            {"next_round": self.next_round, **self.clip_bound.facts()})
        if self.fixed_mask is not None:
            state.tensors["mask"] = {n: m.to(torch.uint8) for n, m in self.fixed_mask.items()}
        return state

    def load_server_state(self, state: ServerState) -> None:
        with torch.no_grad():
            for n, p in self.theta.items():
                p.copy_(state.group("theta")[n])
        load_optimizer_state(self.opt, list(self.theta), state.group("optimizer"))
        self.fixed_mask = {n: m.bool() for n, m in state.group("mask").items()} or None
        self.next_round = int(state.facts["next_round"])
        self.clip_bound.load(state.facts)

    def dense_theta(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.theta.items()}

    def download_mask(self, theta: dict[str, torch.Tensor], rnd: int) -> dict[str, torch.Tensor]:
        if self.opts.server_freeze and self.fixed_mask is not None:
            return self.fixed_mask
        if not self.opts.dense_head_download:
            return global_topk_masks(theta, self.k_for(self.opts.d_dl, rnd))
        lora = {n: t for n, t in theta.items() if is_lora(n)}
        k = max(1, math.ceil(self.density(self.opts.d_dl, rnd) * sum(t.numel() for t in lora.values())))
        masks = global_topk_masks(lora, k)
        return {n: masks[n] if n in masks else torch.ones_like(t, dtype=torch.bool) for n, t in theta.items()}

    def global_tensors(self) -> dict[str, torch.Tensor]:
        """What is evaluated and exported: by default the sparse model the next round's clients receive."""
        theta = self.dense_theta()
        if self.opts.d_dl >= 1 or not self.opts.eval_masked:
            return theta
        mask = self.download_mask(theta, self.next_round)
        return {n: t * mask[n] for n, t in theta.items()}

    def down_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        return {"theta": (self.num_params,)}

    def up_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        return {"delta": (self.num_params,)}

    def configure(self, rnd: int, cids: list[int]) -> dict[int, Message]:
        theta = self.dense_theta()
        if self.opts.d_dl < 1:
            mask = self.download_mask(theta, rnd)
            if self.opts.server_freeze:
                self.fixed_mask = mask
            theta = {n: t * mask[n] for n, t in theta.items()}
        msg = Message(tensors={"theta": flatten(theta)}, meta={"round": rnd, **self.clip_bound.meta()})
        return {cid: msg for cid in cids}

    def aggregate(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        weights = {}
        for cid, r in replies.items():
            n = reply_weight(r)  # validates the reply either way
            weights[cid] = n if self.opts.weighting == "samples" else 1
        total = sum(weights.values())
        stats = {}
        if privacy.enabled(self.cfg):  # clipped again, summed, noised (dense), divided by the expected cohort
            mean, stats = privacy.private_mean(self.cfg, [{"delta": r.tensors["delta"]} for r in replies.values()],
                                               {"delta": torch.zeros(self.num_params)}, rnd, self.rt.randomness,
                                               self.clip_bound, [r.meta for r in replies.values()])
            mean_delta = unflatten(mean["delta"], self.rt.view.shapes())
        else:
            mean_delta = unflatten(sum(replies[cid].tensors["delta"] * (w / total) for cid, w in weights.items()),
                                   self.rt.view.shapes())
        self.opt.zero_grad(set_to_none=True)
        for n, p in self.theta.items():
            p.grad = -mean_delta[n]
        self.opt.step()
        self.next_round = rnd + 1
        return {"density_dl": self.density(self.opts.d_dl, rnd), "density_ul": self.density(self.opts.d_ul, rnd),
                **stats}

    # -- client ------------------------------------------------------------------------------------
    def fit(self, client: ClientContext, message: Message) -> Message:
        view, opts = self.rt.view, self.opts
        start = unflatten(message.tensors["theta"], view.shapes())
        view.set(start)
        grad_hook = None
        if opts.client_freeze and opts.d_dl < 1:
            support = {n: (t != 0).float() for n, t in start.items()}  # the server's mask, as received
            support_on_model = {n: m.to(view.params[n].device) for n, m in support.items()}

            def grad_hook():
                for n, p in view.params.items():
                    if p.grad is not None:
                        p.grad.mul_(support_on_model[n])

        stored = client.store.load(client.cid) if (opts.error_feedback or self.cfg.train.persist_optimizer_state) else {}
        steps, loss, opt_state = train_locally(
            self.rt.model, view.params, self.rt.task, client.indices, round_train_config(self.cfg, client.round), client.seed,
            opt_state={k[5:]: v for k, v in stored.items() if k.startswith("opt::")},
            grad_hook=grad_hook, progress=self.rt.step_progress, records=privacy.records(self.cfg, client))
        trained = view.get()
        delta = {n: trained[n] - start[n] for n in start}
        if opts.client_freeze and opts.d_dl < 1:  # weight decay or momentum must not leak outside the mask
            delta = {n: d * support[n] for n, d in delta.items()}
        if opts.error_feedback:
            delta = {n: d + stored.get(f"ef::{n}", torch.zeros_like(d)) for n, d in delta.items()}
        sent = delta
        if opts.d_ul < 1:
            masks = global_topk_masks(delta, self.k_for(opts.d_ul, client.round))
            sent = {n: d * masks[n] for n, d in delta.items()}
        if privacy.enabled(self.cfg):  # clip what is sent (after top-k); error feedback keeps what clipping cut
            sent, dp_meta = privacy.private_update(self.cfg, sent, client, message.meta)
        else:
            dp_meta = {}
        to_store = {f"opt::{k}": v for k, v in opt_state.items()}
        if opts.error_feedback:
            to_store.update({f"ef::{n}": delta[n] - sent[n] for n in delta})
        if to_store:
            client.store.save(client.cid, client.round, to_store)
        return Message(tensors={"delta": flatten(sent)},
                       meta={"num_examples": client.num_examples, "steps": steps, "train_loss": loss, **dp_meta,
                             **privacy.record_meta(self.cfg, client.num_examples, steps, client.round)})
