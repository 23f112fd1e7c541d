"""Split one data set among simulated clients: iid, dirichlet:ALPHA (label skew), shard:K.

Hand-written rather than flwr-datasets' partitioners: those work on Hugging Face datasets
(pyarrow, datasets), a large dependency for twenty lines of numpy over labels we hold.
"""
from __future__ import annotations

import numpy as np

from edgeprop.errors import EdgepropError

KINDS = ("iid", "dirichlet:ALPHA", "shard:K")


def parse(text: str) -> tuple[str, float]:
    """'iid' -> ("iid", 0); 'dirichlet:0.5' -> ("dirichlet", 0.5); 'shard:2' -> ("shard", 2)."""
    kind, _, value = str(text).partition(":")
    try:
        if kind == "iid" and not value:
            return "iid", 0.0
        if kind == "dirichlet" and float(value) > 0 and np.isfinite(float(value)):
            return "dirichlet", float(value)
        if kind == "shard" and int(value) >= 1:
            return "shard", int(value)
    except ValueError:
        pass
    raise EdgepropError(f"--partition {text!r}: expected one of {', '.join(KINDS)} (ALPHA > 0, K >= 1)")


def partition(y: np.ndarray, clients: int, how: str, seed: int = 0) -> list[np.ndarray]:
    """Sample indices of each client's share of labels `y` (every client gets at least one)."""
    kind, value = parse(how)
    if clients < 1:
        raise EdgepropError(f"--clients must be at least 1, got {clients}")
    if clients > len(y):
        raise EdgepropError(f"--clients {clients}: the data have only {len(y)} samples")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(len(y)), clients)]
    if kind == "shard":
        shards = int(value) * clients
        if shards > len(y):
            raise EdgepropError(f"--partition {how}: {shards} shards of {len(y)} samples")
        # Sorted by label, cut into equal shards, K shards dealt to each client at random.
        pieces = np.array_split(np.argsort(y, kind="stable"), shards)
        order = rng.permutation(shards).reshape(clients, int(value))
        return [np.sort(np.concatenate([pieces[s] for s in row])) for row in order]
    return _dirichlet(y, clients, value, rng, how)


def _dirichlet(y, clients, alpha, rng, how, tries: int = 100) -> list[np.ndarray]:
    """Each class's samples split among clients in proportions ~ Dir(alpha): small alpha, few
    classes per client. Drawn again (up to `tries` times) until no client is left empty."""
    for _ in range(tries):
        shares = [[] for _ in range(clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(idx)).astype(int)[:-1]
            for k, part in enumerate(np.split(idx, cuts)):
                shares[k].append(part)
        parts = [np.sort(np.concatenate(s)) for s in shares]
        if min(len(p) for p in parts) > 0:
            return parts
    raise EdgepropError(f"--partition {how}: {tries} draws each left a client without samples; "
                        f"use fewer clients or a larger ALPHA")
