"""FedBiOT: clients tune an adapter on a compressed emulator of the LLM; the server aligns the emulator.

Also its baselines, as variants of the same split: offsite-tuning (one client) and FedOT (FedAvg over
clients), both with adapter = the first 2 + last 2 layers and a fixed emulator of the middle.

Server (holds the full model, LoRA on every layer):
    emulator = copies of a uniform layer-drop of the teacher layers (models/emulator.py)
    pre-align the emulator's LoRA on public data for ``prealign_steps``, or until the quality gate holds
    (emulator + adapter within ``prealign_margin`` nats of the full model on held-out public data), then
    every round ``align_steps`` alignment steps on
        L = w_l2 |T(h) - E(h)|^2 / |T(h)|^2 + lambda KL(full || emulator) + w_lm CE(emulator + adapter)
    (ours: w_l2 1, lambda 0.9, w_lm 0; the authors' GSM8K code: 0, 0, 1)
        send the adapter's LoRA (+ the emulator's LoRA, which alignment changed) to the sampled clients;
        a client's first message also carries the compressed model (counted once, in that message)
        FedAvg (sample-weighted) the clients' adapter LoRA
Client (holds only the compressed model: embeddings, emulator, adapter, norm, head):
    train the adapter's LoRA on CE + eps * sum |merge(adapter) - merge(adapter at round start)|^2
    (the authors' code detaches the merged weights, so their term has no gradient: ``prox_gradient: false``)
Evaluation: AdapFu (the engine's metrics: adapter in the full model) and AdapEmu (``emu_*`` metrics).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from fedzip.data.task import model_device, to_device
from fedzip.errors import ConfigError, PayloadError
from fedzip.methods.base import ClientContext, Method, OneTimePayload, one_client, weighted_average
from fedzip.methods.state import ServerState, load_server_state, save_server_state
from fedzip.methods.training import load_optimizer_state, optimizer_state_to_tensors, round_train_config, train_locally
from fedzip.models.emulator import find_decoder_layers, make_split, swapped_layers
from fedzip.models.lora import canonical, lora_a, lora_b, lora_modules
from fedzip.registry import register_method
from fedzip.wire import Message

log = logging.getLogger(__name__)

BASE = "base::"  # prefix of the compressed model's frozen weights in the one-time message
MODEL_FILE = "fedbiot_compressed_model.safetensors"  # where a client node keeps them between rounds


class FedBiOTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter_layers: int | None = Field(None, ge=1, description="default: 2 (FedBiOT, last 2), 4 (FedOT/offsite, 2+2)")
    drop: float = Field(0.5, ge=0, lt=1, description="emulator layer-drop ratio beta")
    keep_bottom: int = Field(0, ge=0, description="teacher layers at the bottom the emulator always keeps (the "
                                                  "layer-drop spreads over the rest); 0: uniform, as the paper")
    align_l2_weight: float = Field(1.0, ge=0, description="weight of the hidden-state match in the alignment loss")
    align_lambda: float = Field(0.9, ge=0, description="weight of the KL(full || emulator) term in the alignment loss")
    align_lm_weight: float = Field(0.0, ge=0, description="weight of the compressed model's own LM loss on the "
                                                          "public data (the authors' code; their GSM8K set-up "
                                                          "aligns with it alone)")
    prox_eps: float = Field(0.1, ge=0, description="weight of the clients' proximal term on merged adapter weights")
    prox_gradient: bool = Field(True, description="false: as the authors' code, which computes the proximal term on "
                                                  "detached weights, so that it never changes training")
    prealign_steps: int = Field(50, ge=0, description="pre-alignment budget in server steps")
    prealign_margin: float | None = Field(
        None, gt=0, description="quality gate: pre-alignment stops once the emulator + adapter's LM loss on held-out "
                                "public data is within this many nats of the full model's (or at the budget)")
    prealign_check_every: int = Field(25, ge=1, description="steps between two checks of the gate")
    align_steps: int = Field(5, ge=0, description="server alignment steps each round")
    align_lr: float = Field(1e-4, gt=0)
    align_batch: int = Field(4, ge=1)
    public_data: str | None = Field(None, description="Alpaca-format JSON for alignment; default "
                                    "<data root>/instruct/alpaca_en_demo.json")
    public_max_examples: int | None = Field(512, ge=1)
    public_eval_examples: int | None = Field(None, ge=1, description="held-out public examples behind the "
                                             "pre-alignment report and gate (default: all, about 50)")
    prealign_cache: bool = Field(True, description="keep the pre-alignment in fedzip's cache folder, saved at every "
                                                   "gate check: an interrupted one continues where it stopped, a "
                                                   "finished one is reused by a run of the same set-up and seed")


@register_method
class FedBiOT(Method):
    name = "fedbiot"
    Options = FedBiOTOptions
    client_builds_model = True  # a client never loads the full model: it builds the compressed one
    # The emulator is a copy of the model's own layers (it lives where they do); the client's compressed
    # model is moved to train.device; server state and payloads are CPU tensors.
    runs_on_accelerator = True
    layout: Literal["top", "sandwich"] = "top"
    aligns = True
    resumable_options = frozenset({"prealign_cache"})

    def __init__(self, cfg, runtime):
        super().__init__(cfg, runtime)
        from transformers import AutoConfig

        from fedzip.models.load import resolve

        self.hf_config = AutoConfig.from_pretrained(resolve(cfg.model.name, cfg.model.cache_dir))
        n = int(self.hf_config.num_hidden_layers)
        a = self.opts.adapter_layers or (2 if self.layout == "top" else 4)
        try:
            self.split = make_split(n, a, self.opts.drop, self.layout, self.opts.keep_bottom)
        except Exception as exc:
            raise ConfigError(f"method_options: {exc}") from None
        o = self.opts
        if self.aligns and (o.align_steps or o.prealign_steps) and not (o.align_l2_weight or o.align_lambda
                                                                          or o.align_lm_weight):
            raise ConfigError("method_options: every alignment weight is 0 (align_l2_weight, align_lambda, "
                              "align_lm_weight); set align_steps and prealign_steps to 0 to skip alignment")
        self._compressed: CompressedModel | None = None  # the client part, built on first use

    @classmethod
    def adjust_config(cls, cfg):
        if cfg.model.task == "classification":
            raise ConfigError(f"{cls.name} needs a causal LM (decoder-only) task")
        return cfg

    # -- names -------------------------------------------------------------------------------------
    def _position(self, name: str) -> int | None:
        return layer_position(name, self._layer_attr)

    def describe(self) -> dict:
        s = self.split
        return {"layers": s.n_layers, "adapter_bottom": list(s.bottom), "adapter_top": list(s.top),
                "emulator_from_teacher_layers": list(s.emulated), "client_layers": len(s.client_layers),
                "variant": self.name, "prealignment": getattr(self, "prealignment", {})}

    # -- server ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def client_view(self):
        """The full model running as the compressed model (emulator + adapter); names come out as a client's."""
        with swapped_layers(self.rt.model, self.client_stack) as m:
            yield m

    def init_global(self) -> None:
        model = self.rt.model
        _, self._layer_attr, layers = find_decoder_layers(model)
        self.emulator = nn.ModuleList(copy.deepcopy(layers[i]) for i in self.split.emulated)
        for n, p in self.emulator.named_parameters():
            p.requires_grad_("lora_" in n)
        s = self.split
        self.client_stack = [layers[i] for i in s.bottom] + list(self.emulator) + [layers[i] for i in s.top]
        with self.client_view() as m:  # names as the client's model has them
            self.params = lora_params(m)
            # the compressed model's frozen weights (LoRA travels each round); tied weights once
            # (on the CPU: a message is made of CPU tensors; no copy when the model is on the CPU already)
            self.base = {BASE + n: t.detach().cpu() for n, t in _untied_state(m).items() if "lora_" not in n}
        self.adapter_names, self.emulator_names = roles(self.params, self._layer_attr, self.split)
        self.has_model = OneTimePayload()
        self.align_calls = 0
        emu = [self.params[n] for n in self.emulator_names]
        self.align_opt = torch.optim.AdamW(emu, lr=self.opts.align_lr) if emu else None
        self.prealignment: dict = {}
        if self.aligns and self.opts.prealign_steps:
            self.prealignment = self.prealign()

    def server_state(self) -> ServerState:
        state = ServerState({"params": {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}},
                            {"sent_model": self.has_model.fact(), "align_calls": self.align_calls})
        if self.align_opt is not None:
            state.tensors["align_optimizer"] = optimizer_state_to_tensors(self.align_opt, self.emulator_names)
        return state

    def load_server_state(self, state: ServerState) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state.group("params")[n])
        self.has_model = OneTimePayload(state.facts["sent_model"])
        self.align_calls = int(state.facts["align_calls"])
        if self.align_opt is not None:
            load_optimizer_state(self.align_opt, self.emulator_names, state.group("align_optimizer"))

    def global_tensors(self) -> dict[str, torch.Tensor]:
        return self.rt.view.get()  # the full model's LoRA: the adapter's trained, the teacher's untouched

    def configure(self, rnd: int, cids: list[int]) -> dict[int, Message]:
        if self.aligns and self.opts.align_steps:
            self.last_align_loss = self.align(self.opts.align_steps)
        per_round = self.adapter_names + (self.emulator_names if self.aligns else [])
        lora = {n: self.params[n].detach().to("cpu", copy=True) for n in per_round}
        plain = Message(lora, {"round": rnd})

        def with_model() -> Message:  # the compressed model, once per client, counted in this message's bytes
            emulator = {n: self.params[n].detach().to("cpu", copy=True) for n in self.emulator_names}
            return Message(lora | emulator | self.base, plain.meta, ledger_tag="update+compressed_model")

        return self.has_model.messages(cids, plain, with_model)

    def up_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self.params[n].shape) for n in self.adapter_names}

    def aggregate(self, rnd: int, replies: dict[int, Message]) -> dict[str, float]:
        avg = weighted_average(replies, self.adapter_names)  # validates every reply before anything changes
        self.has_model.replied(replies)  # a client whose first message or reply was lost gets the model again
        with torch.no_grad():
            for n, t in avg.items():
                self.params[n].copy_(t)
        metrics = {"align_loss": self.last_align_loss} if self.aligns and hasattr(self, "last_align_loss") else {}
        if rnd == 1 and self.prealignment:  # the pre-alignment and its gate, once
            metrics |= {k: float(v) for k, v in self.prealignment.items() if not isinstance(v, list)}  # curve: method.json
        return metrics

    def evaluate(self, rnd: int, max_examples: int | None) -> dict[str, float]:
        """AdapEmu: the adapter on the emulator (what clients train), beside the engine's AdapFu."""
        with self.client_view() as m:
            emu = self.rt.task.evaluate(m, self.cfg.eval.batch_size, max_examples, seed=self.cfg.seed)
        return {f"emu_{k}": v for k, v in emu.items() if k != "eval_examples"}

    def _public_path(self) -> Path:
        """The public data file; the default is resolved as the alpaca loader resolves it."""
        from fedzip.data.sources import DEFAULT_ALPACA

        return Path(self.opts.public_data).expanduser() if self.opts.public_data else self.cfg.data_root() / DEFAULT_ALPACA

    def _public(self):
        if not hasattr(self, "_public_task"):
            from fedzip.config import DataConfig
            from fedzip.data import Task, load_source

            data_cfg = DataConfig(source="alpaca", path=self.opts.public_data, test_fraction=0.05,
                                  max_length=self.cfg.data.max_length, max_train_examples=self.opts.public_max_examples)
            train, test = load_source(data_cfg, self.cfg.seed, self.cfg.data_root())
            self._public_task = Task(train, test, self.rt.task.tokenizer, self.cfg.data.max_length)
        return self._public_task

    def public_loss(self, emulated: bool) -> float:
        """LM loss on the held-out public data: of the full model, or of emulator + adapter (the client's model)."""
        public, ev = self._public(), self.cfg.eval
        frozen = contextlib.nullcontext(self.rt.model) if not emulated else self.client_view()
        with frozen as m:
            return public.evaluate(m, ev.batch_size, self.opts.public_eval_examples, seed=self.cfg.seed)["loss"]

    def prealign(self) -> dict:
        """Align before round 1: ``prealign_steps`` at most, fewer once the quality gate holds.

        The gate compares the emulator + adapter with the full model on held-out public data: aligned means
        within ``prealign_margin`` nats. Both losses are reported either way (round 1's metrics, method.json)."""
        opts = self.opts
        self._public()  # a missing public data file fails here, with its one clear line
        cache = self._prealign_cache_file() if opts.prealign_cache else None
        saved = self._cached_prealignment(cache) if cache is not None else None
        if saved is not None and saved["done"] > opts.prealign_steps:
            log.info("pre-alignment: the cache holds a longer one of this set-up (%d steps); aligning afresh and "
                     "leaving it there", saved["done"])
            saved, cache = None, None
        elif saved is not None and saved["done"] % opts.prealign_check_every and saved["done"] < opts.prealign_steps:
            saved = None  # a budget off the check grid: continuing it would draw other batches than one long run
        if saved is not None:
            self._restore_prealignment(saved)
            report, done, curve = saved["report"], saved["done"], saved["curve"]
            if saved["finished"] and (saved["report"].get("prealign_gate_met") or done >= opts.prealign_steps):
                log.info("pre-alignment: reusing the emulator this set-up aligned before (%d steps, from the cache)",
                         done)
                self.prealign_steps_here = 0
                return report
            log.info("pre-alignment: continuing after step %d (from the cache)", done)
        else:
            report = {"public_loss_full": self.public_loss(emulated=False),
                      "public_loss_emulator_before": self.public_loss(emulated=True)}
            done, curve = 0, []  # curve: (steps, public loss) at each check
        gate = opts.prealign_margin
        # one call without a gate: align()'s batches are drawn per call, so chunks would change them
        chunk = opts.prealign_check_every if gate is not None else opts.prealign_steps
        full, t0, start = report["public_loss_full"], time.time(), done
        log.info("pre-aligning the emulator: at most %d steps; public loss full model %.3f, emulator %.3f%s",
                 opts.prealign_steps, full, report["public_loss_emulator_before"],
                 "" if gate is None else f", gate {full + gate:.3f}")
        met = bool(curve) and gate is not None and curve[-1][1] <= full + gate
        while done < opts.prealign_steps and not met:
            steps = min(chunk, opts.prealign_steps - done)
            self.last_align_loss = self.align(steps)
            done += steps
            now = self.public_loss(emulated=True) if gate is not None else None
            if now is not None:
                curve.append([done, now])
            log.info("pre-align step %d/%d: align loss %.3f%s (%.1f s a step)", done, opts.prealign_steps,
                     self.last_align_loss, "" if now is None else f", emulator public loss {now:.3f}",
                     (time.time() - t0) / (done - start))
            met = now is not None and now <= full + gate
            if cache is not None and done < opts.prealign_steps and not met:
                self._save_prealignment(cache, report, done, curve, finished=False)
        self.prealign_steps_here = done - start  # the steps this call ran (the rest came from the cache)
        report |= {"prealign_steps_run": done, "public_loss_emulator_after": self.public_loss(emulated=True)}
        if gate is not None:
            report |= {"prealign_margin": gate, "prealign_curve": curve,
                       "prealign_gate_met": report["public_loss_emulator_after"] <= report["public_loss_full"] + gate}
        if cache is not None:
            self._save_prealignment(cache, report, done, curve, finished=True)
        return report

    def _prealign_cache_file(self) -> Path:
        """The cache entry of this pre-alignment: a hash of everything its result depends on.

        A gated pre-alignment checks (and is saved) every ``prealign_check_every`` steps, so a longer budget
        continues a shorter one exactly: the budget is not part of the key. Ungated, it is one call."""
        from fedzip.models.load import file_sha256
        from fedzip.paths import cache_root

        cfg, public = self.cfg, self._public_path()
        not_in_key = {"prealign_cache", "align_steps", "prox_eps", "prox_gradient", "public_data"}
        if self.opts.prealign_margin is not None:
            not_in_key.add("prealign_steps")
        setup = {"version": 1, "variant": self.name, "model": cfg.model.model_dump(mode="json", exclude={"cache_dir"}),
                 "dtype": str(next(self.rt.model.parameters()).dtype),
                 "lora": cfg.lora.model_dump(mode="json"), "seed": cfg.seed, "max_length": cfg.data.max_length,
                 "device": model_device(self.rt.model).type, "public_data": file_sha256(public),
                 "options": self.opts.model_dump(mode="json", exclude=not_in_key)}
        key = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:24]
        return cache_root(cfg.model.cache_dir) / "fedbiot_prealign" / f"{key}.safetensors"

    def _save_prealignment(self, path: Path, report: dict, done: int, curve: list, finished: bool) -> None:
        state = ServerState({"emulator": {n: self.params[n].detach().to("cpu", copy=True) for n in self.emulator_names},
                             "align_optimizer": optimizer_state_to_tensors(self.align_opt, self.emulator_names)},
                            {"report": report, "done": done, "curve": curve, "finished": finished,
                             "align_calls": self.align_calls,
                             "last_align_loss": self.last_align_loss if np.isfinite(self.last_align_loss) else None})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        save_server_state(state, tmp)
        tmp.replace(path)  # a reader never sees half a file

    def _cached_prealignment(self, path: Path) -> dict | None:
        """The entry's facts and tensors, or None (absent; unreadable, which costs a fresh pre-alignment)."""
        if not path.exists():
            return None
        try:
            state = load_server_state(path)
            facts = dict(state.facts)
            facts["tensors"] = {"emulator": state.group("emulator"), "optimizer": state.group("align_optimizer")}
            missing = [n for n in self.emulator_names if n not in facts["tensors"]["emulator"]]
            if missing or not {"report", "done", "curve", "finished", "align_calls"} <= set(facts):
                raise ValueError("incomplete entry")
        except Exception as exc:
            log.warning("pre-alignment cache entry %s unreadable (%s); aligning afresh", path.name, exc)
            return None
        return facts

    def _restore_prealignment(self, saved: dict) -> None:
        with torch.no_grad():
            for n in self.emulator_names:
                self.params[n].copy_(saved["tensors"]["emulator"][n])
        load_optimizer_state(self.align_opt, self.emulator_names, saved["tensors"]["optimizer"])
        loss = saved["last_align_loss"]
        self.align_calls, self.last_align_loss = int(saved["align_calls"]), float("nan") if loss is None else loss

    def align(self, steps: int) -> float:
        """Server steps on the emulator's LoRA: hidden-state match to the teacher + KL to the full model."""
        public, model, s = self._public(), self.rt.model, self.split
        frozen = [p for n, p in self.rt.view.params.items()]  # the adapter stays put while the server aligns
        for p in frozen:
            p.requires_grad_(False)
        # T(h) and E(h) are both the input of the first upper adapter layer (shared by both stacks):
        # a pre-hook records it (transformers' own hidden-state capture is not reliable across layer swaps)
        seen: dict[str, torch.Tensor] = {}

        def record(module, args, kwargs):
            seen["h"] = args[0] if args else kwargs["hidden_states"]

        hook = self.client_stack[len(s.bottom) + len(s.emulated)].register_forward_pre_hook(record, with_kwargs=True)
        rng = np.random.default_rng([self.cfg.seed, 0xA1, self.align_calls])
        self.align_calls += 1
        was_training = model.training
        model.eval()
        losses = []
        try:
            for _ in range(steps):
                idx = rng.choice(len(public.train.input_ids), size=min(self.opts.align_batch, len(public.train.input_ids)),
                                 replace=False)
                batch = to_device(public.collate(public.train, np.sort(idx)), model_device(model))
                inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
                opts = self.opts
                needs_teacher = opts.align_l2_weight > 0 or opts.align_lambda > 0
                if needs_teacher:
                    with torch.no_grad():
                        full = model(**inputs)
                        teacher = seen["h"]
                with self.client_view() as m:
                    emu = m(**inputs, labels=batch["labels"]) if opts.align_lm_weight > 0 else m(**inputs)
                    student = seen["h"]
                mask = batch["attention_mask"].unsqueeze(-1).float()
                loss = emu.loss.float() * opts.align_lm_weight if opts.align_lm_weight > 0 else 0.0
                if opts.align_l2_weight > 0:
                    l2 = (((teacher - student) ** 2) * mask).sum() / ((teacher ** 2) * mask).sum().clamp_min(1e-12)
                    loss = loss + opts.align_l2_weight * l2
                if opts.align_lambda > 0:
                    kl = torch.nn.functional.kl_div(torch.log_softmax(emu.logits.float(), -1),
                                                    torch.log_softmax(full.logits.float(), -1),
                                                    log_target=True, reduction="none").sum(-1)
                    loss = loss + opts.align_lambda * (kl * mask[..., 0]).sum() / mask.sum()
                self.align_opt.zero_grad(set_to_none=True)
                loss.backward()
                self.align_opt.step()
                losses.append(float(loss.detach()))
        finally:
            hook.remove()
            for p in frozen:
                p.requires_grad_(True)
            model.train(was_training)
        return float(np.mean(losses)) if losses else float("nan")

    # -- client ------------------------------------------------------------------------------------
    @property
    def compressed(self) -> CompressedModel:
        """The client part: the compressed model, built from the architecture config alone on first use."""
        if self._compressed is None:
            self._compressed = CompressedModel(self.hf_config, self.split, self.cfg, type(self))
        return self._compressed

    def down_spec(self, cid: int, rnd: int) -> dict[str, tuple[int, ...]]:
        return self.compressed.spec()

    def down_optional(self, cid: int, rnd: int) -> set[str]:
        return self.compressed.sent_once()

    def fit(self, client: ClientContext, message: Message) -> Message:
        compressed = self.compressed
        compressed.receive(message.tensors, client.store.root)
        params = {n: compressed.params[n] for n in compressed.adapter}
        scale = self.cfg.lora.alpha / self.cfg.lora.rank
        pairs = [(params[lora_a(m)], params[lora_b(m)]) for m in lora_modules(params)]
        start = [(scale * b @ a).detach() for a, b in pairs]
        eps = self.opts.prox_eps

        def proximal() -> torch.Tensor:  # on the merged adapter weights, against the round's start
            return eps * sum(((scale * b @ a) - w0).pow(2).sum() for (a, b), w0 in zip(pairs, start))

        train_cfg = round_train_config(self.cfg, client.round)
        steps, loss, _ = train_locally(compressed.model, params, self.rt.task, client.indices, train_cfg, client.seed,
                                       extra_loss=proximal if eps > 0 and self.opts.prox_gradient else None,
                                       progress=self.rt.step_progress)
        return Message({n: p.detach().to("cpu", copy=True) for n, p in params.items()},
                       {"num_examples": client.num_examples, "steps": steps, "train_loss": loss})


class CompressedModel:
    """FedBiOT's client part: the compressed model (adapter + emulator layers), built from the architecture
    config alone. Its frozen weights arrive once, inside the client's first message, and stay on the node;
    each round brings the LoRA of the adapter (and of the emulator, which the server aligns)."""

    def __init__(self, hf_config, split, cfg, method_cls):
        from transformers import AutoModelForCausalLM

        from fedzip.models.device import resolve_device
        from fedzip.models.lora import inject_lora

        arch = copy.deepcopy(hf_config)
        order = split.client_layers
        arch.num_hidden_layers = len(order)
        if isinstance(getattr(arch, "layer_types", None), list):  # per-layer attention kinds follow the layers
            arch.layer_types = [arch.layer_types[i] for i in order]
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(arch, dtype=torch.float32)
        if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
            eos = model.config.eos_token_id
            model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
        lc = cfg.lora
        model = inject_lora(model, lc.rank, lc.alpha, lc.dropout, lc.target_modules, False, cfg.seed, lc.rslora)
        # built on the CPU (initial weights do not depend on the device), then moved where it trains
        self.model = model.to(resolve_device(cfg, method_cls))
        _, layer_attr, _ = find_decoder_layers(self.model)
        self.params = lora_params(self.model)
        self.adapter, self.emulator = roles(self.params, layer_attr, split)
        for n, p in self.params.items():
            p.requires_grad_(n in self.adapter)
        self.base = self._frozen_by_wire_name()
        self.loaded = False  # whether the received frozen weights are in the model

    def _frozen_by_wire_name(self) -> dict[str, torch.Tensor]:
        return {BASE + canonical(n): t for n, t in _untied_state(self.model).items() if "lora_" not in n}

    def spec(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self.params.items()} | {n: tuple(t.shape) for n, t in self.base.items()}

    def sent_once(self) -> set[str]:
        """What only the first message carries (the frozen weights); the emulator's LoRA comes when aligned."""
        return set(self.emulator) | set(self.base)

    def receive(self, tensors: dict[str, torch.Tensor], store_root: Path) -> None:
        """Load a message: the frozen weights (kept on disk for later rounds), the emulator's and adapter's LoRA."""
        base = {n: t for n, t in tensors.items() if n.startswith(BASE)}
        emu = {n: t for n, t in tensors.items() if n in self.emulator}
        path = store_root / MODEL_FILE
        if base:  # first time: keep the compressed model on this node for later rounds
            missing = sorted(set(self.base) - set(base))
            if missing or len(emu) != len(self.emulator):
                raise PayloadError(f"the compressed model arrived incomplete (missing {missing[:3]})")
            if not path.exists():
                store_root.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file({k: v.contiguous() for k, v in (base | emu).items()}, str(tmp))
                tmp.replace(path)
        elif not self.loaded:
            if not path.exists():
                raise PayloadError("no compressed model on this client: the server never sent it")
            saved = load_file(str(path))
            base = {n: t for n, t in saved.items() if n.startswith(BASE)}
            emu = {n: t for n, t in saved.items() if n in self.emulator} | emu
        if base:
            own = _untied_state(self.model)
            with torch.no_grad():
                for n, t in base.items():  # adopt the received tensors: no second copy of the model in memory
                    mine = own[n[len(BASE):]]
                    mine.data = t.to(mine.device, mine.dtype).contiguous()
            self.loaded = True
            self.base = self._frozen_by_wire_name()
        with torch.no_grad():
            for n, t in emu.items():
                self.params[n].copy_(t)
            for n in self.adapter:
                self.params[n].copy_(tensors[n])


def lora_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {canonical(n): p for n, p in model.named_parameters() if "lora_" in n}


def layer_position(name: str, layer_attr: str) -> int | None:
    """Position in its model's decoder-layer list of the layer holding parameter ``name``."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit() and i > 0 and parts[i - 1] == layer_attr:
            return int(part)
    return None


def roles(names, layer_attr: str, split) -> tuple[list[str], list[str]]:
    """LoRA names of the compressed model split into (adapter, emulator) by the layer each lives in."""
    adapter, emulator = [], []
    for n in names:
        pos = layer_position(n, layer_attr)
        (emulator if pos is not None and split.role(pos) == "emulator" else adapter).append(n)
    return adapter, emulator


@register_method
class FedOT(FedBiOT):
    """FedOT baseline: adapter = first 2 + last 2 layers, a fixed emulator of the middle, FedAvg over clients."""

    name = "fedot"
    layout = "sandwich"
    aligns = False


@register_method
class OffsiteTuning(FedOT):
    """Offsite-tuning baseline: FedOT's split with a single client holding all the data."""

    name = "offsite_tuning"

    @classmethod
    def adjust_config(cls, cfg):
        return one_client(super().adjust_config(cfg))


def _untied_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical name -> tensor, each storage once (tied input/output embeddings travel once)."""
    seen, out = set(), {}
    for n, t in model.state_dict(keep_vars=True).items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[canonical(n)] = t
    return out
