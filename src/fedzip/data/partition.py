"""Split a training set over clients: iid, Dirichlet over labels, label shards, or by a metadata field."""

from __future__ import annotations

from collections import Counter

import numpy as np

from fedzip.errors import DataError


def partition(scheme: str, n: int, num_clients: int, rng: np.random.Generator, *, labels=None,
              alpha: float = 0.5, shards_per_client: int = 2, field_values=None, min_examples: int = 1) -> list[np.ndarray]:
    if n < num_clients * max(min_examples, 1):
        raise DataError(f"{n} training examples cannot give {num_clients} clients {max(min_examples, 1)} each")
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif scheme == "dirichlet":
        parts = dirichlet(np.asarray(_need(labels, scheme)), num_clients, alpha, rng, min_examples)
    elif scheme == "shards":
        parts = shards(np.asarray(_need(labels, scheme)), num_clients, shards_per_client, rng)
    elif scheme == "field":
        parts = by_field(_need(field_values, scheme), num_clients)
    else:
        raise DataError(f"unknown partition scheme {scheme!r}")
    parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    empty = [i for i, p in enumerate(parts) if len(p) < max(min_examples, 1)]
    if empty:
        raise DataError(f"partition left {len(empty)} clients with fewer than {max(min_examples, 1)} examples; "
                        f"use fewer clients or a larger partition.alpha")
    return parts


def _need(values, scheme):
    if values is None:
        raise DataError(f"partition scheme {scheme!r} needs labels or a metadata field this dataset lacks")
    return values


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator,
              min_examples: int, tries: int = 100) -> list[np.ndarray]:
    """For each class, share its examples among clients in proportions drawn from Dir(alpha)."""
    classes = np.unique(labels)
    for _ in range(tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= max(min_examples, 1):
            return [np.array(p) for p in parts]
    # Rare with sensible settings: give empty clients one example each from the largest clients.
    for k in range(num_clients):
        while len(parts[k]) < max(min_examples, 1):
            donor = max(range(num_clients), key=lambda j: len(parts[j]))
            parts[k].append(parts[donor].pop())
    return [np.array(p) for p in parts]


def shards(labels: np.ndarray, num_clients: int, per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Sort by label, cut into ``num_clients * per_client`` shards, deal them out at random."""
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, num_clients * per_client)
    deal = rng.permutation(len(pieces))
    return [np.concatenate([pieces[j] for j in deal[k * per_client:(k + 1) * per_client]]) for k in range(num_clients)]


def by_field(values, num_clients: int) -> list[np.ndarray]:
    """One group per distinct value, dealt round-robin over clients (groups sorted by value)."""
    groups: dict = {}
    for i, v in enumerate(values):
        groups.setdefault(str(v), []).append(i)
    if len(groups) < num_clients:
        raise DataError(f"the partition field has {len(groups)} distinct values, fewer than {num_clients} clients")
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for j, key in enumerate(sorted(groups)):
        parts[j % num_clients].extend(groups[key])
    return [np.array(p) for p in parts]


def partition_stats(parts: list[np.ndarray], labels=None, label_names=None) -> dict:
    clients = []
    for k, p in enumerate(parts):
        row = {"client": k, "num_examples": int(len(p))}
        if labels is not None:
            counts = Counter(int(labels[i]) for i in p)
            row["label_histogram"] = [counts.get(c, 0) for c in range(len(label_names or []) or max(labels) + 1)]
        clients.append(row)
    sizes = [c["num_examples"] for c in clients]
    return {"num_clients": len(parts), "sizes": {"min": min(sizes), "max": max(sizes), "mean": float(np.mean(sizes))},
            "label_names": label_names, "clients": clients}


def client_test_indices(train_labels, part: np.ndarray, test_labels, size: int, rng: np.random.Generator) -> np.ndarray:
    """A client's own test set: ``size`` test examples whose labels follow the client's training labels.

    Personalised federated learning judges a client's model on data distributed like the client's; the test
    split is shared, so each client gets a draw from it that matches its label histogram (without labels: a
    uniform draw). Draws of different clients may overlap; a test example never trains anyone."""
    n_test = len(test_labels) if test_labels is not None else 0
    if train_labels is None or test_labels is None or len(part) == 0:
        return np.sort(rng.choice(n_test, min(size, n_test), replace=False))
    test_labels = np.asarray(test_labels)
    train = np.asarray(train_labels)[part]
    classes, counts = np.unique(train, return_counts=True)
    wanted = rng.multinomial(size, counts / counts.sum())
    chosen = []
    for c, k in zip(classes, wanted):
        pool = np.flatnonzero(test_labels == c)
        chosen.append(rng.choice(pool, min(k, len(pool)), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
