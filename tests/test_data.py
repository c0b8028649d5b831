import json
from pathlib import Path

import numpy as np
import pytest

from fedzip.config import load_config
from fedzip.data import load_source, partition, partition_stats
from fedzip.data.sources import strip_footer, strip_header, strip_quotes
from fedzip.errors import DataError

LABELS = np.repeat(np.arange(5), 40)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partitions_cover_every_example_once(scheme):
    parts = partition(scheme, len(LABELS), 8, np.random.default_rng(0), labels=LABELS, alpha=0.3)
    allidx = np.concatenate(parts)
    assert len(parts) == 8 and sorted(allidx.tolist()) == list(range(len(LABELS)))
    assert min(len(p) for p in parts) >= 1


def test_partition_is_seeded():
    a = partition("dirichlet", 200, 8, np.random.default_rng(1), labels=LABELS, alpha=0.1)
    b = partition("dirichlet", 200, 8, np.random.default_rng(1), labels=LABELS, alpha=0.1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_balanced():
    def mean_classes(alpha):
        parts = partition("dirichlet", 200, 5, np.random.default_rng(0), labels=LABELS, alpha=alpha)
        return np.mean([len(set(LABELS[p])) for p in parts])
    assert mean_classes(0.05) < mean_classes(100.0)
    assert mean_classes(100.0) == 5


def test_shards_limit_labels_per_client():
    parts = partition("shards", 200, 10, np.random.default_rng(0), labels=LABELS, shards_per_client=1)
    assert all(len(set(LABELS[p])) == 1 for p in parts)


def test_field_partition_and_stats():
    values = [f"site{i % 6}" for i in range(60)]
    parts = partition("field", 60, 3, np.random.default_rng(0), field_values=values)
    for p in parts:
        assert len({values[i] for i in p}) == 2
    stats = partition_stats(parts, LABELS[:60], [str(i) for i in range(5)])
    assert [c["num_examples"] for c in stats["clients"]] == [len(p) for p in parts]
    assert sum(sum(c["label_histogram"]) for c in stats["clients"]) == 60
    with pytest.raises(DataError, match="distinct values"):
        partition("field", 60, 10, np.random.default_rng(0), field_values=values)


def test_too_many_clients_is_a_data_error():
    with pytest.raises(DataError):
        partition("iid", 5, 10, np.random.default_rng(0))


def test_newsgroups_stripping():
    post = "From: a@b.c\nSubject: hi\n\nIn article <x> a@b.c writes:\n> quoted\nreal text\n--\nsig line"
    body = strip_header(post)
    assert body.startswith("In article")
    assert "quoted" not in strip_quotes(body) and "real text" in strip_quotes(body)
    assert "sig line" not in strip_footer(body)


def test_shared_sources_load():
    cfg = load_config("b1_fedit")
    root = cfg.data_root()
    if not (root / "20newsgroups").exists():
        pytest.skip("shared data not present")
    train, test = load_source(cfg.data, 0, root)
    assert len(train) == 11314 and len(test) == 7532 and len(train.label_names) == 20
    assert not any(t.startswith("From:") for t in train.texts[:200])
    g_train, g_test = load_source(load_config(None, ["data.source=gsm8k"]).data, 0, root)
    assert len(g_train) == 7473 and "####" in g_train.answers[0]
    a_train, a_test = load_source(load_config(None, ["data.source=alpaca"]).data, 0, root)
    assert len(a_train) + len(a_test) == 999


def test_bbc_news_from_package():
    train, test = load_source(load_config("quickstart").data, 0, Path("."))
    assert len(train) + len(test) == 2225 and train.label_names == ["business", "entertainment", "politics", "sports", "tech"]


def test_bring_your_own_csv_and_jsonl(tmp_path, toy_jsonl):
    csv = tmp_path / "d.csv"
    csv.write_text("body,topic\nhello world,a\nbye now,b\nmore text,a\n")
    cfg = load_config(None, ["data.source=csv", f"data.path={csv}", "data.text_column=body",
                             "data.label_column=topic", "data.test_fraction=0.34"]).data
    train, test = load_source(cfg, 0, tmp_path)
    assert train.label_names == ["a", "b"] and len(train) + len(test) == 3
    cfg = load_config(None, ["data.source=jsonl", f"data.path={toy_jsonl}"]).data
    train, _ = load_source(cfg, 0, tmp_path)
    assert "site" in train.fields and train.is_classification
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(DataError, match="needs columns"):
        load_source(load_config(None, ["data.source=jsonl", f"data.path={bad}"]).data, 0, tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_source(load_config(None, ["data.source=jsonl", f"data.path={tmp_path / 'no.jsonl'}"]).data, 0, tmp_path)
