"""A task: tokenized train/test data, per-client batches, and evaluation.

Classification examples are ``(input_ids, label)``; causal-LM examples are ``prompt + answer`` with
the loss taken on the answer tokens only (prompt positions are labelled -100).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from fedzip.data.sources import TextData

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[list[int]]
    labels: list[int] | list[list[int]]


class Task:
    def __init__(self, train: TextData, test: TextData, tokenizer, max_length: int):
        self.train_data, self.test_data = train, test
        self.kind = "classification" if train.is_classification else "causal_lm"
        self.num_labels = len(train.label_names) if self.kind == "classification" else None
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.max_length = max_length
        self.train = self._encode(train)
        self.test = self._encode(test)
        self.extra_evals: list = []  # callables model -> metrics dict, run with every evaluation

    # -- tokenization ------------------------------------------------------------------------------
    def _encode(self, data: TextData) -> Encoded:
        if len(data) == 0:  # e.g. a deployed node's test split: it evaluates nothing
            return Encoded([], [])
        tok = self.tokenizer
        if self.kind == "classification":
            ids = tok(data.texts, truncation=True, max_length=self.max_length)["input_ids"]
            return Encoded(ids, list(data.labels))
        prompts = [self.format_prompt(p) for p in data.texts]
        p_ids = tok(prompts, add_special_tokens=True)["input_ids"]
        a_ids = tok([a for a in data.answers], add_special_tokens=False)["input_ids"]
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        inputs, labels = [], []
        for p, a in zip(p_ids, a_ids):
            a = a + eos
            # Keep the whole answer where possible: cut the prompt from the left first.
            room = max(self.max_length - len(a), self.max_length // 4)
            p = p[-room:]
            seq = (p + a)[: self.max_length]
            lab = ([IGNORE] * len(p) + a)[: self.max_length]
            inputs.append(seq)
            labels.append(lab)
        return Encoded(inputs, labels)

    def format_prompt(self, prompt: str) -> str:
        return f"Question: {prompt.strip()}\nAnswer: "

    # -- batching ----------------------------------------------------------------------------------
    def collate(self, enc: Encoded, idx) -> dict[str, torch.Tensor]:
        seqs = [enc.input_ids[i] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.kind == "classification":
            batch["labels"] = torch.tensor([enc.labels[i] for i in idx], dtype=torch.long)
        else:
            lab = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
            for r, row in enumerate(enc.labels[i] for i in idx):
                lab[r, : len(row)] = torch.tensor(row)
            batch["labels"] = lab
        return batch

    def train_batches(self, indices: np.ndarray, batch_size: int, rng: np.random.Generator) -> Iterator[dict]:
        order = rng.permutation(indices)
        for s in range(0, len(order), batch_size):
            yield self.collate(self.train, order[s : s + batch_size])

    def steps_per_epoch(self, n: int, batch_size: int) -> int:
        return math.ceil(n / batch_size)

    # -- evaluation --------------------------------------------------------------------------------
    def eval_indices(self, max_examples: int | None = None, seed: int = 0) -> np.ndarray:
        """The whole test set, or its fixed random subset of ``max_examples`` (the same for every round)."""
        n = len(self.test.input_ids)
        if max_examples is not None and max_examples < n:
            return np.sort(np.random.default_rng(seed).permutation(n)[:max_examples])
        return np.arange(n)

    @torch.no_grad()
    def score(self, model, indices, batch_size: int = 64) -> EvalScores:
        """The summed loss, its count (examples or target tokens) and the predictions of ``model`` on ``indices``."""
        idx = sorted(np.asarray(indices), key=lambda i: len(self.test.input_ids[i]))  # length-sorted: little padding
        was_training = model.training
        model.eval()
        scores = EvalScores()
        device = model_device(model)
        for s in range(0, len(idx), batch_size):
            batch = to_device(self.collate(self.test, idx[s : s + batch_size]), device)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = out.logits.float()
            if self.kind == "classification":
                loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
                scores.count += len(batch["labels"])
                scores.preds += logits.argmax(-1).tolist()
                scores.golds += batch["labels"].tolist()
            else:
                shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                    ignore_index=IGNORE, reduction="sum")
                scores.count += int((shift_labels != IGNORE).sum())
            scores.loss_sum += loss.item()
            scores.examples += len(batch["input_ids"])
        model.train(was_training)
        return scores

    def metrics(self, scores: EvalScores) -> dict[str, float]:
        mean_loss = scores.loss_sum / max(scores.count, 1)
        if self.kind == "classification":
            return {"accuracy": accuracy(scores.preds, scores.golds),
                    "macro_f1": macro_f1(scores.preds, scores.golds, self.num_labels), "loss": mean_loss,
                    "eval_examples": scores.examples}
        return {"loss": mean_loss, "perplexity": math.exp(min(mean_loss, 50.0)), "eval_examples": scores.examples}

    def evaluate(self, model, batch_size: int = 64, max_examples: int | None = None, seed: int = 0,
                 indices=None) -> dict[str, float]:
        """On the test set, a fixed random subset of ``max_examples`` of it, or the test ``indices`` given."""
        idx = self.eval_indices(max_examples, seed) if indices is None else indices
        out = self.metrics(self.score(model, idx, batch_size))
        if self.kind != "classification":
            for extra in self.extra_evals:
                out.update(extra(model))
        return out


@dataclass
class EvalScores:
    """What evaluations of one or several models add up to: pooled, they give one set of metrics."""

    loss_sum: float = 0.0
    count: int = 0  # examples (classification) or target tokens (causal LM): the loss's denominator
    examples: int = 0
    preds: list[int] = field(default_factory=list)
    golds: list[int] = field(default_factory=list)

    def __iadd__(self, other: EvalScores) -> EvalScores:
        self.loss_sum += other.loss_sum
        self.count += other.count
        self.examples += other.examples
        self.preds += other.preds
        self.golds += other.golds
        return self


def model_device(model) -> torch.device:
    first = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    return first.device if first is not None else torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def accuracy(preds, golds) -> float:
    return float(np.mean(np.asarray(preds) == np.asarray(golds))) if golds else 0.0


def macro_f1(preds, golds, num_labels: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in gold or predictions."""
    p, g = np.asarray(preds), np.asarray(golds)
    scores = []
    for c in range(num_labels):
        tp = int(((p == c) & (g == c)).sum())
        fp = int(((p == c) & (g != c)).sum())
        fn = int(((p != c) & (g == c)).sum())
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0
