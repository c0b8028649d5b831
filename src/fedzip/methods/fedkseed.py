"""FedKSeed (Qin et al., ICML 2024): full-parameter zeroth-order fine-tuning where only seeds and scalars travel.

Server and clients share K candidate seeds (derived from the run's seed: nothing is sent for them). Seed j
names a direction z_j ~ N(0, I) over every weight of the model. Per round t:
    client k: bring its model up to date by replaying the rounds it missed (below); then tau local steps:
              pick j uniformly from the K seeds, g = (L(w + eps z_j) - L(w - eps z_j)) / (2 eps) on a batch,
              w <- w - lr g z_j;  reply the sum of g per seed (a K-vector, nonzero only where a seed was used)
    server: G_t[j] = sum_k (n_k / sum_i n_i) g_k[j];  H_t = lr_t G_t;  w_{t+1} = w_t - sum_j H_t[j] z_j
Replay: a model at round t-1 becomes the model at round t by w <- w - H_t[j] z_j for the seeds j with
H_t[j] != 0, in index order. The server keeps every H_t; a client that last synchronised after round s gets
H_{s+1} .. H_{t-1} (only their nonzero entries travel) and replays them in order. Both sides run the same
floating-point operations from the same start (the pretrained model), so a client's model after replay
equals the server's bit for bit; directions are drawn on the CPU so that this holds across devices
(``directions: device`` draws them on the GPU, far faster, exact between machines of the same kind).

A client keeps the model it last synchronised to (and its round) in its state; the local steps' model is
discarded after the round, as in the paper.

FedKSeed-Pro (``seed_sampling: importance``): seeds whose projected gradients have been large matter more.
The server keeps, per seed, the mean of |g| clipped at ``amplitude_clip`` over the per-client sums it has
received (with one initial zero), min-max normalises the K means and sends their softmax as the sampling
probabilities with every message (K values, counted); clients draw seeds from it.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedzip.data.task import model_device, to_device
from fedzip.errors import PayloadError
from fedzip.methods.base import ClientContext, Method, reply_weight
from fedzip.methods.state import ServerState
from fedzip.methods.training import local_steps, round_train_config
from fedzip.registry import register_method
from fedzip.wire import Message


class FedKSeedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_seeds: int = Field(1024, ge=1, description="K, the candidate seeds shared by server and clients")
    eps: float = Field(1e-3, gt=0, description="perturbation scale of the two-point estimate")
    grad_clip: float = Field(0.0, ge=0, description="skip a step whose |g| exceeds this (0: never), as the "
                                                    "paper's code does against loss spikes")
    seed_sampling: Literal["uniform", "importance"] = Field(
        "uniform", description="uniform: FedKSeed; importance: FedKSeed-Pro, seeds drawn by probabilities the "
                               "server derives from each seed's past gradient amplitudes and sends every round")
    amplitude_clip: float = Field(0.5, gt=0, description="FedKSeed-Pro: amplitudes are clipped at this before "
                                                         "averaging, so that a loss spike does not dominate a seed")
    directions: Literal["cpu", "device"] = Field(
        "cpu", description="where directions are drawn: cpu (server and clients agree bit for bit on any "
                           "hardware) or device (the model's device: much faster on a GPU, exact only between "
                           "machines with the same kind of device)")


def candidate_seeds(run_seed: int, k: int) -> list[int]:
    return [int(s) for s in np.random.default_rng([run_seed, 2024]).integers(1, 2**62, size=k)]


def history_name(rnd: int) -> str:
    return f"history.{rnd}"


@register_method(aliases=("fed_kseed",))
class FedKSeed(Method):
    name = "fedkseed"
    uses_lora = False
    runs_on_accelerator = True
    Options = FedKSeedOptions

    def __init__(self, cfg, runtime):
        super().__init__(cfg, runtime)
        self.seeds = candidate_seeds(cfg.seed, self.opts.num_seeds)
        self.pretrained = runtime.view.get()  # every side's starting point (a client before its first round)

    @classmethod
    def prepare_model(cls, model, cfg) -> None:
        for p in model.parameters():
            p.requires_grad_(True)  # full-parameter: every weight moves (no backward pass ever runs)

    def wire_codec(self, direction: str) -> str:
        base = getattr(self.cfg.wire, direction)
        return base if base.startswith(("topk", "nonzero")) else f"nonzero+{base}"  # used seeds only

    def describe(self) -> dict:
        return {"num_seeds": self.opts.num_seeds, "eps": self.opts.eps, "model_values": self.rt.view.num_elements()}

    # -- directions ----------------------------------------------------------------------------------
    def step_along(self, seed_index: int, scale: float) -> None:
        """w <- w + scale * z_j, z_j drawn on the CPU from seed j, tensor by tensor in the view's order."""
        device = model_device(self.rt.model) if self.opts.directions == "device" else torch.device("cpu")
        gen = torch.Generator(device=device).manual_seed(self.seeds[seed_index])
        with torch.no_grad():
            for p in self.rt.view.params.values():
                z = torch.randn(p.shape, generator=gen, device=device)
                p.add_(z.to(p.device), alpha=scale)

    def replay(self, update: torch.Tensor) -> None:
        """Apply one round's H: w <- w - H[j] z_j for every j with H[j] != 0, in index order."""
        for j in torch.nonzero(update).flatten().tolist():
            self.step_along(j, -float(update[j]))

    # -- server ------------------------------------------------------------------------------------
    def init_global(self) -> None:
        self.history: list[torch.Tensor] = []  # H_1, H_2, ...: the server's whole record
        self.synced: dict[int, int] = {}  # client -> the last round whose H it holds
        k = self.opts.num_seeds
        self.amplitude = {"sum": torch.zeros(k, dtype=torch.float64), "count": torch.ones(k, dtype=torch.float64)}

    def server_state(self) -> ServerState:
        tensors = {"model": self.rt.view.get(), "amplitude": dict(self.amplitude)}
        if self.history:
            tensors["history"] = {"H": torch.stack(self.history)}
        return ServerState(tensors, {"synced": {str(c): r for c, r in self.synced.items()}})

    def load_server_state(self, state: ServerState) -> None:
        self.rt.view.set(state.group("model"))
        self.history = list(state.group("history")["H"]) if state.group("history") else []
        self.synced = {int(c): int(r) for c, r in state.facts["synced"].items()}
        self.amplitude = {k: v.clone() for k, v in state.group("amplitude").items()}

    def seed_probabilities(self) -> torch.Tensor:
        """FedKSeed-Pro: softmax of the min-max normalised mean clipped amplitude of every seed."""
        amp = self.amplitude["sum"] / self.amplitude["count"]
        return ((amp - amp.min()) / (amp.max() - amp.min() + 1e-10)).softmax(0).float()

    def global_tensors(self) -> dict[str, torch.Tensor]:
        return self.rt.view.get()

    def configure(self, rnd: int, cids: list[int]) -> dict[int, Message]:
        out = {}
        for cid in cids:
            since = self.synced.get(cid, 0)
            tensors = {history_name(r): self.history[r - 1] for r in range(since + 1, rnd)}
            if self.opts.seed_sampling == "importance":
                tensors["probs"] = self.seed_probabilities()
            out[cid] = Message(tensors, {"round": rnd, "synced": since})
        return out

    def down_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        spec = {history_name(r): (self.opts.num_seeds,) for r in range(1, rnd)}
        return spec | ({"probs": (self.opts.num_seeds,)} if self.opts.seed_sampling == "importance" else {})

    def down_optional(self, cid: int, rnd: int) -> set[str]:
        # which rounds a client missed is its own business (fit checks them); the probabilities always come
        return {n for n in self.down_spec(cid, rnd) if n != "probs"}

    def up_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        return {"grad": (self.opts.num_seeds,)}

    def aggregate(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        weights = {cid: reply_weight(r) for cid, r in replies.items()}
        total = sum(weights.values())
        grad = sum(replies[cid].tensors["grad"].double() * (w / total) for cid, w in weights.items())
        update = (round_train_config(self.cfg, rnd).lr * grad).float()
        for r in replies.values():  # FedKSeed-Pro's record: every client's sum for every seed it used
            used = r.tensors["grad"] != 0
            self.amplitude["sum"][used] += r.tensors["grad"][used].double().abs().clamp(max=self.opts.amplitude_clip)
            self.amplitude["count"][used] += 1
        self.replay(update)
        self.history.append(update)
        for cid in replies:  # a client that replied holds every update before this round
            self.synced[cid] = rnd - 1
        return {"seeds_used": float(torch.count_nonzero(update))}

    # -- client ------------------------------------------------------------------------------------
    def fit(self, client: ClientContext, message: Message) -> Message:
        view = self.rt.view
        stored = client.store.load(client.cid)
        synced = int(stored["synced_round"]) if "synced_round" in stored else 0
        since = message.meta.get("synced")
        # the server may think the client older than it is (a reply lost after the client synchronised): it then
        # resends rounds the client holds, which it skips; never newer
        if not isinstance(since, int) or isinstance(since, bool) or not 0 <= since <= synced:
            raise PayloadError(f"fedkseed: message meta 'synced' {since!r}, but client {client.cid} holds round {synced}")
        probs = message.tensors.get("probs")
        if probs is not None and (bool((probs < 0).any()) or not 0.99 < float(probs.double().sum()) < 1.01):
            raise PayloadError("fedkseed: 'probs' is not a probability vector")
        if set(message.tensors) - {"probs"} != {history_name(r) for r in range(since + 1, client.round)}:
            raise PayloadError(f"fedkseed: the message must carry the updates of rounds {since + 1} to {client.round - 1}")
        view.set({n: stored.get(f"model::{n}", self.pretrained[n]) for n in view.params})
        for r in range(synced + 1, client.round):
            self.replay(message.tensors[history_name(r)])
        current = view.get()  # the global model of this round, bit for bit
        client.store.save(client.cid, client.round, {f"model::{n}": t for n, t in current.items()} |
                          {"synced_round": torch.tensor(client.round - 1)})
        grad, steps, loss = self.zeroth_order_steps(client, probs)
        view.set(current)  # the local model is not kept: the next round starts from the replayed global one
        return Message({"grad": grad}, {"num_examples": client.num_examples, "steps": steps, "train_loss": loss})

    def zeroth_order_steps(self, client: ClientContext, probs: torch.Tensor | None) -> tuple[torch.Tensor, int, float]:
        """tau zeroth-order steps, seeds drawn uniformly or by ``probs``; returns the summed projected gradient
        per seed, the steps and the mean loss."""
        train = round_train_config(self.cfg, client.round)
        model, task, eps = self.rt.model, self.rt.task, self.opts.eps
        rng = np.random.default_rng(client.seed)
        torch.manual_seed(client.seed)
        model.eval()  # no dropout: both evaluations of a step must see the same function
        device = model_device(model)
        grad = torch.zeros(self.opts.num_seeds)
        p = None if probs is None else (probs.double() / probs.double().sum()).numpy()
        total, steps, loss_sum = local_steps(task, len(client.indices), train), 0, 0.0
        with torch.no_grad():
            while steps < total:
                for batch in task.train_batches(client.indices, train.batch_size, rng):
                    batch = to_device(batch, device)
                    j = int(rng.integers(self.opts.num_seeds) if p is None else rng.choice(self.opts.num_seeds, p=p))
                    self.step_along(j, eps)
                    plus = float(model(**batch).loss)
                    self.step_along(j, -2 * eps)
                    minus = float(model(**batch).loss)
                    self.step_along(j, eps)
                    g = (plus - minus) / (2 * eps)
                    steps += 1
                    loss_sum += (plus + minus) / 2
                    if math.isfinite(g) and not (self.opts.grad_clip and abs(g) > self.opts.grad_clip):
                        self.step_along(j, -train.lr * g)
                        grad[j] += g
                    if self.rt.step_progress is not None:
                        self.rt.step_progress(steps, total)
                    if steps >= total:
                        break
        return grad, steps, loss_sum / max(steps, 1)
