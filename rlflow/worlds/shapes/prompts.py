"""Fixed train / held-out eval prompt sets of the shapes world, balanced over the four prompt kinds."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from rlflow.worlds.shapes.scene import KINDS, Spec, all_specs

EVAL_FRACTION = 0.25
SPLIT_SEED = 1234
EVAL_SEED_BASE = 1_000_000


@lru_cache(maxsize=1)
def split() -> tuple[tuple[Spec, ...], tuple[Spec, ...]]:
    """``(train, eval)`` specs: a seeded quarter of each kind (at least one prompt) is held out."""
    rng = np.random.default_rng(SPLIT_SEED)
    train: list[Spec] = []
    held: list[Spec] = []
    for kind in KINDS:
        specs = [s for s in all_specs() if s.kind == kind]
        order = rng.permutation(len(specs))
        n_eval = max(1, round(EVAL_FRACTION * len(specs)))
        held += [specs[i] for i in order[:n_eval]]
        train += [specs[i] for i in order[n_eval:]]
    return tuple(train), tuple(held)


def train_prompts() -> list[str]:
    return [s.prompt for s in split()[0]]


def eval_set(per_kind: int = 32) -> tuple[list[str], list[int]]:
    """Held-out ``(prompts, seeds)``: ``per_kind`` images of each kind, cycling through its held-out prompts."""
    prompts: list[str] = []
    seeds: list[int] = []
    for kind in KINDS:
        specs = [s for s in split()[1] if s.kind == kind]
        for i in range(per_kind):
            prompts.append(specs[i % len(specs)].prompt)
            seeds.append(EVAL_SEED_BASE + len(seeds))
    return prompts, seeds


def sample_specs(rng: np.random.Generator, n: int, specs: tuple[Spec, ...] | None = None) -> list[Spec]:
    """``n`` specs with the kind drawn uniformly first, then a prompt of that kind."""
    pool = specs if specs is not None else tuple(all_specs())
    by_kind = {k: [s for s in pool if s.kind == k] for k in KINDS}
    kinds = [k for k in KINDS if by_kind[k]]
    return [by_kind[k][int(rng.integers(len(by_kind[k])))] for k in (kinds[int(i)] for i in rng.integers(len(kinds), size=n))]
