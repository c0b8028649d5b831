import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("FEDZIP_DATA", str((REPO.parent / "shared" / "data").resolve()))
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one thread a worker (and for the processes it starts),
    # since torch's default of one a core, times N workers, slows small ops by up to 100x on a loaded machine
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    import torch

    torch.set_num_threads(1)

WORDS = {0: "goal match team season league", 1: "vote party election minister law",
         2: "software chip computer network data"}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One model cache for the session: tiny models are built once."""
    d = os.environ.get("FEDZIP_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    os.environ["FEDZIP_CACHE"] = d
    return d


@pytest.fixture(scope="session")
def toy_jsonl(tmp_path_factory) -> Path:
    """A small three-class text classification set in the bring-your-own JSONL format."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    with open(path, "w") as f:
        for i in range(240):
            label = i % 3
            words = WORDS[label].split()
            text = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
            f.write(json.dumps({"text": text, "label": ["sport", "politics", "tech"][label], "site": f"s{i % 4}"}) + "\n")
    return path


@pytest.fixture
def tiny_cfg(toy_jsonl, cache_dir):
    """Overrides for a fast tiny-bert FedIT run on the toy data."""
    return [
        "data.source=jsonl", f"data.path={toy_jsonl}", "data.max_length=32", "model.name=tiny-bert",
        f"model.cache_dir={cache_dir}", "num_clients=4", "clients_per_round=2", "rounds=3",
        "partition.scheme=iid", "lora.rank=4", "lora.alpha=8", "train.max_steps=3", "train.batch_size=8",
        "train.lr=0.01", "eval.batch_size=64", "train.threads=1",
    ]
