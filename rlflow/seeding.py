"""Derived seeds: every random stream of a run is keyed by the run seed and where it is used (step, stage,
sample index, term), so results never depend on how work was split over chunks, ranks or processes."""

from __future__ import annotations

import numpy as np
import torch


def stream_seed(*keys: int) -> int:
    """A 63-bit seed for the random stream named by ``keys`` (e.g. ``(run_seed, step, stage)``)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def generator(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`stream_seed` of ``keys``."""
    return torch.Generator().manual_seed(stream_seed(*keys))


step_seed = stream_seed  # ``step_seed(seed, step, stage)``: the seed of one stage of one step
