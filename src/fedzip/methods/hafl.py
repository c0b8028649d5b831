"""HAFL (arXiv 2411.06581) and the heterogeneous-rank baselines HetLoRA and FlexLoRA.

ALGORITHMS.md section 3. Every client k has a rank budget r_k <= R (the global LoRA rank). A LoRA
module's rank-1 component i is the pair (A[i, :], B[:, i]). Per round:

    freeze   (HAFL scheme 2): send all R components; the client scores them (AdaLoRA sensitivity x
             uncertainty), trains only its top-r_k (gradient mask) and uploads those with their index set
    truncate (HAFL scheme 1): send each client its top-r_k components by the global score; it trains them
    hetlora  (baseline):      as truncate, but the FIRST r_k components
    flexlora (baseline):      send the best rank-r_k factorisation of the global dW (truncated SVD);
                              the server averages the clients' full dW_k = s B_k A_k
    aggregate: adaptive  = average component i over the clients that updated it (sample-weighted),
                           a component nobody updated keeps its value
               zero_pad  = average over all of the round's clients, absent components counting as zero
    controls (not in the paper): ``selection: random`` trains r_k components drawn blindly instead of the
    top-r_k by importance; ``server_lr`` < 1 steps only part of the way to the aggregate, which separates
    HAFL-adaptive's larger updates (zero-padding shrinks rarely-held components every round) from its
    choice of components.

Clients emulate rank r_k inside the rank-R model: components they do not hold are zero and frozen, which
contributes exactly nothing (B_i A_i = 0 and both gradients vanish). The LoRA scale stays alpha / R for
every tier [choice]. Importance scores travel up as R floats per module and are counted.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedzip.errors import ConfigError, PayloadError
from fedzip.methods.base import ClientContext, Method, reply_weight
from fedzip.methods.state import ServerState
from fedzip.methods.training import round_train_config, train_locally
from fedzip.models.lora import is_lora, lora_a, lora_b, lora_modules
from fedzip.registry import register_method
from fedzip.wire import Message


class Tier(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rank: int = Field(ge=1)
    share: float = Field(gt=0, le=1)


class HaflOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["freeze", "truncate", "hetlora", "flexlora"] = "freeze"
    aggregation: Literal["adaptive", "zero_pad"] = "adaptive"
    tiers: list[Tier] = Field(default_factory=lambda: [Tier(rank=4, share=1 / 3), Tier(rank=8, share=1 / 3),
                                                       Tier(rank=16, share=1 / 3)])
    client_ranks: list[int] | None = Field(None, description="explicit rank per client (overrides tiers)")
    selection: Literal["importance", "random"] = Field(
        "importance", description="freeze / truncate: which r_k components a client trains; random (a control): "
                                  "r_k drawn uniformly, per client and round")
    server_lr: float = Field(1.0, gt=0, le=1, description="server step towards the aggregate (1: replace); a "
                                                          "control for update size, e.g. 1/3")
    beta1: float = Field(0.85, ge=0, lt=1)
    beta2: float = Field(0.85, ge=0, lt=1)
    degradation_every: int = Field(0, ge=0, description="evaluate each tier's received model every N rounds")
    degradation_examples: int | None = Field(None, ge=1)


def assign_ranks(opts: HaflOptions, num_clients: int, global_rank: int, seed: int) -> list[int]:
    if opts.client_ranks is not None:
        ranks = list(opts.client_ranks)
        if len(ranks) != num_clients:
            raise ConfigError(f"method_options.client_ranks: {len(ranks)} ranks for {num_clients} clients")
    else:
        shares = np.array([t.share for t in opts.tiers])
        counts = np.floor(shares / shares.sum() * num_clients).astype(int)
        counts[: num_clients - counts.sum()] += 1  # hand out the remainder, lowest tiers first
        order = np.random.default_rng([seed, 0x7E]).permutation(num_clients)
        ranks = [0] * num_clients
        start = 0
        for tier, c in zip(opts.tiers, counts):
            for cid in order[start:start + c]:
                ranks[int(cid)] = tier.rank
            start += c
    bad = [r for r in ranks if not 1 <= r <= global_rank]
    if bad:
        raise ConfigError(f"method_options: client ranks {sorted(set(bad))} must be in [1, lora.rank={global_rank}]")
    return ranks


class ImportanceTracker:
    """AdaLoRA's smoothed sensitivity x uncertainty per LoRA element, reduced to one score per component."""

    def __init__(self, params: dict[str, torch.nn.Parameter], b1: float, b2: float):
        self.params, self.b1, self.b2 = params, b1, b2
        self.ibar = {n: torch.zeros_like(p) for n, p in params.items()}
        self.ubar = {n: torch.zeros_like(p) for n, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            if p.grad is None:
                continue
            sens = (p * p.grad).abs()
            self.ibar[n].mul_(self.b1).add_(sens, alpha=1 - self.b1)
            self.ubar[n].mul_(self.b2).add_((sens - self.ibar[n]).abs(), alpha=1 - self.b2)

    def component_scores(self, a_name: str, b_name: str) -> torch.Tensor:
        s_a = self.ibar[a_name] * self.ubar[a_name]  # (R, d_in)
        s_b = self.ibar[b_name] * self.ubar[b_name]  # (d_out, R)
        return s_a.mean(dim=1) + s_b.mean(dim=0)


def top_components(scores: torch.Tensor, r: int) -> list[int]:
    """Indices of the r highest scores (ties to the lower index), sorted."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:r])


def random_components(R: int, r: int, seed: list[int]) -> list[int]:
    """r of R component indices drawn uniformly (the selection control), sorted."""
    return sorted(int(i) for i in np.random.default_rng(seed).choice(R, size=r, replace=False))


def best_rank_r(dw: torch.Tensor, r: int, scale: float, init_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r)) with scale * B @ A the best rank-r approximation of dw (Eckart-Young).

    Directions with a zero singular value get the shared random init for A and zero for B, so that a
    client starting from dw = 0 trains like a fresh LoRA rather than being stuck at a zero gradient."""
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    root = torch.sqrt(s / scale)
    a, b = root[:, None] * vh, u * root[None, :]
    dead = s <= s.max().clamp_min(1e-30) * 1e-7 if len(s) else s.bool()
    a[dead], b[:, dead] = init_a[: len(s)][dead], 0.0
    return a, b


@register_method
class Hafl(Method):
    name = "hafl"
    Options = HaflOptions
    # Masks and importance live beside the model's parameters; server state and payloads on the CPU.
    runs_on_accelerator = True

    def __init__(self, cfg, runtime):
        super().__init__(cfg, runtime)
        self.R = cfg.lora.rank
        self.scale = cfg.lora.alpha / cfg.lora.rank
        self.ranks = assign_ranks(self.opts, cfg.num_clients, self.R, cfg.seed)
        names = runtime.view.names()
        self.modules = lora_modules(names)
        if not self.modules:
            raise ConfigError(f"method {cfg.method} needs LoRA modules")
        self.others = [n for n in names if not is_lora(n)]  # e.g. the head
        self.shapes = runtime.view.shapes()

    @staticmethod
    def a(m: str) -> str:
        return lora_a(m)

    @staticmethod
    def b(m: str) -> str:
        return lora_b(m)

    def describe(self) -> dict:
        tiers = sorted(set(self.ranks))
        per_rank = {r: sum(r * (self.shapes[self.a(m)][1] + self.shapes[self.b(m)][0]) for m in self.modules)
                    for r in tiers}
        head = sum(math.prod(self.shapes[n]) for n in self.others)
        # trainable floats, and their training memory with AdamW (weights + grads + two moments)
        return {"client_ranks": self.ranks, "global_rank": self.R,
                "tier_trainable_params": {str(r): per_rank[r] + head for r in tiers},
                "tier_train_state_bytes": {str(r): 16 * (per_rank[r] + head) for r in tiers}}

    # -- server ------------------------------------------------------------------------------------
    def init_global(self) -> None:
        self.global_ = self.rt.view.get()
        self.init_a = {m: self.global_[self.a(m)].clone() for m in self.modules}  # the shared seeded init
        self.scores = torch.zeros(len(self.modules), self.R)
        if self.opts.mode == "flexlora":
            self.dw = {m: self.scale * self.global_[self.b(m)] @ self.global_[self.a(m)] for m in self.modules}

    def server_state(self) -> ServerState:
        state = ServerState({"global": dict(self.global_), "importance": {"scores": self.scores}})
        if self.opts.mode == "flexlora":
            state.tensors["full_rank_update"] = dict(self.dw)
        return state

    def load_server_state(self, state: ServerState) -> None:
        self.global_ = {n: state.group("global")[n].clone() for n in self.global_}
        self.scores = state.group("importance")["scores"].clone()
        if self.opts.mode == "flexlora":
            self.dw = {m: state.group("full_rank_update")[m].clone() for m in self.modules}
            self._set_global_from_dw()

    def global_tensors(self) -> dict[str, torch.Tensor]:
        return self.global_

    def held_components(self, cid: int, rnd: int) -> list[list[int]]:
        """Per module, which components the server sends client ``cid`` (truncate / hetlora / flexlora)."""
        r = self.ranks[cid]
        if self.opts.mode == "truncate" and self.opts.selection == "random":
            return [random_components(self.R, r, [self.cfg.seed, cid, rnd, j]) for j in range(len(self.modules))]
        if self.opts.mode == "truncate":
            return [top_components(self.scores[j], r) for j in range(len(self.modules))]
        return [list(range(r))] * len(self.modules)

    def _component_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        out = {}
        for m in self.modules:
            out[self.a(m)] = (r, self.shapes[self.a(m)][1])
            out[self.b(m)] = (self.shapes[self.b(m)][0], r)
        return out | {n: self.shapes[n] for n in self.others}

    def down_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        if self.opts.mode == "freeze":
            return self.shapes | {"scores": (len(self.modules), self.R)}
        return self._component_shapes(self.ranks[cid])

    def up_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        return self._component_shapes(self.ranks[cid]) | {"scores": (len(self.modules), self.R)}

    def configure(self, rnd: int, cids: list[int]) -> dict[int, Message]:
        if self.opts.mode == "freeze":
            msg = Message(self.global_ | {"scores": self.scores}, {"round": rnd})
            return {cid: msg for cid in cids}
        out = {}
        for cid in cids:
            held = self.held_components(cid, rnd)
            tensors = {n: self.global_[n] for n in self.others}
            for j, m in enumerate(self.modules):
                if self.opts.mode == "flexlora":
                    a, b = best_rank_r(self.dw[m], self.ranks[cid], self.scale, self.init_a[m])
                else:
                    a, b = self.global_[self.a(m)][held[j]], self.global_[self.b(m)][:, held[j]]
                tensors[self.a(m)], tensors[self.b(m)] = a, b
            out[cid] = Message(tensors, {"round": rnd, "components": [_mask(h) for h in held]})
        return out

    def aggregate(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        before = {n: t.clone() for n, t in self.global_.items()} if self.opts.server_lr < 1 else None
        if before is not None and self.opts.mode == "flexlora":
            before_dw = {m: t.clone() for m, t in self.dw.items()}
        weights = {cid: reply_weight(r) for cid, r in replies.items()}
        total = sum(weights.values())
        held = {cid: self._reply_components(cid, r) for cid, r in replies.items()}
        for n in self.others:
            self.global_[n] = sum(replies[c].tensors[n] * (w / total) for c, w in weights.items())
        if self.opts.mode == "flexlora":
            for m in self.modules:
                self.dw[m] = sum(self.scale * replies[c].tensors[self.b(m)] @ replies[c].tensors[self.a(m)] * (w / total)
                                 for c, w in weights.items())
            self._set_global_from_dw()
        else:
            for j, m in enumerate(self.modules):
                for i in range(self.R):
                    owners = [c for c in replies if i in held[c][j]]
                    if not owners and self.opts.aggregation == "adaptive":
                        continue  # nobody trained it: it keeps its value
                    denom = sum(weights[c] for c in owners) if self.opts.aggregation == "adaptive" else total
                    a = torch.zeros_like(self.global_[self.a(m)][i])
                    b = torch.zeros_like(self.global_[self.b(m)][:, i])
                    for c in owners:
                        pos = held[c][j].index(i)
                        a += replies[c].tensors[self.a(m)][pos] * (weights[c] / denom)
                        b += replies[c].tensors[self.b(m)][:, pos] * (weights[c] / denom)
                    self.global_[self.a(m)][i], self.global_[self.b(m)][:, i] = a, b
        if before is not None:  # a step of server_lr from the old global towards the aggregate
            lr = self.opts.server_lr
            if self.opts.mode == "flexlora":
                self.dw = {m: before_dw[m] + lr * (self.dw[m] - before_dw[m]) for m in self.modules}
                self._set_global_from_dw()
                self.global_ |= {n: before[n] + lr * (self.global_[n] - before[n]) for n in self.others}
            else:
                self.global_ = {n: before[n] + lr * (t - before[n]) for n, t in self.global_.items()}
        # global importance: the mean score of each component over the clients that report it
        reported = torch.stack([replies[c].tensors["scores"] for c in replies])
        counts = (reported != 0).sum(0)
        self.scores = torch.where(counts > 0, reported.sum(0) / counts.clamp_min(1), self.scores)
        extra: dict[str, float] = {}
        every = self.opts.degradation_every
        if every and rnd % every == 0:
            extra |= self.degradation()
        return extra

    def _reply_components(self, cid: int, reply: Message) -> list[list[int]]:
        masks = reply.meta.get("components")
        r = self.ranks[cid]
        if not isinstance(masks, list) or len(masks) != len(self.modules):
            raise PayloadError("reply meta 'components' must hold one mask per LoRA module")
        held = []
        for mask in masks:
            idx = _unmask(mask, self.R)
            if len(idx) != r:
                raise PayloadError(f"client {cid} reports {len(idx)} components, its rank is {r}")
            held.append(idx)
        return held

    def _set_global_from_dw(self) -> None:
        for m in self.modules:
            a, b = best_rank_r(self.dw[m], self.R, self.scale, self.init_a[m])
            self.global_[self.a(m)], self.global_[self.b(m)] = a, b

    def degradation(self) -> dict[str, float]:
        """Accuracy of the global model as each tier receives it, before local training."""
        out = {}
        for r in sorted(set(self.ranks)):
            tensors = dict(self.global_)
            for j, m in enumerate(self.modules):
                if self.opts.mode == "freeze":
                    continue  # every tier holds all R components
                if self.opts.mode == "flexlora":
                    a, b = best_rank_r(self.dw[m], r, self.scale, self.init_a[m])
                    keep = list(range(r))
                else:
                    keep = top_components(self.scores[j], r) if self.opts.mode == "truncate" else list(range(r))
                    a, b = self.global_[self.a(m)][keep], self.global_[self.b(m)][:, keep]
                full_a, full_b = torch.zeros_like(self.global_[self.a(m)]), torch.zeros_like(self.global_[self.b(m)])
                full_a[keep], full_b[:, keep] = a, b
                tensors[self.a(m)], tensors[self.b(m)] = full_a, full_b
            self.rt.view.set(tensors)
            metrics = self.rt.task.evaluate(self.rt.model, self.cfg.eval.batch_size,
                                            self.opts.degradation_examples, seed=self.cfg.seed)
            key = "accuracy" if "accuracy" in metrics else "loss"
            out[f"tier{r}_{key}"] = metrics[key]
        return out

    # -- client ------------------------------------------------------------------------------------
    def fit(self, client: ClientContext, message: Message) -> Message:
        view, r = self.rt.view, self.ranks[client.cid]
        start = {n: message.tensors[n] for n in self.others}
        if self.opts.mode == "freeze":
            start |= {n: message.tensors[n] for n in self.shapes if n not in start}
            held: list[list[int]] | None = None  # chosen after the first backward pass, from local scores
            global_scores = message.tensors["scores"]
        else:
            held = [_unmask(mk, self.R) for mk in message.meta["components"]]
            for j, m in enumerate(self.modules):
                a = torch.zeros(self.shapes[self.a(m)])
                b = torch.zeros(self.shapes[self.b(m)])
                a[held[j]], b[:, held[j]] = message.tensors[self.a(m)], message.tensors[self.b(m)]
                start[self.a(m)], start[self.b(m)] = a, b
        view.set(start)
        lora = {n: p for n, p in view.params.items() if n not in self.others}
        tracker = ImportanceTracker(lora, self.opts.beta1, self.opts.beta2)
        masks: dict[str, torch.Tensor] = {}

        def grad_hook():
            nonlocal held
            tracker.update()
            if held is None:  # freeze: pick the top-r_k components by local score (global score breaks ties)
                held = []
                for j, m in enumerate(self.modules):
                    if self.opts.selection == "random":  # the control: as many components, chosen blindly
                        held.append(random_components(self.R, r, [self.cfg.seed, client.cid, client.round, j]))
                        continue
                    local = tracker.component_scores(self.a(m), self.b(m)).cpu()
                    held.append(top_components(local if local.any() else global_scores[j], r))
            if not masks:
                for j, m in enumerate(self.modules):
                    device = view.params[self.a(m)].device  # masks meet gradients where the model lives
                    ma = torch.zeros(self.shapes[self.a(m)], device=device)
                    mb = torch.zeros(self.shapes[self.b(m)], device=device)
                    ma[held[j]], mb[:, held[j]] = 1.0, 1.0
                    masks[self.a(m)], masks[self.b(m)] = ma, mb
            for n, mk in masks.items():
                if view.params[n].grad is not None:
                    view.params[n].grad.mul_(mk)

        before = {n: p.detach().clone() for n, p in lora.items()}
        train_cfg = round_train_config(self.cfg, client.round)
        steps, loss, _ = train_locally(self.rt.model, view.params, self.rt.task, client.indices, train_cfg,
                                       client.seed, grad_hook=grad_hook, progress=self.rt.step_progress)
        with torch.no_grad():  # decoupled weight decay must not move frozen components either
            for n, mk in masks.items():
                view.params[n].copy_(view.params[n] * mk + before[n] * (1 - mk))
        tensors = view.get(self.others)  # the reply is built on the CPU, wherever the model trained
        scores = torch.zeros(len(self.modules), self.R)
        for j, m in enumerate(self.modules):
            tensors[self.a(m)] = view.params[self.a(m)].detach()[held[j]].to("cpu", copy=True)
            tensors[self.b(m)] = view.params[self.b(m)].detach()[:, held[j]].to("cpu", copy=True)
            scores[j, held[j]] = tracker.component_scores(self.a(m), self.b(m))[held[j]].cpu()
        tensors["scores"] = scores
        return Message(tensors, {"num_examples": client.num_examples, "steps": steps, "train_loss": loss,
                                 "components": [_mask(h) for h in held]})


def _mask(indices: list[int]) -> int:
    """An index set as an R-bit integer (it travels in the JSON header, and is counted there)."""
    return sum(1 << i for i in indices)


def _unmask(mask, R: int) -> list[int]:
    if not isinstance(mask, int) or isinstance(mask, bool) or mask < 0 or mask >= 1 << R:
        raise PayloadError(f"component mask {mask!r} is not an {R}-bit integer")
    return [i for i in range(R) if mask >> i & 1]
