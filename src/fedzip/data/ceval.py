"""C-Eval multiple choice, scored by answer log-likelihood: usable with any causal LM.

Each question is shown with its four options and an answer cue; the prediction is the letter (A-D) whose
first token the model finds most likely next. Data: ``<root>/ceval/<split>/<subject>_<split>.csv`` with
columns id, question, A, B, C, D, answer (the public C-Eval layout).
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from fedzip.data.task import model_device
from fedzip.errors import DataError

LETTERS = ("A", "B", "C", "D")


def load_ceval(root: Path, split: str = "val", max_per_subject: int | None = None) -> list[dict]:
    folder = Path(root) / "ceval" / split
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        from fedzip.data.sources import missing_data

        raise missing_data("C-Eval", folder / f"<subject>_{split}.csv")
    items = []
    for f in files:
        subject = f.name[: -len(f"_{split}.csv")]
        with open(f, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        for row in rows[:max_per_subject]:
            if row.get("answer") not in LETTERS:
                raise DataError(f"{f}: row {row.get('id')} has no answer A-D (the test split has none)")
            items.append({"subject": subject, "question": row["question"], "answer": row["answer"],
                          **{k: row[k] for k in LETTERS}})
    return items


def prompt(item: dict) -> str:
    options = "\n".join(f"{k}. {item[k]}" for k in LETTERS)
    return f"{item['question']}\n{options}\n答案："


@torch.no_grad()
def evaluate_ceval(model, tokenizer, items: list[dict], batch_size: int = 8, max_length: int = 512) -> dict:
    letter_ids = [tokenizer(k, add_special_tokens=False)["input_ids"][0] for k in LETTERS]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    device = model_device(model)
    correct = 0
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        seqs = [tokenizer(prompt(it), add_special_tokens=True)["input_ids"][-max_length:] for it in chunk]
        width = max(len(q) for q in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, q in enumerate(seqs):
            ids[r, : len(q)], mask[r, : len(q)] = torch.tensor(q), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.cpu()
        last = logits[torch.arange(len(seqs)), mask.sum(1) - 1][:, letter_ids]
        for it, choice in zip(chunk, last.argmax(-1).tolist()):
            correct += LETTERS[choice] == it["answer"]
    model.train(was_training)
    return {"ceval_accuracy": correct / max(len(items), 1), "ceval_questions": len(items)}
