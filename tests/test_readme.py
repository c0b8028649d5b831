"""Every `fedzip run` and `fedzip report` command in the README and the docs, run as a user types it; and a
README that stays an index.

Each command gets a size suffix (one round, a few steps, small data) so that all of them cost a few minutes; the
command itself, the config it names, its data options and its model are exactly the page's. `fedzip deploy`
commands are run by tests/test_deploy.py, `./setup.sh` and `pip` by CI itself.
"""

import re
import shlex
import time
from pathlib import Path

import pytest

from fedzip.cli import main
from fedzip.config import load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
SMALL = ["rounds=1", "num_clients=4", "clients_per_round=2", "train.max_steps=1", "data.max_train_examples=96",
         "data.max_test_examples=24", "eval.max_examples=24", "eval.exact_match_examples=0",
         "eval.ceval=false",  # C-Eval in a real run: tests/test_ceval.py
         "data.max_length=64"]  # short texts: the B2/B3 configs' 256 tokens made SmolLM2's evaluations most of CI


# The pages whose commands run here, in the order a reader meets them: the README, then the docs by kind.
DOC_PAGES = ["README.md", *(str(p.relative_to(REPO)) for kind in ("tutorials", "how-to", "reference", "explanation")
                            for p in sorted((REPO / "docs" / kind).rglob("*.md")))]
README_LIMIT = 10 * 1024  # the README is an index: what and why, install, quickstart, links


def readme_commands() -> list[list[str]]:
    """Commands that start with fedzip: lines of the pages' bash blocks (continuations joined) and the inline
    ones of their tables (the methods table), each once, in page order."""
    lines = []
    for page in DOC_PAGES:
        text = (REPO / page).read_text()
        lines += [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
                  for line in block.replace("\\\n", " ").splitlines()]
        lines += re.findall(r"^\|.*?`((?:\.venv/bin/)?fedzip [^`]+)`", text, flags=re.M)
    commands = []
    for line in lines:
        words = shlex.split(line, comments=True)
        if words and words[0] in ("fedzip", ".venv/bin/fedzip") and (words[1:] or ["run"]) not in commands:
            commands.append(words[1:] or ["run"])
    return commands


# The methods' own long phases, shortened the same way (the server's emulator alignment, the autoencoder; a
# one-epoch autoencoder cannot pass CG-FedLLM's quality gate, so the shortened run only warns).
SMALL_METHOD = {"fedbiot": ["method_options.prealign_steps=1", "method_options.align_steps=1",
                            "method_options.public_max_examples=8", "method_options.public_eval_examples=8"],
                "cgfedllm": ["rounds=2", "method_options.tgap_rounds=1", "method_options.ae_epochs=1",
                             "method_options.ae_gate=warn"]}


def small(args: list[str]) -> list[str]:
    """The size suffix for ``args``; the method is read from the config the command names."""
    config = args[1] if len(args) > 1 and not args[1].startswith("-") else None
    sets = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
    method = load_config(config, [s for s in sets if s.startswith("method=")]).method
    keep = [kv for kv in SMALL if not (kv.startswith("data.max_length=") and  # a length the command sets stays
                                       any(s.startswith("data.max_length=") for s in sets))]
    return [w for kv in keep + SMALL_METHOD.get(method, []) for w in ("--set", kv)]


def user_files(cwd: Path) -> None:
    """The files the README's own-data examples name, in the shapes it describes."""
    from fedzip.models.load import smollm_gguf

    topics = {1: "leaders meet for peace talks", 3: "shares fall as oil prices rise", 4: "new chip doubles speed"}
    rows = [f'"{c}","{t} {i}","{t}, more on this story {i}."' for i in range(16) for c, t in topics.items()]
    (cwd / "train.csv").write_text("\n".join(rows[:36]) + "\n")
    (cwd / "test.csv").write_text("\n".join(rows[36:]) + "\n")
    (cwd / "sst2.tsv").write_text("sentence\tlabel\n" + "".join(
        f"{'a gripping, warm film' if i % 2 else 'dull and far too slow'} {i}\t{i % 2}\n" for i in range(40)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": [f"What is {i} plus {i}?" for i in range(40)],
                             "answer": [f"{2 * i}" for i in range(40)]}), cwd / "qa.parquet")
    (cwd / "SmolLM2-135M-Instruct.Q4_1.gguf").symlink_to(smollm_gguf())
    (cwd / "configs").symlink_to(REPO / "configs")  # a clone's configs/ folder, as the README uses it


def causal(args: list[str]) -> bool:
    """A command on SmolLM2 through a B2/B3 config (minutes each even when shortened)."""
    return len(args) > 1 and args[1].startswith(("b2_", "b3_", "configs/b2_", "configs/b3_"))


# Two halves, so that two pytest-xdist workers can share the README: the causal-LM configs' commands, and the
# rest with the reports (which compare the quickstart runs the rest makes).
@pytest.mark.parametrize("half", ["causal_lm", "the_rest"])
def test_readme_commands_run_as_written(tmp_path, cache_dir, monkeypatch, capsys, half):
    commands = readme_commands()
    assert len([c for c in commands if c[0] == "run"]) >= 10 and any(c[0] == "report" for c in commands), \
        "the README lost its commands"
    assert any(causal(c) for c in commands), "the README lost its B2/B3 commands"
    runs = [c for c in commands if c[0] == "run" and causal(c) == (half == "causal_lm")]
    reports = [c for c in commands if c[0] == "report" and half == "the_rest"]
    user_files(tmp_path)
    monkeypatch.chdir(tmp_path)  # in-process (one torch import for all), from the folder a user would be in
    monkeypatch.setenv("FEDZIP_CACHE", cache_dir)

    def fedzip(args, suffix=()):
        quiet = ["--quiet"] if args[0] == "run" else []
        start = time.time()
        code = main([*args, *suffix, *quiet])
        out, err = capsys.readouterr()
        with capsys.disabled():  # what each README command costs, for whoever keeps CI short
            print(f"\n{time.time() - start:5.1f} s  fedzip {shlex.join(args)}", end="")
        assert code == 0, f"fedzip {shlex.join([*args, *suffix])}\n{err[-3000:]}"
        return out

    for args in runs:
        if "--resume" in args:  # resuming needs a run to resume: make it first, as a user would have
            fedzip([a for a in args if a != "--resume"], small(args))
        out = fedzip(args, small(args))
        assert "run directory:" in out and "bytes up" in out, out
    for args in reports:  # after the runs, whose directories they compare
        assert "report:" in fedzip(args)


def test_the_readme_is_an_index_that_copies_no_measured_number():
    """At most 10 KB, and no number that a generated benchmark page holds (a measured number lives on its page
    and is linked: copied by hand, it goes stale when the page is rebuilt)."""
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= README_LIMIT, f"README.md is {len(text.encode())} bytes; the limit is {README_LIMIT}"
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))  # code holds settings, not results
    measured = set()
    for page in (REPO / "benchmarks" / "results").glob("*.md"):
        measured |= set(re.findall(r"(?<![\w.])\d+\.\d{2,}(?![\w.])", page.read_text()))
    copied = sorted(set(re.findall(r"(?<![\w.])\d+\.\d{2,}(?![\w.])", prose)) & measured)
    assert not copied, f"README.md copies measured numbers from the benchmark pages: {copied[:10]}"
