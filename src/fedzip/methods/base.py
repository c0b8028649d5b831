"""The method protocol: what every federated algorithm implements and every engine calls.

A method is a server side (``init_global``, ``configure``, ``aggregate``) and a client side (``fit``)
that exchange :class:`~fedzip.wire.Message` objects. Engines encode each message to bytes, count them,
and decode them on the other side; methods never see bytes and engines never see a method's internals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from pydantic import BaseModel

from fedzip.errors import PayloadError
from fedzip.methods.state import ServerState
from fedzip.wire import Message


@dataclass
class ClientContext:
    """What one client holds during ``fit``: its id, its data and its on-disk state store."""

    cid: int
    round: int
    indices: np.ndarray
    store: Any  # fedzip.engine.state.ClientStateStore
    seed: int

    @property
    def num_examples(self) -> int:
        return int(len(self.indices))


class Method:
    """Base class. Subclasses set ``name`` and override what differs from FedAvg-style exchange.

    One class, two parts that never share an instance: the engine builds a server part on the server's
    runtime and, for clients, another instance on a runtime of their own (a deployed client builds one from
    its config alone). The server part holds the global state (``init_global`` .. ``evaluate``, ``up_spec``);
    the client part knows only its config, its data, its on-disk store and the bytes it receives
    (``down_spec``, ``down_optional``, ``fit``). The round is always passed in, never remembered."""

    name: ClassVar[str] = ""
    uses_lora: ClassVar[bool] = True
    Options: ClassVar[type[BaseModel] | None] = None  # schema of cfg.method_options (None: must be empty)
    # True: the client side builds its own (smaller) model from bytes it receives, so a deployed client
    # never loads the full model (FedBiOT); False: clients start from the same base model as the server.
    client_builds_model: ClassVar[bool] = False
    # True when the model may live on a GPU (``train.device``): the method reads the model through
    # ``TrainableView`` (whose ``get`` returns CPU copies), keeps any tensor that meets the model's own
    # (HAFL's gradient masks, FedBiOT's emulator, CG-FedLLM's autoencoder while it trains) on the model's
    # device, and hands the wire CPU tensors. Every built-in method does; a new one opts in once checked.
    runs_on_accelerator: ClassVar[bool] = False
    # ``method_options`` keys a resumed run may change: ones that act only on work not yet checkpointed
    # (e.g. how CG-FedLLM trains its autoencoder, whose gate may have stopped the run before that round).
    resumable_options: ClassVar[frozenset[str]] = frozenset()
    # Client-level DP (``fedzip.privacy``): True when the method's server moves the model by a mean of client
    # updates that the client clips (``privacy.private_update``) and the server averages with
    # ``privacy.private_mean``, so the sensitivity bound holds for what is sent. ``local_dp``: the upload reveals
    # nothing beyond its (noisy) values, so local noise protects it too (not so for top-k positions).
    client_dp: ClassVar[bool] = False
    local_dp: ClassVar[bool] = False
    # Record-level DP-SGD (``privacy.records``): True when a client reads its data only in ``train_locally``'s
    # steps (which then run under Opacus), so everything it sends is post-processing of DP-SGD's output.
    record_dp: ClassVar[bool] = False
    # True when each client keeps a model of its own (e.g. FedSA-LoRA's B never leaves the client): there is no
    # one global model to evaluate, so the engine evaluates client models (``personal_tensors``) instead.
    personalised: ClassVar[bool] = False

    def __init__(self, cfg, runtime):
        self.cfg = cfg
        self.rt = runtime  # fedzip.engine.runtime.Runtime: model, view, task, local trainer
        self.opts = self.Options.model_validate(cfg.method_options) if self.Options else None

    def wire_codec(self, direction: str) -> str:
        """The codec for messages in ``direction`` ('down' or 'up'); methods that sparsify adapt it."""
        return getattr(self.cfg.wire, direction)

    # -- set-up ------------------------------------------------------------------------------------
    @classmethod
    def adjust_config(cls, cfg):
        """Return the config this method actually runs with (e.g. centralised forces one client)."""
        return cfg

    @classmethod
    def prepare_model(cls, model, cfg) -> None:
        """Freeze or unfreeze parameters before the trainable view is built."""

    @classmethod
    def before_export(cls, model) -> None:
        """Put the model in the form it is saved in (e.g. fold a method's own parametrisation into plain LoRA)."""

    def describe(self) -> dict[str, Any]:
        """Facts about the method's set-up worth keeping with the run (written to ``method.json``)."""
        return {}

    # -- server side -------------------------------------------------------------------------------
    def init_global(self) -> None:
        raise NotImplementedError

    def server_state(self) -> ServerState:
        """Everything the server needs to resume: global tensors, server optimiser state, facts."""
        raise NotImplementedError

    def load_server_state(self, state: ServerState) -> None:
        raise NotImplementedError

    def configure(self, rnd: int, cids: list[int]) -> dict[int, Message]:
        raise NotImplementedError

    def aggregate(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        """Move the global state by the round's decoded replies; return metrics for the round's row.

        A reply whose meta the method cannot use (e.g. a non-positive example count) raises PayloadError before
        anything is changed: the engine then finds the reply and aggregates the others without it. Under
        client-level DP it is called even with no reply, so that the round still adds its noise."""
        raise NotImplementedError

    def global_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to load into the model for evaluation and export."""
        raise NotImplementedError

    def evaluate(self, rnd: int, max_examples: int | None) -> dict[str, float]:
        """The method's own evaluations on evaluation rounds, after the engine's (e.g. FedBiOT's AdapEmu).

        They join the round's metrics and, from the last round, the run's final metrics."""
        return {}

    def up_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        """Names and shapes the server accepts from client ``cid`` in round ``rnd``."""
        raise NotImplementedError

    # -- client side -------------------------------------------------------------------------------
    def down_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        """Names and shapes client ``cid`` accepts from the server in round ``rnd``, known from the client's side alone."""
        raise NotImplementedError

    def down_optional(self, cid: int, rnd: int) -> set[str]:
        """Names in ``down_spec`` that a message may leave out (e.g. a codec sent only once)."""
        return set()

    def fit(self, client: ClientContext, message: Message) -> Message:
        """Train on ``client.indices`` from what ``message`` brought; the reply is all that leaves the client."""
        raise NotImplementedError

    def personal_spec(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the global tensors a client's own model takes from the server for personalised
        evaluation (default: the whole trainable view; a personalised method only what it shares). Both sides
        know them: the server sends exactly these, the client accepts nothing else."""
        return self.rt.view.shapes()

    def personal_tensors(self, cid: int, store, global_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Client side, for evaluation: client ``cid``'s own model given the global tensors (default: the global
        model itself; a personalised method adds what the client keeps in its ``store``)."""
        return dict(global_tensors)


class OneTimePayload:
    """Which clients hold something the server sends once per client (a compressed model, a codec, a basis).

    A client holds it once it has replied to a message sent while it lacked it: a client whose message or
    reply was lost gets it again with its next message, and that send is counted again."""

    def __init__(self, holders=()):
        self.holders: set[int] = set(holders)

    def messages(self, cids: list[int], plain: Message, with_payload: Callable[[], Message]) -> dict[int, Message]:
        """``plain`` for holders, the payload's message (built once, only if someone needs it) for the others."""
        built = None
        out = {}
        for cid in cids:
            if cid in self.holders:
                out[cid] = plain
            else:
                built = built or with_payload()
                out[cid] = built
        return out

    def replied(self, cids) -> None:
        self.holders |= set(cids)

    def reset(self) -> None:
        """Every client needs it again (the payload changed)."""
        self.holders = set()

    def fact(self) -> list[int]:
        """For the server state (JSON)."""
        return sorted(self.holders)


def one_client(cfg):
    """A copy of ``cfg`` with all data on one client, sampled every round (centralised, offsite-tuning)."""
    cfg = cfg.model_copy(deep=True)
    cfg.clients_per_round = 1  # first: the pair is validated on each assignment
    cfg.num_clients = 1
    cfg.partition.scheme = "iid"
    return cfg


@dataclass(frozen=True)
class ReplyMeta:
    """What every reply says about its client's round, validated once when the server receives it (the engine
    refuses a reply whose meta does not parse). A method's own keys (FLASC's ``dp_below``, CG-FedLLM's
    ``scale``) are the method's to check."""

    num_examples: int  # the client's training examples: weighs it in aggregation
    steps: int | None = None  # local steps it took
    train_loss: float | None = None  # its mean training loss (absent where DP keeps it home)
    record_epsilon: float | None = None  # record-level DP-SGD: its own accountant's epsilon

    @classmethod
    def parse(cls, meta: dict) -> "ReplyMeta":
        n = meta.get("num_examples")
        if not _is_int(n) or not 0 < n <= 10**12:
            raise PayloadError(f"reply meta 'num_examples' must be a positive integer, got {n!r}")
        steps = meta.get("steps")
        if steps is not None and (not _is_int(steps) or not 0 <= steps <= 10**9):
            raise PayloadError(f"reply meta 'steps' must be a non-negative integer, got {steps!r}")
        loss, eps = meta.get("train_loss"), meta.get("record_epsilon")
        for key, value, low in (("train_loss", loss, -math.inf), ("record_epsilon", eps, 0.0)):
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not math.isfinite(value) or value < low):
                raise PayloadError(f"reply meta {key!r} must be a finite number{' >= 0' if low == 0 else ''}, "
                                   f"got {value!r}")
        return cls(n, steps, None if loss is None else float(loss), None if eps is None else float(eps))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def reply_weight(reply: Message) -> int:
    """The sample count a client reports, validated: it weighs the client in aggregation."""
    return ReplyMeta.parse(reply.meta).num_examples


def weighted_average(replies: dict[int, Message], names: list[str]) -> dict[str, torch.Tensor]:
    weights = {cid: reply_weight(r) for cid, r in replies.items()}
    total = sum(weights.values())
    return {
        n: sum(replies[cid].tensors[n] * (w / total) for cid, w in weights.items())
        for n in names
    }
