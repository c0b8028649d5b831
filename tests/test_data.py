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


AG_NEWS_STYLE = ('"3","Wall St. Bears Claw Back","Short-sellers are seeing green again."\n'
                 '"4","New chip doubles speed","Faster computers for less power."\n'
                 '"1","Peace talks resume","Leaders meet in Geneva."\n'
                 '"3","Oil prices fall","Crude drops on supply news."\n')


def test_headerless_csv_by_column_position(tmp_path):
    """AG News ships without a header: class index, title, description. Positions name the columns."""
    path = tmp_path / "ag.csv"
    path.write_text(AG_NEWS_STYLE)
    cfg = load_config(None, ["data.source=csv", f"data.path={path}", "data.header=false", "data.label_column=0",
                             "data.text_column=[1, 2]", "data.test_fraction=0.25"]).data
    train, test = load_source(cfg, 0, tmp_path)
    assert train.label_names == ["1", "3", "4"] and len(train) + len(test) == 4
    every = train.texts + test.texts
    assert "Wall St. Bears Claw Back\nShort-sellers are seeing green again." in every
    # without the option, the error says what it found and how to read a header-less file
    with pytest.raises(DataError, match="data.header=false"):
        load_source(load_config(None, ["data.source=csv", f"data.path={path}"]).data, 0, tmp_path)
    with pytest.raises(DataError, match="data.label_column=7 but the file has 3 columns"):
        load_source(load_config(None, ["data.source=csv", f"data.path={path}", "data.header=false",
                                       "data.label_column=7", "data.text_column=1"]).data, 0, tmp_path)


def test_tsv_and_parquet_with_named_columns(tmp_path):
    tsv = tmp_path / "sst.tsv"
    tsv.write_text("sentence\tlabel\na gripping film\t1\ndull and slow\t0\nwonderful cast\t1\n")
    cfg = load_config(None, ["data.source=tsv", f"data.path={tsv}", "data.text_column=sentence",
                             "data.test_fraction=0.34"]).data
    train, test = load_source(cfg, 0, tmp_path)
    assert train.label_names == ["0", "1"] and sorted(train.texts + test.texts)[0] == "a gripping film"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["2+2?", "3+3?", "1+1?"], "answer": ["4", "6", "2"]}),
                   tmp_path / "qa.parquet")
    cfg = load_config(None, ["data.source=parquet", f"data.path={tmp_path / 'qa.parquet'}",
                             "data.prompt_column=question", "data.test_fraction=0.34"]).data
    train, test = load_source(cfg, 0, tmp_path)
    assert not train.is_classification and sorted(train.answers + test.answers) == ["2", "4", "6"]
    with pytest.raises(DataError, match="cannot read as parquet"):
        (tmp_path / "broken.parquet").write_text("not parquet")
        load_source(load_config(None, ["data.source=parquet", f"data.path={tmp_path / 'broken.parquet'}"]).data,
                    0, tmp_path)


def test_missing_benchmark_data_names_both_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDZIP_DATA", raising=False)
    monkeypatch.setenv("FEDZIP_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, ["data.source=gsm8k"])
    assert cfg.data_root() == tmp_path / "cache" / "data"
    with pytest.raises(DataError, match=r"GSM8K not found: expected .*gsm8k/train.jsonl; set data.root or "
                                        r"\$FEDZIP_DATA .*the data root is .*cache/data"):
        load_source(cfg.data, 0, cfg.data_root())
    monkeypatch.setenv("FEDZIP_DATA", str(tmp_path / "env"))
    assert load_config(None).data_root() == tmp_path / "env"
    assert load_config(None, [f"data.root={tmp_path / 'cfg'}"]).data_root() == tmp_path / "cfg"
