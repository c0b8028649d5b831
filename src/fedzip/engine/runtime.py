"""Everything a method needs at run time: the task, the model with LoRA, and its trainable view."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from fedzip.data import Task, TextData, load_source, partition, partition_stats
from fedzip.models import TrainableView, inject_lora, load_base_model, load_tokenizer
from fedzip.models.device import resolve_device  # noqa: F401  (re-exported: tests and apps import it here)

if TYPE_CHECKING:
    from fedzip.privacy import Randomness

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    cfg: object
    task: Task
    model: torch.nn.Module | None  # None on a client that builds its own model (Method.client_builds_model)
    view: TrainableView | None
    parts: list[np.ndarray]
    stats: dict
    step_progress: Callable[[int, int], None] | None = field(default=None)
    run_dir: Path | None = None  # where a method may keep artefacts worth reusing (e.g. a trained codec)
    # The server's DP randomness (fedzip.privacy.Randomness): the cohort and the noise. The engine sets it from
    # the checkpoint on resume; a client's runtime has none (a client draws from its own key).
    randomness: Randomness | None = None

    @property
    def client_sizes(self) -> list[int]:
        return [len(p) for p in self.parts]


def client_runtime(server: Runtime, method_cls) -> Runtime:
    """The runtime of clients that run in the server's process: the same data and partitions (read-only),
    and a model of their own, built as a deployed client builds its own (none where the method's client
    builds a smaller one from what it receives). Nothing passes from server to client but message bytes."""
    cfg = server.cfg
    model = None if method_cls.client_builds_model else build_model(cfg, method_cls, server.task)
    return Runtime(cfg=cfg, task=server.task, model=model, view=TrainableView(model) if model is not None else None,
                   parts=server.parts, stats=server.stats, step_progress=server.step_progress, run_dir=server.run_dir)


def build_task(cfg, own_train: TextData | None = None) -> Task:
    """``own_train``: a deployed node's own training data; it evaluates nothing, so no test data is loaded."""
    if own_train is not None:
        tokenizer = load_tokenizer(cfg.model.name, cfg.model.cache_dir)
        return Task(own_train, own_train.subset([]), tokenizer, cfg.data.max_length)
    train, test = load_source(cfg.data, cfg.seed, cfg.data_root())
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.cache_dir)
    task = Task(train, test, tokenizer, cfg.data.max_length)
    if cfg.deploy.client_data == "on_nodes" and task.kind == "classification" and not cfg.data.label_names:
        from fedzip.errors import ConfigError

        raise ConfigError("deploy.client_data: on_nodes needs data.label_names (the label space every node's data "
                          "is read with)")
    if cfg.model.task != "auto" and cfg.model.task != task.kind:
        from fedzip.errors import ConfigError

        raise ConfigError(f"model.task: {cfg.model.task} does not fit data source {cfg.data.source} ({task.kind})")
    if cfg.eval.ceval:
        from fedzip.data.ceval import evaluate_ceval, load_ceval

        if task.kind != "causal_lm":
            from fedzip.errors import ConfigError

            raise ConfigError("eval.ceval needs a causal-LM task")
        items = load_ceval(cfg.data_root(), "val", cfg.eval.ceval_max_per_subject)
        task.extra_evals.append(lambda model: evaluate_ceval(model, tokenizer, items, cfg.eval.batch_size))
    if cfg.eval.exact_match_examples:
        if task.kind != "causal_lm":
            from fedzip.errors import ConfigError

            raise ConfigError("eval.exact_match_examples needs a causal-LM task")
        from fedzip.data.generation import exact_match_evaluator

        task.extra_evals.append(exact_match_evaluator(task, cfg.eval.exact_match_examples, cfg.eval.max_new_tokens,
                                                      cfg.eval.batch_size, cfg.seed))
    return task


def build_model(cfg, method_cls, task: Task):
    torch.manual_seed(cfg.seed)  # the classification head's init
    model = load_base_model(cfg.model.name, task.kind, task.num_labels, cfg.model.cache_dir)
    if method_cls.uses_lora:
        lc = cfg.lora
        model = inject_lora(model, lc.rank, lc.alpha, lc.dropout, lc.target_modules, lc.train_head, cfg.seed, lc.rslora)
    method_cls.prepare_model(model, cfg)
    # Built on the CPU first so that initial weights do not depend on the device.
    return model.to(resolve_device(cfg, method_cls))


def build_runtime(cfg, method_cls, with_model: bool = True, own_train: TextData | None = None,
                  hosted: list[int] | None = None) -> Runtime:
    """``with_model=False``: a client of a method that builds its own model (no full model loaded).

    ``own_train`` and ``hosted``: a deployed node with data of its own, split among the clients it hosts with
    the run's partition scheme; the other clients' shards are empty here."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    task = build_task(cfg, own_train)
    labels = task.train_data.labels
    field_values = task.train_data.fields.get(cfg.partition.field) if cfg.partition.field else None
    if cfg.partition.scheme == "field" and field_values is None:
        from fedzip.errors import DataError

        raise DataError(f"partition.field {cfg.partition.field!r} is not a column of the training data")
    owners = list(range(cfg.num_clients)) if hosted is None else list(hosted)
    split = partition(cfg.partition.scheme, len(task.train_data), len(owners), np.random.default_rng(cfg.seed),
                      labels=labels, alpha=cfg.partition.alpha, shards_per_client=cfg.partition.shards_per_client,
                      field_values=field_values, min_examples=cfg.partition.min_examples)
    parts = [np.zeros(0, dtype=np.int64) for _ in range(cfg.num_clients)]
    for cid, shard in zip(owners, split):
        parts[cid] = shard
    stats = partition_stats(parts, labels, task.train_data.label_names)
    model = build_model(cfg, method_cls, task) if with_model else None
    from fedzip.privacy import Randomness, any_enabled

    return Runtime(cfg=cfg, task=task, model=model, view=TrainableView(model) if model is not None else None,
                   parts=parts, stats=stats, randomness=Randomness.fresh(cfg) if any_enabled(cfg) else None)
