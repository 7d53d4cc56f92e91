"""Fixed train / held-out eval prompt sets of the shapes world, balanced over the four prompt kinds.

Held out, per kind: position prompts hold out a quarter of their contents (in every phrasing), so the eval
asks for object pairs RL never trained on; single, colour and count prompts have few contents (3, 12 and 9),
so each content keeps some phrasings for training and holds out the others (a third, and at least enough for
:data:`MIN_HELD_OUT` distinct held-out prompts per kind). The pretraining data covers every prompt: "held out"
means held out from RL.
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import lru_cache

import numpy as np

from rlflow.worlds.shapes.scene import KINDS, PHRASINGS, Spec, all_specs

POSITION_EVAL_FRACTION = 0.25
PHRASING_EVAL_FRACTION = 1 / 3
MIN_HELD_OUT = 32
SPLIT_SEED = 1234
EVAL_SEED_BASE = 1_000_000


@lru_cache(maxsize=1)
def split() -> tuple[tuple[Spec, ...], tuple[Spec, ...]]:
    """``(train, eval)`` specs. The eval specs come grouped by kind, each kind in round-robin order over its
    contents (so the first ``n`` of a kind spread over as many contents as they can)."""
    rng = np.random.default_rng(SPLIT_SEED)
    train: list[Spec] = []
    held: list[Spec] = []
    for kind in KINDS:
        by_content: dict[str, list[Spec]] = defaultdict(list)
        for s in all_specs():
            if s.kind == kind:
                by_content[s.content].append(s)
        contents = [by_content[c] for c in sorted(by_content)]
        rng.shuffle(contents)
        if kind == "position":
            n_held = round(POSITION_EVAL_FRACTION * len(contents))
            held_groups = [list(g) for g in contents[:n_held]]
            train += [s for g in contents[n_held:] for s in g]
        else:
            k = max(round(PHRASING_EVAL_FRACTION * len(PHRASINGS)), math.ceil(MIN_HELD_OUT / len(contents)))
            held_groups = []
            for g in contents:
                order = rng.permutation(len(g))
                held_groups.append([g[i] for i in order[:k]])
                train += [g[i] for i in order[k:]]
        for g in held_groups:
            rng.shuffle(g)
        held += [g[i] for i in range(max(map(len, held_groups))) for g in held_groups if i < len(g)]
    return tuple(train), tuple(held)


def train_prompts() -> list[str]:
    return [s.prompt for s in split()[0]]


def eval_set(per_kind: int = 128) -> tuple[list[str], list[int]]:
    """Held-out ``(prompts, seeds)``: ``per_kind`` images of each kind, cycling through its held-out prompts
    (each prompt at most ``ceil(per_kind / held-out prompts of the kind)`` times), a distinct seed each."""
    prompts: list[str] = []
    seeds: list[int] = []
    for kind in KINDS:
        specs = [s for s in split()[1] if s.kind == kind]
        for i in range(per_kind):
            prompts.append(specs[i % len(specs)].prompt)
            seeds.append(EVAL_SEED_BASE + len(seeds))
    return prompts, seeds


def sample_specs(
    rng: np.random.Generator, n: int, specs: tuple[Spec, ...] | None = None, kind_weights: tuple[float, ...] | None = None
) -> list[Spec]:
    """``n`` specs with the kind drawn first (uniformly, or in proportion to ``kind_weights``, one per
    :data:`KINDS`), then a prompt of that kind."""
    pool = specs if specs is not None else tuple(all_specs())
    by_kind = {k: [s for s in pool if s.kind == k] for k in KINDS}
    kinds = [k for k in KINDS if by_kind[k]]
    if kind_weights is None:
        picks = rng.integers(len(kinds), size=n)
    else:
        if len(kind_weights) != len(KINDS) or min(kind_weights) < 0 or sum(kind_weights) <= 0:
            raise ValueError(f"kind_weights must be {len(KINDS)} non-negative numbers (for {', '.join(KINDS)}), "
                             f"got {kind_weights}")
        w = np.asarray([kind_weights[KINDS.index(k)] for k in kinds], dtype=np.float64)
        picks = rng.choice(len(kinds), size=n, p=w / w.sum())
    return [by_kind[k][int(rng.integers(len(by_kind[k])))] for k in (kinds[int(i)] for i in picks)]
