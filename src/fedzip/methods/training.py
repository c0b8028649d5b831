"""Local training shared by methods: E epochs (or a step cap) of a chosen optimizer over a client's data.

Optimizer state can persist between a client's rounds; it is flattened to named tensors so that the
engine's on-disk client store (safetensors) can hold it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedzip.data.task import model_device, to_device


def round_train_config(cfg, rnd: int):
    """``cfg.train`` with the learning rate of round ``rnd`` (1-based) under ``train.lr_schedule``.

    A client computes it from its own config and the round number it is told, so simulation and
    deployment agree. Cosine decay over rounds is the usual way to let federated SGD settle: without it a
    curve keeps swinging with the last rounds' noise and "the round a target is first reached" with it."""
    train = cfg.train
    if train.lr_schedule == "constant":
        return train
    progress = min(max(rnd - 1, 0) / max(cfg.rounds, 1), 1.0)  # 0 in round 1; the last round keeps a small lr
    ratio = train.lr_final_ratio
    lr = train.lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return train.model_copy(update={"lr": lr})


def make_optimizer(params: dict[str, torch.nn.Parameter], train_cfg):
    plist = list(params.values())
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(plist, lr=train_cfg.lr, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay,
                               nesterov=train_cfg.nesterov and train_cfg.momentum > 0)
    return torch.optim.AdamW(plist, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


def optimizer_state_to_tensors(opt, names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            as_tensor = torch.as_tensor(value).detach().clone()
            out[f"{names[i]}::{key}"] = as_tensor.float() if key == "step" else as_tensor
    return out


def load_optimizer_state(opt, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
    if not tensors:
        return
    sd = opt.state_dict()
    state = {}
    for i, n in enumerate(names):
        entries = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == n}
        if entries:
            state[i] = entries
    sd["state"] = state
    opt.load_state_dict(sd)


def train_locally(model, params: dict[str, torch.nn.Parameter], task, indices: np.ndarray, train_cfg, seed: int,
                  opt_state: dict[str, torch.Tensor] | None = None, extra_loss=None, grad_hook=None, progress=None):
    """Train ``params`` in place. Returns (steps, mean loss, optimizer state as named tensors)."""
    torch.manual_seed(seed)  # dropout
    rng = np.random.default_rng(seed)
    names = list(params)
    opt = make_optimizer(params, train_cfg)
    if opt_state:
        load_optimizer_state(opt, names, opt_state)
    model.train()
    device = model_device(model)
    steps, loss_sum = 0, 0.0
    total = task.steps_per_epoch(len(indices), train_cfg.batch_size) * train_cfg.local_epochs
    if train_cfg.max_steps:
        total = min(total, train_cfg.max_steps)
    # bf16 autocast (GPU only): matmuls in bfloat16, weights, gradients and optimizer state stay fp32
    autocast = train_cfg.precision == "bf16" and device.type == "cuda"
    for _ in range(train_cfg.local_epochs):
        for batch in task.train_batches(indices, train_cfg.batch_size, rng):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                out = model(**to_device(batch, device))
                loss = out.loss.float()
                if extra_loss is not None:
                    loss = loss + extra_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_hook is not None:
                grad_hook()
            opt.step()
            steps += 1
            loss_sum += float(out.loss.detach())
            if progress is not None:
                progress(steps, total)
            if steps >= total:
                break
        if steps >= total:
            break
    state = optimizer_state_to_tensors(opt, names) if train_cfg.persist_optimizer_state else {}
    return steps, loss_sum / max(steps, 1), state
