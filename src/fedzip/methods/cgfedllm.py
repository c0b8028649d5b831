"""CG-FedLLM (arXiv 2405.13746): a learned autoencoder compresses client uploads.

ALGORITHMS.md section 5. Each client's data is split into a TGAP share (30% by default) and the rest.
    rounds 1..T (TGAP): FedIT on the TGAP share with uncompressed uploads; the server records every
        client's factor map every round (the temporal ensemble; with ``tgap_snapshots`` n > 1 clients
        also upload their delta after every 1/n of their local steps, counted); after round T it trains
        the autoencoder on them (MSE, Adam, early stopping on the most recent maps held out), saves it to
        the run directory for reuse, and runs the quality gate: on the held-out maps the autoencoder
        must beat the zero output and a random projection with a least-squares decoder at the same
        latent size, or the run stops (``ae_gate``). An autoencoder the paper's 30 epochs at lr 2e-4
        leave under-trained decodes every map to nearly the zero output; the gate catches exactly that.
    rounds T+1.. (FAF): FedIT on the rest; each client receives the encoder once (its bytes are in that
        round's download), encodes its normalised factor map (per-round change by default, or its LoRA
        state) and uploads the latent plus one scale; the server decodes, rebuilds each client's LoRA and
        averages (sample-weighted); the broadcast stays uncompressed. The autoencoder stays frozen unless
        ``online_every`` > 0 (beyond the paper): then calibration rounds upload true maps, the server
        fine-tunes the autoencoder on them and re-ships the encoder, all counted.
Trainable tensors outside LoRA (a classification head) travel dense. Reconstruction diagnostics (both SNR
definitions and cosine) are computed in simulation only, from the true map the client kept aside: they
cost no protocol bytes and are not available in a real deployment.
"""

from __future__ import annotations

import json
import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import load_file, save_file

from fedzip.data.task import model_device
from fedzip.errors import ConfigError, PayloadError, QualityGateError
from fedzip.methods.autoencoder import (
    BlockLinearAutoencoder,
    ConvAutoencoder,
    autoencoder_cosine,
    cosine,
    from_map,
    gate_baselines,
    make_layout,
    normalise,
    snr_db,
    snr_paper,
    to_map,
    train_autoencoder,
)
from fedzip.methods.base import ClientContext, Method, OneTimePayload, weighted_average
from fedzip.methods.state import ServerState
from fedzip.methods.training import round_train_config, train_locally
from fedzip.models.lora import is_lora
from fedzip.registry import register_method
from fedzip.rundir import RunDir
from fedzip.wire import Message

ENC = "enc::"
SNAPSHOTS = "tgap_snapshots"  # a TGAP reply's extra maps: (n - 1, H, W), the last snapshot is the reply itself


class CgOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tgap_share: float = Field(0.3, gt=0, lt=1, description="share of each client's data used by TGAP")
    tgap_rounds: int = Field(5, ge=0, description="rounds of the TGAP phase (0 with autoencoder_path)")
    autoencoder: Literal["conv", "linear"] = "conv"
    linear_block: int = Field(256, ge=2)
    linear_ratio: int = Field(64, ge=1)
    ae_epochs: int = Field(400, ge=1, description="most TGAP epochs (early stopping usually ends sooner)")
    ae_lr: float = Field(1e-3, gt=0)
    ae_batch: int = Field(8, ge=1)
    ae_patience: int = Field(30, ge=0, description="stop after this many epochs without a better held-out "
                                                   "loss (0: run every epoch, keep the best)")
    ae_heldout: float = Field(0.2, ge=0, lt=1, description="share of the recorded maps held out (the most "
                                                           "recent ones, closest to what FAF encodes)")
    ae_gate: Literal["stop", "warn", "off"] = Field(
        "stop", description="quality gate after TGAP: on held-out maps the autoencoder's cosine must beat the "
                            "zero output and a random projection with a least-squares decoder at the same "
                            "latent size; stop: a failing run ends with one error; warn: it goes on and "
                            "every report says so")
    tgap_snapshots: int = Field(1, ge=1, description="maps a client records per TGAP round: its delta after "
                                                     "every 1/n of its local steps (uploaded, counted); 1: the "
                                                     "round's delta only, the paper's temporal ensemble")
    representation: Literal["delta", "state"] = "delta"
    map_layout: Literal["paper", "packed"] = Field("paper", description="factor map: side by side, or packed")
    autoencoder_path: str | None = None
    # Beyond the paper's frozen autoencoder: every `online_every` FAF rounds is a calibration round in which
    # clients upload their true map (dense, counted); the server averages those exactly, fine-tunes the
    # autoencoder on them for `online_epochs`, and ships the new encoder to each client again (counted).
    online_every: int = Field(0, ge=0, description="FAF rounds between calibration rounds; 0 = frozen")
    online_epochs: int = Field(5, ge=1)

    @field_validator("ae_gate", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML reads a bare `off` as false


@register_method
class CgFedLLM(Method):
    name = "cgfedllm"
    Options = CgOptions
    # The model trains on train.device; the autoencoder trains there too (TGAP) and then encodes and
    # decodes on the CPU, like every payload; clients read and write the model through TrainableView.
    runs_on_accelerator = True
    # how the autoencoder trains and is judged acts at TGAP's last round only: a run the gate stopped (before
    # that round's checkpoint) resumes with other values, and the rounds before are kept
    resumable_options = frozenset({"ae_epochs", "ae_lr", "ae_batch", "ae_patience", "ae_gate"})

    def __init__(self, cfg, runtime):
        super().__init__(cfg, runtime)
        if self.opts.tgap_rounds >= cfg.rounds:
            raise ConfigError(f"method_options.tgap_rounds ({self.opts.tgap_rounds}) must be below rounds ({cfg.rounds})")
        if self.opts.tgap_rounds == 0 and not self.opts.autoencoder_path:
            raise ConfigError("method_options: tgap_rounds 0 needs autoencoder_path (a trained autoencoder)")
        shapes = runtime.view.shapes()
        self.lora = [n for n in shapes if is_lora(n)]
        self.others = [n for n in shapes if n not in self.lora]
        self.ae = self._new_autoencoder()
        self.layout = make_layout({n: shapes[n] for n in self.lora}, stride=self.ae.stride,
                                  packing=self.opts.map_layout)
        # Simulation-only diagnostics, never sent: the client side leaves each true map here for the server.

    def _new_autoencoder(self):
        torch.manual_seed(self.cfg.seed)
        if self.opts.autoencoder == "conv":
            return ConvAutoencoder().eval()
        return BlockLinearAutoencoder(self.opts.linear_block, self.opts.linear_ratio).eval()

    def encoder_state(self) -> dict[str, torch.Tensor]:
        enc = self.ae.encoder if self.opts.autoencoder == "conv" else self.ae.enc
        return {ENC + k: v.float() for k, v in enc.state_dict().items()}

    def load_encoder(self, tensors: dict[str, torch.Tensor]) -> None:
        enc = self.ae.encoder if self.opts.autoencoder == "conv" else self.ae.enc
        ref = enc.state_dict()
        enc.load_state_dict({k: tensors[ENC + k].to(ref[k].dtype) for k in ref})

    def phase(self, rnd: int) -> str:
        return "tgap" if rnd <= self.opts.tgap_rounds else "faf"

    def calibrates(self, rnd: int) -> bool:
        every = self.opts.online_every
        return bool(every) and self.phase(rnd) == "faf" and (rnd - self.opts.tgap_rounds) % every == 0

    def describe(self) -> dict:
        latent = self._latent_numel()
        return {"map_shape": [self.layout.height, self.layout.width], "map_padding": round(self.layout.padding, 4),
                "latent_values": latent,
                "encoder_params": sum(v.numel() for v in self.encoder_state().values()),
                "lora_values": sum(math.prod(self.rt.view.shapes()[n]) for n in self.lora)}

    def _latent_numel(self) -> int:
        with torch.no_grad():
            return int(self.ae.encode(torch.zeros(self.layout.height, self.layout.width)).numel())

    def _latent_shape(self) -> tuple[int, ...]:
        with torch.no_grad():
            return tuple(self.ae.encode(torch.zeros(self.layout.height, self.layout.width)).shape)

    # -- server ------------------------------------------------------------------------------------
    def init_global(self) -> None:
        self.global_ = self.rt.view.get()
        self.maps: list[torch.Tensor] = []
        self.ae_trained = False
        self.has_encoder = OneTimePayload()
        if self.opts.autoencoder_path:
            try:
                self.ae.load_state_dict(load_file(self.opts.autoencoder_path))
            except Exception as exc:
                raise ConfigError(f"method_options.autoencoder_path: cannot load {self.opts.autoencoder_path}: {exc}") from None
            self.ae_trained = True

    def server_state(self) -> ServerState:
        state = ServerState({"global": dict(self.global_)}, {"has_encoder": self.has_encoder.fact()})
        if self.maps:
            state.tensors["tgap"] = {"maps": torch.stack(self.maps)}
        if self.ae_trained:
            state.tensors["autoencoder"] = {k: v.float() for k, v in self.ae.state_dict().items()}
        return state

    def load_server_state(self, state: ServerState) -> None:
        self.global_ = {n: state.group("global")[n].clone() for n in self.global_}
        self.has_encoder = OneTimePayload(state.facts["has_encoder"])
        self.maps = list(state.group("tgap")["maps"]) if state.group("tgap") else []
        if state.group("autoencoder"):
            ref = self.ae.state_dict()
            self.ae.load_state_dict({k: state.group("autoencoder")[k].to(ref[k].dtype) for k in ref})
            self.ae_trained = True

    def global_tensors(self) -> dict[str, torch.Tensor]:
        return self.global_

    def configure(self, rnd: int, cids: list[int]) -> dict[int, Message]:
        plain = Message(self.global_, {"round": rnd, "phase": self.phase(rnd), "calibrate": self.calibrates(rnd)})
        if self.phase(rnd) != "faf":
            return dict.fromkeys(cids, plain)
        # the encoder is shipped once, counted then
        return self.has_encoder.messages(cids, plain, lambda: Message(self.global_ | self.encoder_state(), plain.meta))

    def down_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        shapes = self.rt.view.shapes()
        return shapes | {n: tuple(t.shape) for n, t in self.encoder_state().items()}

    def down_optional(self, cid: int, rnd: int) -> set[str]:
        return set(self.encoder_state())  # sent once, with a client's first FAF round

    def up_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        if self.calibrates(rnd):
            return {n: tuple(self.global_[n].shape) for n in self.others} | {"map": (self.layout.height, self.layout.width)}
        if self.phase(rnd) == "faf":
            return {n: tuple(self.global_[n].shape) for n in self.others} | {"latent": self._latent_shape()}
        spec = {n: tuple(t.shape) for n, t in self.global_.items()}
        if self.opts.tgap_snapshots > 1:
            spec[SNAPSHOTS] = (self.opts.tgap_snapshots - 1, self.layout.height, self.layout.width)
        return spec

    def aggregate(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.phase(rnd) == "tgap":
            averaged = weighted_average(replies, list(self.global_))  # validates every reply before anything changes
            for r in replies.values():
                if SNAPSHOTS in r.tensors:
                    self.maps.extend(r.tensors[SNAPSHOTS])
                self.maps.append(to_map(self._representation(r.tensors, self.global_), self.layout))
            self.global_ = averaged
            if rnd == self.opts.tgap_rounds and not self.ae_trained:
                metrics |= self._train_and_gate()
                self.ae_trained, self.maps = True, []
            return metrics
        if self.calibrates(rnd):
            return self._calibrate(rnd, replies)
        for r in replies.values():  # every reply checked before anything changes (Method.aggregate)
            scale = r.meta.get("scale")
            if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
                raise PayloadError(f"reply meta 'scale' must be a finite non-negative number, got {scale!r}")
        # a client holds the encoder once it has replied in FAF: one whose message or reply was lost gets it again
        self.has_encoder.replied(replies)
        rebuilt, diag = {}, []
        for cid, r in replies.items():
            scale = r.meta["scale"]
            with torch.no_grad():
                x_hat = self._decode(r.tensors["latent"]) * scale
            rep = from_map(x_hat, self.layout)
            lora = {n: self.global_[n] + rep[n] for n in self.lora} if self.opts.representation == "delta" else rep
            rebuilt[cid] = Message(lora | {n: r.tensors[n] for n in self.others}, r.meta)
            true = r.diagnostics.get("true_map")  # simulation only: the map the latent encodes
            if true is not None:
                diag.append((snr_paper(true, x_hat), snr_db(true, x_hat), cosine(true, x_hat)))
        self.global_ = weighted_average(rebuilt, list(self.global_))
        if diag:
            d = np.array(diag)
            finite = lambda col: float(np.mean(col[np.isfinite(col)])) if np.isfinite(col).any() else float("inf")  # noqa: E731
            metrics |= {"snr_paper": finite(d[:, 0]), "snr_db": finite(d[:, 1]), "cosine": float(d[:, 2].mean())}
        return metrics

    def _representation(self, tensors: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.opts.representation == "delta":
            return {n: tensors[n] - start[n] for n in self.lora}
        return {n: tensors[n] for n in self.lora}

    def _train_and_gate(self) -> dict[str, float | str]:
        """TGAP's end: fit the autoencoder with early stopping on the most recent maps, then the quality gate.

        The gate compares, on those held-out maps, the autoencoder's mean cosine with codecs that send as
        many values (autoencoder.gate_baselines). It must beat the zero output and the random projection;
        block PCA and top-k are logged beside it. The numbers go to the metrics and ``autoencoder_gate.json``."""
        opts = self.opts
        # at least two maps to train on and one to judge by; fewer recorded maps train ungated
        held = max(1, round(opts.ae_heldout * len(self.maps))) if opts.ae_heldout > 0 and len(self.maps) >= 3 else 0
        ungated = None
        if held == 0 and opts.ae_gate != "off":
            ungated = (f"{len(self.maps)} TGAP map(s) recorded with ae_heldout {opts.ae_heldout}: too few for the quality "
                       "gate, the autoencoder went ungated")
            if opts.ae_gate == "stop":
                raise ConfigError(f"method_options: {ungated}; more tgap_rounds or tgap_snapshots, ae_heldout > 0, or "
                                  "ae_gate: warn / off")
        train, heldout = self.maps[:len(self.maps) - held], self.maps[len(self.maps) - held:]
        log = train_autoencoder(self.ae, train, opts.ae_epochs, opts.ae_lr, opts.ae_batch, self.cfg.seed,
                                device=model_device(self.rt.model), heldout=heldout or None, patience=opts.ae_patience)
        metrics: dict[str, float | str] = {
            "tgap_loss_first": log.train_loss[0], "tgap_loss_last": log.train_loss[log.best_epoch - 1],
            "tgap_maps": len(train), "tgap_heldout_maps": len(heldout),
            "ae_epochs_run": len(log.train_loss), "ae_best_epoch": log.best_epoch}
        if heldout:
            metrics["ae_heldout_mse"] = log.heldout_loss[log.best_epoch - 1]
        if self.rt.run_dir is not None:
            save_file({k: v.contiguous().float() for k, v in self.ae.state_dict().items()},
                      str(self.rt.run_dir / "autoencoder.safetensors"))
        if opts.ae_gate == "off":
            return metrics
        if ungated:
            return metrics | {"warning": ungated}
        cos = {"autoencoder": autoencoder_cosine(self.ae, heldout)}
        cos |= gate_baselines(train, heldout, self._latent_numel(), block=opts.linear_block, seed=self.cfg.seed)
        passed = cos["autoencoder"] > max(cos["zero"], cos["random_projection"])
        metrics |= {f"gate_cosine_{k}": v for k, v in cos.items()} | {"gate_passed": float(passed)}
        if self.rt.run_dir is not None:
            RunDir(self.rt.run_dir).autoencoder_gate.write_text(json.dumps(
                {"passed": passed, "heldout_maps": len(heldout), "training_maps": len(train),
                 "latent_values": self._latent_numel(), "cosine": cos, "epochs_run": len(log.train_loss),
                 "best_epoch": log.best_epoch, "stopped_early": log.stopped_early,
                 "train_loss": log.train_loss, "heldout_loss": log.heldout_loss}, indent=1))
        if not passed:
            verdict = (f"the autoencoder failed its quality gate: held-out cosine {cos['autoencoder']:.3f} vs "
                       f"{cos['random_projection']:.3f} for a random projection at the same size (zero output 0, "
                       f"block PCA {cos['block_pca']:.3f}, top-k {cos['topk']:.3f})")
            if opts.ae_gate == "stop":
                raise QualityGateError(f"{verdict}; resume with other ae_epochs / ae_lr / ae_patience (the rounds "
                                       f"before are kept), or with ae_gate: warn to go on anyway")
            metrics["warning"] = verdict
        return metrics

    def _calibrate(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        """A calibration round: exact averaging of the true maps, then the autoencoder learns from them."""
        maps, rebuilt = [], {}
        for cid, r in replies.items():
            x = r.tensors["map"]
            maps.append(x)
            rep = from_map(x, self.layout)
            lora = {n: self.global_[n] + rep[n] for n in self.lora} if self.opts.representation == "delta" else rep
            rebuilt[cid] = Message(lora | {n: r.tensors[n] for n in self.others}, r.meta)
        self.global_ = weighted_average(rebuilt, list(self.global_))
        log = train_autoencoder(self.ae, maps, self.opts.online_epochs, self.opts.ae_lr, self.opts.ae_batch,
                                self.cfg.seed + rnd, device=model_device(self.rt.model))
        self.has_encoder.reset()  # every client gets the refreshed encoder with its next message
        return {"online_loss_first": log.train_loss[0], "online_loss_last": log.train_loss[-1]}

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        if self.opts.autoencoder == "conv":
            return self.ae.decode(latent)
        return self.ae.decode_to(latent, (self.layout.height, self.layout.width))

    # -- client ------------------------------------------------------------------------------------
    def split(self, client: ClientContext) -> np.ndarray:
        """The client's TGAP share or the rest, by a permutation fixed per client."""
        idx = np.random.default_rng([self.cfg.seed, client.cid, 0xC6]).permutation(client.indices)
        cut = max(1, math.ceil(self.opts.tgap_share * len(idx)))
        part = idx[:cut] if self.phase(client.round) == "tgap" else idx[cut:]
        return np.sort(part if len(part) else idx[:1])

    def fit(self, client: ClientContext, message: Message) -> Message:
        view = self.rt.view
        start = {n: message.tensors[n] for n in view.names()}
        view.set(start)
        indices = self.split(client)
        snapshots: list[torch.Tensor] = []
        tgap = self.phase(client.round) == "tgap"
        want = self.opts.tgap_snapshots - 1 if tgap else 0

        def progress(step: int, total: int) -> None:
            if self.rt.step_progress is not None:
                self.rt.step_progress(step, total)
            # the delta after every 1/n of the round's steps (the last one is the reply itself)
            due = sum(1 for i in range(1, want + 1) if max(1, round(total * i / (want + 1))) == step)
            if due:
                snapshot = to_map(self._representation(view.get(self.lora), start), self.layout)
                snapshots.extend([snapshot] * due)

        steps, loss, _ = train_locally(self.rt.model, view.params, self.rt.task, indices,
                                       round_train_config(self.cfg, client.round), client.seed, progress=progress)
        meta = {"num_examples": int(len(indices)), "steps": steps, "train_loss": loss}
        trained = view.get()
        if tgap:
            if want:
                final = to_map(self._representation(trained, start), self.layout)
                snapshots += [final] * (want - len(snapshots))  # a client with fewer steps than snapshots
                return Message(trained | {SNAPSHOTS: torch.stack(snapshots[:want])}, meta)
            return Message(trained, meta)
        if any(n.startswith(ENC) for n in message.tensors):  # first FAF round for this client: keep the encoder
            enc = {n: t for n, t in message.tensors.items() if n.startswith(ENC)}
            client.store.save(client.cid, client.round, enc)
        else:
            enc = client.store.load(client.cid)
            if not enc:
                raise PayloadError("an FAF round without the encoder: the server never sent it to this client")
        self.load_encoder(enc)
        x = to_map(self._representation(trained, start), self.layout)
        if message.meta.get("calibrate") is True:  # the server asked for the true map this round
            return Message({"map": x} | {n: trained[n] for n in self.others}, meta)
        xn, scale = normalise(x)
        with torch.no_grad():
            latent = self.ae.encode(xn)
        return Message({"latent": latent} | {n: trained[n] for n in self.others}, meta | {"scale": scale},
                       diagnostics={"true_map": x})
