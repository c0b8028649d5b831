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


def local_steps(task, n: int, train_cfg) -> int:
    total = task.steps_per_epoch(n, train_cfg.batch_size) * train_cfg.local_epochs
    return min(total, train_cfg.max_steps) if train_cfg.max_steps else total


def poisson_batches(task, indices: np.ndarray, batch_size: int, steps: int, rng: np.random.Generator):
    """DP-SGD's batches: each example joins each step independently with probability batch_size / n, as
    the accountant assumes. An empty draw is a step that releases nothing: it is skipped (and still counted)."""
    rate = min(1.0, batch_size / len(indices))
    for _ in range(steps):
        chosen = indices[rng.random(len(indices)) < rate]
        yield task.collate(task.train, chosen) if len(chosen) else None


def train_locally(model, params: dict[str, torch.nn.Parameter], task, indices: np.ndarray, train_cfg, seed: int,
                  opt_state: dict[str, torch.Tensor] | None = None, extra_loss=None, grad_hook=None, progress=None,
                  records=None):
    """Train ``params`` in place. Returns (steps, mean loss, optimizer state as named tensors).

    ``records`` (:class:`fedzip.privacy.DPSGD`): DP-SGD with Opacus, per-example gradients clipped to
    ``records.clip`` and Gaussian noise added by its DPOptimizer, on Poisson-sampled batches; the batches and the
    noise come from ``records.seed`` (the client's own key), never from ``seed`` (the run's). The loss is then
    the mean over examples of each example's own loss (:func:`per_example_loss`), so that one example's
    gradient does not depend on the others in its batch."""
    torch.manual_seed(seed)  # dropout
    rng = np.random.default_rng(seed)
    names = list(params)
    opt = make_optimizer(params, train_cfg)
    if opt_state:
        load_optimizer_state(opt, names, opt_state)
    model.train()
    device = model_device(model)
    steps, loss_sum = 0, 0.0
    total = local_steps(task, len(indices), train_cfg)
    forward, epochs, batches = model, train_cfg.local_epochs, None
    if records is not None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        forward = GradSampleModule(model)  # hooks that keep each example's gradient of every trainable tensor
        noise = torch.Generator(device=device)
        noise.manual_seed(records.seed)
        opt = DPOptimizer(opt, noise_multiplier=records.noise_multiplier, max_grad_norm=records.clip,
                          expected_batch_size=train_cfg.batch_size, generator=noise)
        epochs = 1
        batches = poisson_batches(task, indices, train_cfg.batch_size, total, np.random.default_rng(records.seed))
    # bf16 autocast (GPU only): matmuls in bfloat16, weights, gradients and optimizer state stay fp32
    autocast = train_cfg.precision == "bf16" and device.type == "cuda"
    try:
        steps, loss_sum = _steps(forward, opt, task, indices, train_cfg, rng, device, autocast, total, epochs, batches,
                                 extra_loss, grad_hook, progress)
    finally:
        if records is not None:  # the model is reused (next client, evaluation): take Opacus's hooks off it
            forward._close()
            for p in params.values():
                p.grad_sample = None
    state = optimizer_state_to_tensors(opt.original_optimizer if records is not None else opt, names) \
        if train_cfg.persist_optimizer_state else {}
    return steps, loss_sum / max(steps, 1), state


def _steps(model, opt, task, indices, train_cfg, rng, device, autocast, total, epochs, batches, extra_loss,
           grad_hook, progress):
    steps, loss_sum = 0, 0.0
    for _ in range(epochs):
        for batch in batches if batches is not None else task.train_batches(indices, train_cfg.batch_size, rng):
            if batch is None:  # an empty Poisson draw
                steps += 1
                if steps >= total:
                    break
                continue
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                if batches is not None and task.kind == "causal_lm":  # DP-SGD: each example's loss on its own
                    batch = to_device(batch, device)
                    labels = batch.pop("labels")
                    data_loss = per_example_loss(model(**batch).logits, labels).mean()
                else:
                    data_loss = model(**to_device(batch, device)).loss
                loss = data_loss.float()
                if extra_loss is not None:
                    loss = loss + extra_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_hook is not None:
                grad_hook()
            opt.step()
            steps += 1
            loss_sum += float(data_loss.detach())
            if progress is not None:
                progress(steps, total)
            if steps >= total:
                break
        if steps >= total:
            break
    return steps, loss_sum


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, ignore: int = -100) -> torch.Tensor:
    """A causal LM's loss per example: the mean over that example's own target tokens (next-token shift).

    Hugging Face's loss is the mean over every target token of the batch, so an example's weight in it, and its
    gradient, depend on how many tokens the other examples have: per-example clipping then bounds nothing about
    one record. The mean of these per-example means does not mix examples."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    token = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                                              ignore_index=ignore, reduction="none").view(shift_labels.shape)
    counts = (shift_labels != ignore).sum(dim=1)
    return token.sum(dim=1) / counts.clamp(min=1)
