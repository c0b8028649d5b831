"""Exact match of a final numeric answer with greedy decoding (GSM8K style), for any causal-LM method.

The reference's answer is what follows ``####``; the prediction's is what follows ``####`` in the
generated text if present, else its last number. Numbers compare after dropping commas and a trailing
``.0``. A fixed subset (seeded) keeps rounds comparable.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from fedzip.data.task import model_device

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    tail = text.split("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    value = (found[0] if "####" in text else found[-1]).replace(",", "")
    return value[:-2] if value.endswith(".0") else value


def exact_match_evaluator(task, max_examples: int, max_new_tokens: int, batch_size: int, seed: int = 0):
    """A ``model -> {"exact_match": ...}`` callable over a fixed subset of ``task``'s test split."""
    data = task.test_data
    n = len(data.texts)
    idx = np.sort(np.random.default_rng([seed, 0xE4]).permutation(n)[: min(max_examples, n)])
    prompts = [task.format_prompt(data.texts[i]) for i in idx]
    golds = [final_number(data.answers[i]) for i in idx]
    tok = task.tokenizer

    @torch.no_grad()
    def evaluate(model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        side = tok.padding_side
        tok.padding_side = "left"  # generation continues from the right edge
        device = model_device(model)
        correct = 0
        try:
            for s in range(0, len(prompts), batch_size):
                enc = tok(prompts[s : s + batch_size], return_tensors="pt", padding=True)
                enc = {k: v.to(device) for k, v in enc.items()}
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=task.pad_id)
                texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                correct += sum(final_number(t) == g and g is not None for t, g in zip(texts, golds[s : s + batch_size]))
        finally:
            tok.padding_side = side
            model.train(was_training)
        return {"exact_match": correct / max(len(prompts), 1), "exact_match_examples": len(prompts)}

    return evaluate
