import pytest
import torch

from fedzip.config import load_config
from fedzip.data.ceval import LETTERS, evaluate_ceval, load_ceval
from fedzip.errors import DataError


class Tok:
    """Character-level stand-in tokenizer: each letter is its own token."""
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 5000 + 1 for c in text]}


class Prefers(torch.nn.Module):
    """A 'model' whose next-token logits always favour one letter."""

    def __init__(self, letter):
        super().__init__()
        self.tok = ord(letter) % 5000 + 1

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, 5001)
        logits[..., self.tok] = 1.0
        return type("Out", (), {"logits": logits})()


def test_ceval_scores_by_letter_likelihood(tmp_path):
    root = load_config(None).data_root()
    if not (root / "ceval" / "val").exists():
        pytest.skip("shared data not present")
    items = load_ceval(root, "val", max_per_subject=4)
    assert len(items) == 52 * 4 and {it["answer"] for it in items} <= set(LETTERS)
    for letter in "AC":
        expected = sum(it["answer"] == letter for it in items) / len(items)
        assert evaluate_ceval(Prefers(letter), Tok(), items, batch_size=7)["ceval_accuracy"] == pytest.approx(expected)
    with pytest.raises(DataError, match="no answer"):
        load_ceval(root, "test", max_per_subject=1)


def test_ceval_with_a_real_causal_lm(tmp_path, tiny_cfg, cache_dir):
    from fedzip.engine import run_experiment

    root = load_config(None).data_root()
    if not (root / "ceval" / "val").exists():
        pytest.skip("shared data not present")
    cfg = load_config(None, ["model.name=tiny-llama", f"model.cache_dir={cache_dir}", "data.source=gsm8k",
                             "data.max_train_examples=16", "data.max_test_examples=4", "data.max_length=64",
                             "num_clients=2", "clients_per_round=1", "rounds=1", "partition.scheme=iid",
                             "train.max_steps=1", "eval.ceval=true", "eval.ceval_max_per_subject=1"])
    fm = run_experiment(cfg, tmp_path / "lm", progress=False)["final_metrics"]
    rows = (tmp_path / "lm" / "metrics.jsonl").read_text()
    assert '"ceval_questions": 52' in rows and "loss" in fm
    correct = fm["ceval_accuracy"] * 52  # a count of questions answered right, not an arbitrary score
    assert abs(correct - round(correct)) < 1e-6 and 0 <= round(correct) <= 52
