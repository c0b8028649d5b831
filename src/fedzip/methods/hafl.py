"""HAFL (arXiv 2411.06581) and the heterogeneous-rank baselines HetLoRA and FlexLoRA.

ALGORITHMS.md section 3. Every client k has a rank budget r_k <= R (the global LoRA rank). A LoRA module's
rank-1 component i is the pair (A[i, :], B[:, i]). One round of every variant:

    1. server: send client k the components it will hold        (components_for / factors_for)
    2. client: train r_k components, zero and frozen the rest;   (fit; HAFL picks its r_k after the first
               upload them, their index set and importance scores backward pass: choose_locally)
    3. server: merge the uploads into the global LoRA            (merge)
    4. server: step server_lr of the way there, refresh importance scores

    hafl           HAFL scheme 2 (freeze): send all R; the client scores them (AdaLoRA sensitivity x
                   uncertainty), trains only its top-r_k, and the server averages each component over the
                   clients that trained it ("adaptive"; ``aggregation: zero_pad`` counts absentees as zero)
    hafl_truncate  HAFL scheme 1: the server sends each client its top-r_k components by global importance
    hetlora        baseline: the FIRST r_k components, zero-padding aggregation
    flexlora       baseline: the best rank-r_k factorisation of the global dW (truncated SVD U Sigma V^T, as
                   B = U Sigma, A = V^T by default: ``factor_split``); the server averages the clients' full
                   dW_k = s B_k A_k

Controls, not in the paper: ``selection: random`` (HAFL) trains r_k components drawn blindly instead of the
top-r_k by importance; ``server_lr`` < 1 steps only part of the way to the merge, which separates
HAFL-adaptive's larger updates (zero-padding shrinks rarely-held components every round) from its choice
of components.

Clients emulate rank r_k inside the rank-R model: components they do not hold are zero and frozen, which
contributes exactly nothing (B_i A_i = 0 and both gradients vanish). The LoRA scale stays alpha / R for
every tier [choice]. Importance scores travel up as R floats per module and are counted; every variant
sends them, so the baselines' bytes include them too.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

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


class HeteroRankOptions(BaseModel):
    """What every heterogeneous-rank method takes."""

    model_config = ConfigDict(extra="forbid")
    tiers: list[Tier] = Field(default_factory=lambda: [Tier(rank=4, share=1 / 3), Tier(rank=8, share=1 / 3),
                                                       Tier(rank=16, share=1 / 3)])
    client_ranks: list[int] | None = Field(None, description="explicit rank per client (overrides tiers)")
    server_lr: float = Field(1.0, gt=0, le=1, description="server step towards the merge (1: replace); a "
                                                          "control for update size, e.g. 1/3")
    beta1: float = Field(0.85, ge=0, lt=1)
    beta2: float = Field(0.85, ge=0, lt=1)
    degradation_every: int = Field(0, ge=0, description="evaluate each tier's received model every N rounds")
    degradation_examples: int | None = Field(None, ge=1)


class HetLoRAOptions(HeteroRankOptions):
    aggregation: Literal["adaptive", "zero_pad"] = "zero_pad"


class FlexLoRAOptions(HeteroRankOptions):
    factor_split: Literal["sigma_in_b", "sqrt"] = Field(
        "sigma_in_b", description="how a truncated SVD U Sigma V^T becomes LoRA factors: B = U Sigma, A = V^T "
                                  "(FlexLoRA's convention), or sqrt(Sigma) on each side")


class HaflOptions(HetLoRAOptions):
    aggregation: Literal["adaptive", "zero_pad"] = "adaptive"
    selection: Literal["importance", "random"] = Field(
        "importance", description="which r_k components a client trains; random (a control): r_k drawn "
                                  "uniformly, per client, round and module")


def assign_ranks(opts: HeteroRankOptions, num_clients: int, global_rank: int, seed: int) -> list[int]:
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

    def component_scores(self, module: str) -> torch.Tensor:
        s_a = self.ibar[lora_a(module)] * self.ubar[lora_a(module)]  # (R, d_in)
        s_b = self.ibar[lora_b(module)] * self.ubar[lora_b(module)]  # (d_out, R)
        return s_a.mean(dim=1) + s_b.mean(dim=0)


def top_components(scores: torch.Tensor, r: int) -> list[int]:
    """Indices of the r highest scores (ties to the lower index), sorted."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:r])


def random_components(R: int, r: int, seed: list[int]) -> list[int]:
    """r of R component indices drawn uniformly (the selection control), sorted."""
    return sorted(int(i) for i in np.random.default_rng(seed).choice(R, size=r, replace=False))


def best_rank_r(dw: torch.Tensor, r: int, scale: float, init_a: torch.Tensor,
                split: str = "sigma_in_b") -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r)) with scale * B @ A the best rank-r approximation of dw (Eckart-Young).

    ``split`` says where the singular values go: "sigma_in_b" (A = V^T, B = U Sigma / scale, FlexLoRA's
    convention) or "sqrt" (sqrt(Sigma) on each side). The product is the same; training from it is not: under
    "sqrt" a direction with a small singular value has both factors small, near the A = B = 0 saddle where
    each factor's gradient is proportional to the other, while under "sigma_in_b" its A row has unit norm.
    Directions with a zero singular value get the shared random init for A and zero for B, so that a
    client starting from dw = 0 trains like a fresh LoRA rather than being stuck at a zero gradient."""
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    if split == "sqrt":
        root = torch.sqrt(s / scale)
        a, b = root[:, None] * vh, u * root[None, :]
    else:
        a, b = vh.clone(), u * (s / scale)[None, :]
    dead = s <= s.max().clamp_min(1e-30) * 1e-7 if len(s) else s.bool()
    a[dead], b[:, dead] = init_a[: len(s)][dead], 0.0
    return a, b


def average_components(global_a: torch.Tensor, global_b: torch.Tensor, uploads: list[tuple[list[int], torch.Tensor,
                       torch.Tensor, int]], adaptive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-1-level averaging of one module. ``uploads``: (held indices, A rows, B columns, weight) per client.

    adaptive: component i is the weighted mean over the clients that trained it, and keeps its value if
    none did. zero_pad: the weighted mean over all clients, absent components counting as zero."""
    R = global_a.shape[0]
    held_weight = torch.zeros(R, dtype=torch.float64)  # summed weight of the clients holding each component
    for held, _, _, w in uploads:
        held_weight[held] += w
    denom = held_weight if adaptive else torch.full((R,), float(sum(w for *_, w in uploads)), dtype=torch.float64)
    sum_a, sum_b = torch.zeros_like(global_a), torch.zeros_like(global_b)
    for held, a, b, w in uploads:  # in client order, as a loop over clients would add them
        coef = (w / denom[held]).to(global_a.dtype)
        sum_a[held] += a * coef[:, None]
        sum_b[:, held] += b * coef[None, :]
    if not adaptive:
        return sum_a, sum_b
    nobody = held_weight == 0
    return torch.where(nobody[:, None], global_a, sum_a), torch.where(nobody[None, :], global_b, sum_b)


class HeteroRankLoRA(Method):
    """The frame every variant shares: ranks, component bookkeeping, client training, server step.

    A variant says which components a client gets (``components_for``, ``factors_for``), how the server
    merges the uploads (``merge``) and, for HAFL-freeze, how the client picks its own (``choose_locally``)."""

    Options = HeteroRankOptions
    # Masks and importance live beside the model's parameters; server state and payloads on the CPU.
    runs_on_accelerator = True
    # True: the server sends all R components and each client picks its own r_k (choose_locally).
    client_chooses: ClassVar[bool] = False

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

    def describe(self) -> dict:
        tiers = sorted(set(self.ranks))
        per_rank = {r: sum(r * (self.shapes[lora_a(m)][1] + self.shapes[lora_b(m)][0]) for m in self.modules)
                    for r in tiers}
        head = sum(math.prod(self.shapes[n]) for n in self.others)
        # trainable floats, and their training memory with AdamW (weights + grads + two moments)
        return {"client_ranks": self.ranks, "global_rank": self.R,
                "tier_trainable_params": {str(r): per_rank[r] + head for r in tiers},
                "tier_train_state_bytes": {str(r): 16 * (per_rank[r] + head) for r in tiers}}

    # -- what a variant decides --------------------------------------------------------------------
    def components_for(self, cid: int, rnd: int) -> list[list[int]]:
        """Step 1: per module, the components client ``cid`` gets (a ``client_chooses`` method sends all R)."""
        raise NotImplementedError

    def factors_for(self, cid: int, held: list[list[int]]) -> dict[str, torch.Tensor]:
        """Step 1: the LoRA factors sent for those components (rows of A, columns of B)."""
        out = {}
        for j, m in enumerate(self.modules):
            out[lora_a(m)], out[lora_b(m)] = self.global_[lora_a(m)][held[j]], self.global_[lora_b(m)][:, held[j]]
        return out

    def choose_locally(self, tracker: ImportanceTracker, global_scores: torch.Tensor, r: int,
                       client: ClientContext) -> list[list[int]]:
        """Step 2, for a ``client_chooses`` method: the client's own r components per module."""
        raise NotImplementedError

    def merge(self, replies: dict[int, Message], weights: dict[int, int], held: dict[int, list[list[int]]]) -> None:
        """Step 3: the uploads into ``self.global_`` (the LoRA factors; the head is averaged already)."""
        raise NotImplementedError

    def tier_view(self, r: int, j: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """What a rank-r client of module j would receive now: (indices, A rows, B columns)."""
        keep = list(range(r))
        m = self.modules[j]
        return keep, self.global_[lora_a(m)][keep], self.global_[lora_b(m)][:, keep]

    # -- server ------------------------------------------------------------------------------------
    def init_global(self) -> None:
        self.global_ = self.rt.view.get()
        self.init_a = {m: self.global_[lora_a(m)].clone() for m in self.modules}  # the shared seeded init
        self.scores = torch.zeros(len(self.modules), self.R)

    def server_state(self) -> ServerState:
        return ServerState({"global": dict(self.global_), "importance": {"scores": self.scores}})

    def load_server_state(self, state: ServerState) -> None:
        self.global_ = {n: state.group("global")[n].clone() for n in self.global_}
        self.scores = state.group("importance")["scores"].clone()

    def global_tensors(self) -> dict[str, torch.Tensor]:
        return self.global_

    def _component_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        out = {}
        for m in self.modules:
            out[lora_a(m)] = (r, self.shapes[lora_a(m)][1])
            out[lora_b(m)] = (self.shapes[lora_b(m)][0], r)
        return out | {n: self.shapes[n] for n in self.others}

    def down_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        return self._component_shapes(self.ranks[cid])

    def up_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        return self._component_shapes(self.ranks[cid]) | {"scores": (len(self.modules), self.R)}

    def configure(self, rnd: int, cids: list[int]) -> dict[int, Message]:
        out = {}
        for cid in cids:
            held = self.components_for(cid, rnd)
            tensors = {n: self.global_[n] for n in self.others} | self.factors_for(cid, held)
            out[cid] = Message(tensors, {"round": rnd, "components": [_mask(h) for h in held]})
        return out

    def aggregate(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        weights = {cid: reply_weight(r) for cid, r in replies.items()}
        held = {cid: self._reply_components(cid, r) for cid, r in replies.items()}
        before = self._snapshot() if self.opts.server_lr < 1 else None
        total = sum(weights.values())
        for n in self.others:
            self.global_[n] = sum(replies[c].tensors[n] * (w / total) for c, w in weights.items())
        self.merge(replies, weights, held)
        if before is not None:
            self._server_step(before, self.opts.server_lr)
        # global importance: the mean score of each component over the clients that report it
        reported = torch.stack([replies[c].tensors["scores"] for c in replies])
        counts = (reported != 0).sum(0)
        self.scores = torch.where(counts > 0, reported.sum(0) / counts.clamp_min(1), self.scores)
        every = self.opts.degradation_every
        return self.degradation() if every and rnd % every == 0 else {}

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.global_.items()}

    def _server_step(self, before: dict[str, torch.Tensor], lr: float) -> None:
        """A step of ``lr`` from the old global model towards the merge."""
        self.global_ = {n: before[n] + lr * (t - before[n]) for n, t in self.global_.items()}

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

    def degradation(self) -> dict[str, float]:
        """Accuracy of the global model as each tier receives it, before local training."""
        out = {}
        for r in sorted(set(self.ranks)):
            tensors = dict(self.global_)
            for j, m in enumerate(self.modules):
                view = self.tier_view(r, j)
                if view is None:
                    continue  # the tier holds all R components
                keep, a, b = view
                full_a, full_b = torch.zeros_like(self.global_[lora_a(m)]), torch.zeros_like(self.global_[lora_b(m)])
                full_a[keep], full_b[:, keep] = a, b
                tensors[lora_a(m)], tensors[lora_b(m)] = full_a, full_b
            self.rt.view.set(tensors)
            metrics = self.rt.task.evaluate(self.rt.model, self.cfg.eval.batch_size,
                                            self.opts.degradation_examples, seed=self.cfg.seed)
            for key in ("accuracy", "loss"):  # loss too: it moves where 800 examples' accuracy may not
                if key in metrics:
                    out[f"tier{r}_{key}"] = metrics[key]
        return out

    # -- client ------------------------------------------------------------------------------------
    def fit(self, client: ClientContext, message: Message) -> Message:
        view, r = self.rt.view, self.ranks[client.cid]
        start = {n: message.tensors[n] for n in self.others}
        if not self.client_chooses:  # the server chose: its components, zero-padded to rank R
            masks_sent = message.meta.get("components")
            if not isinstance(masks_sent, list) or len(masks_sent) != len(self.modules):
                raise PayloadError("message meta 'components' must hold one mask per LoRA module")
            held: list[list[int]] | None = [_unmask(mk, self.R) for mk in masks_sent]
            if any(len(h) != r for h in held):
                raise PayloadError(f"the server sent {sorted({len(h) for h in held})} components, this client's rank is {r}")
            for j, m in enumerate(self.modules):
                a, b = torch.zeros(self.shapes[lora_a(m)]), torch.zeros(self.shapes[lora_b(m)])
                a[held[j]], b[:, held[j]] = message.tensors[lora_a(m)], message.tensors[lora_b(m)]
                start[lora_a(m)], start[lora_b(m)] = a, b
        else:  # all R components: the client chooses after its first backward pass
            start |= {n: message.tensors[n] for n in self.shapes if n not in start}
            held = None
        view.set(start)
        lora = {n: p for n, p in view.params.items() if n not in self.others}
        tracker = ImportanceTracker(lora, self.opts.beta1, self.opts.beta2)
        masks: dict[str, torch.Tensor] = {}

        def after_backward():  # train_locally calls it between backward and the optimiser step
            nonlocal held
            tracker.update()
            if held is None:
                held = self.choose_locally(tracker, message.tensors["scores"], r, client)
            if not masks:
                masks.update(self._gradient_masks(held))
            for n, mk in masks.items():  # only the held components move
                if view.params[n].grad is not None:
                    view.params[n].grad.mul_(mk)

        before = {n: p.detach().clone() for n, p in lora.items()}
        train_cfg = round_train_config(self.cfg, client.round)
        steps, loss, _ = train_locally(self.rt.model, view.params, self.rt.task, client.indices, train_cfg,
                                       client.seed, grad_hook=after_backward, progress=self.rt.step_progress)
        with torch.no_grad():  # decoupled weight decay must not move frozen components either
            for n, mk in masks.items():
                view.params[n].copy_(view.params[n] * mk + before[n] * (1 - mk))
        tensors = view.get(self.others)  # the reply is built on the CPU, wherever the model trained
        scores = torch.zeros(len(self.modules), self.R)
        for j, m in enumerate(self.modules):
            tensors[lora_a(m)] = view.params[lora_a(m)].detach()[held[j]].to("cpu", copy=True)
            tensors[lora_b(m)] = view.params[lora_b(m)].detach()[:, held[j]].to("cpu", copy=True)
            scores[j, held[j]] = tracker.component_scores(m)[held[j]].cpu()
        tensors["scores"] = scores
        return Message(tensors, {"num_examples": client.num_examples, "steps": steps, "train_loss": loss,
                                 "components": [_mask(h) for h in held]})

    def _gradient_masks(self, held: list[list[int]]) -> dict[str, torch.Tensor]:
        masks = {}
        for j, m in enumerate(self.modules):
            device = self.rt.view.params[lora_a(m)].device  # masks meet gradients where the model lives
            ma = torch.zeros(self.shapes[lora_a(m)], device=device)
            mb = torch.zeros(self.shapes[lora_b(m)], device=device)
            ma[held[j]], mb[:, held[j]] = 1.0, 1.0
            masks[lora_a(m)], masks[lora_b(m)] = ma, mb
        return masks


class RankOneAveraging(HeteroRankLoRA):
    """Step 3 for HAFL and HetLoRA: every component averaged on its own (adaptive or zero-padded)."""

    def merge(self, replies, weights, held) -> None:
        for j, m in enumerate(self.modules):
            uploads = [(held[c][j], replies[c].tensors[lora_a(m)], replies[c].tensors[lora_b(m)], weights[c])
                       for c in replies]
            self.global_[lora_a(m)], self.global_[lora_b(m)] = average_components(
                self.global_[lora_a(m)], self.global_[lora_b(m)], uploads, self.opts.aggregation == "adaptive")


@register_method
class Hafl(RankOneAveraging):
    """HAFL scheme 2: clients hold all R components and train their top-r_k by local importance."""

    name = "hafl"
    Options = HaflOptions
    client_chooses = True

    def down_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        return self.shapes | {"scores": (len(self.modules), self.R)}

    def configure(self, rnd: int, cids: list[int]) -> dict[int, Message]:
        msg = Message(self.global_ | {"scores": self.scores}, {"round": rnd})  # the global scores break ties
        return {cid: msg for cid in cids}

    def choose_locally(self, tracker, global_scores, r, client):
        held = []
        for j, m in enumerate(self.modules):
            if self.opts.selection == "random":  # the control: as many components, chosen blindly
                held.append(random_components(self.R, r, [self.cfg.seed, client.cid, client.round, j]))
                continue
            local = tracker.component_scores(m).cpu()
            held.append(top_components(local if local.any() else global_scores[j], r))
        return held

    def tier_view(self, r, j):
        return None  # every tier holds all R components


@register_method
class HaflTruncate(RankOneAveraging):
    """HAFL scheme 1: the server sends each client its top-r_k components by global importance."""

    name = "hafl_truncate"
    Options = HaflOptions

    def components_for(self, cid, rnd):
        r = self.ranks[cid]
        if self.opts.selection == "random":
            return [random_components(self.R, r, [self.cfg.seed, cid, rnd, j]) for j in range(len(self.modules))]
        return [top_components(self.scores[j], r) for j in range(len(self.modules))]

    def tier_view(self, r, j):
        keep = top_components(self.scores[j], r)
        m = self.modules[j]
        return keep, self.global_[lora_a(m)][keep], self.global_[lora_b(m)][:, keep]


@register_method
class HetLoRA(RankOneAveraging):
    """HetLoRA (baseline): every client gets the first r_k components; zero-padding aggregation."""

    name = "hetlora"
    Options = HetLoRAOptions

    def components_for(self, cid, rnd):
        return [list(range(self.ranks[cid]))] * len(self.modules)


@register_method
class FlexLoRA(HeteroRankLoRA):
    """FlexLoRA (baseline): average the clients' full-rank dW_k, send each client its truncated SVD."""

    name = "flexlora"
    Options = FlexLoRAOptions

    def init_global(self) -> None:
        super().init_global()
        self.dw = {m: self.scale * self.global_[lora_b(m)] @ self.global_[lora_a(m)] for m in self.modules}

    def server_state(self) -> ServerState:
        state = super().server_state()
        state.tensors["full_rank_update"] = dict(self.dw)
        return state

    def load_server_state(self, state: ServerState) -> None:
        super().load_server_state(state)
        self.dw = {m: state.group("full_rank_update")[m].clone() for m in self.modules}
        self._set_global_from_dw()

    def components_for(self, cid, rnd):
        return [list(range(self.ranks[cid]))] * len(self.modules)

    def factors_for(self, cid, held):
        out = {}
        for m in self.modules:
            out[lora_a(m)], out[lora_b(m)] = best_rank_r(self.dw[m], self.ranks[cid], self.scale, self.init_a[m],
                                                               self.opts.factor_split)
        return out

    def merge(self, replies, weights, held) -> None:
        total = sum(weights.values())
        for m in self.modules:
            self.dw[m] = sum(self.scale * replies[c].tensors[lora_b(m)] @ replies[c].tensors[lora_a(m)] * (w / total)
                             for c, w in weights.items())
        self._set_global_from_dw()

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return super()._snapshot() | {("dw", m): t.clone() for m, t in self.dw.items()}

    def _server_step(self, before, lr) -> None:
        """The step is taken on the full-rank product, then refactored; the head steps as usual."""
        self.dw = {m: before["dw", m] + lr * (self.dw[m] - before["dw", m]) for m in self.modules}
        self._set_global_from_dw()
        self.global_ |= {n: before[n] + lr * (self.global_[n] - before[n]) for n in self.others}

    def _set_global_from_dw(self) -> None:
        for m in self.modules:
            self.global_[lora_a(m)], self.global_[lora_b(m)] = best_rank_r(self.dw[m], self.R, self.scale, self.init_a[m],
                                                                     self.opts.factor_split)

    def tier_view(self, r, j):
        m = self.modules[j]
        a, b = best_rank_r(self.dw[m], r, self.scale, self.init_a[m], self.opts.factor_split)
        return list(range(r)), a, b


def _mask(indices: list[int]) -> int:
    """An index set as an R-bit integer (it travels in the JSON header, and is counted there)."""
    return sum(1 << i for i in indices)


def _unmask(mask, R: int) -> list[int]:
    if not isinstance(mask, int) or isinstance(mask, bool) or mask < 0 or mask >= 1 << R:
        raise PayloadError(f"component mask {mask!r} is not an {R}-bit integer")
    return [i for i in range(R) if mask >> i & 1]
