"""Messages between the driver and the actors: frozen dataclasses of numpy arrays.

Tensors cross process boundaries as numpy arrays, never as pickled torch tensors: Ray stores numpy buffers
zero-copy in its object store (a 25 MB tensor took ~10x longer through Ray pickled than as numpy on a
2-core machine). ``pack_*`` / ``unpack_*`` convert the core's torch dataclasses at the boundary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlflow.types import RewardOutput, Trajectories


@dataclass(frozen=True)
class WeightUpdate:
    """Weights published by learner rank 0.

    version: the policy version (number of optimizer updates) these weights are.
    kind:    ``"lora"`` (adapter tensors only) or ``"full"`` (every transformer tensor).
    arrays:  name -> array in the parameter's dtype and shape (bfloat16 travels as uint16 bits, see ``dtypes``).
    dtypes:  name -> torch dtype name, for the arrays whose numpy dtype is not the tensor's.
    """

    version: int
    kind: str
    arrays: dict[str, np.ndarray]
    dtypes: dict[str, str]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


@dataclass(frozen=True)
class ChunkStatus:
    """The small third output of a rollout call: fetched by the driver to learn a chunk is done (or lost)
    without moving its tensors. ``sampler``: index of the actor; ``policy_version``: weights it used."""

    sampler: int
    policy_version: int
    num_samples: int
    seconds: float


def tensor_to_array(t: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """A CPU numpy view/copy of ``t`` and, when numpy has no such dtype (bfloat16), the torch dtype name."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy(), "bfloat16"
    return t.numpy(), None


def array_to_tensor(a: np.ndarray, dtype: str | None = None) -> torch.Tensor:
    """A writable tensor from an (object-store, read-only) array."""
    t = torch.from_numpy(np.array(a, copy=True))
    return t.view(getattr(torch, dtype)) if dtype else t


def state_to_update(state: dict[str, torch.Tensor], version: int, kind: str) -> WeightUpdate:
    arrays, dtypes = {}, {}
    for name, t in state.items():
        arrays[name], dt = tensor_to_array(t)
        if dt:
            dtypes[name] = dt
    return WeightUpdate(version=version, kind=kind, arrays=arrays, dtypes=dtypes)


def update_to_state(update: WeightUpdate) -> dict[str, torch.Tensor]:
    return {name: array_to_tensor(a, update.dtypes.get(name)) for name, a in update.arrays.items()}


def pack(obj: Any) -> dict[str, Any]:
    """A dataclass of tensors -> a dict of its fields with tensors as numpy arrays (dicts of tensors too)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            v = tensor_to_array(v)[0]
        elif isinstance(v, dict):
            v = {k: tensor_to_array(x)[0] if isinstance(x, torch.Tensor) else x for k, x in v.items()}
        out[f.name] = v
    return out


def _unpack_fields(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            v = array_to_tensor(v)
        elif isinstance(v, dict):
            v = {kk: array_to_tensor(x) if isinstance(x, np.ndarray) else x for kk, x in v.items()}
        out[k] = v
    return out


def unpack_trajectories(d: dict[str, Any]) -> Trajectories:
    return Trajectories(**_unpack_fields(d))


def unpack_reward(d: dict[str, Any]) -> RewardOutput:
    return RewardOutput(**_unpack_fields(d))


def concat_trajectories(parts: list[Trajectories]) -> Trajectories:
    """Join chunk results (same trained steps, same version) into the step's batch."""
    first = parts[0]
    for p in parts[1:]:
        if not torch.equal(p.step_index, first.step_index) or p.policy_version != first.policy_version:
            raise RuntimeError("rollout chunks of one step disagree on trained steps or policy version")
    tensors: dict[str, Any] = {
        f.name: torch.cat([getattr(p, f.name) for p in parts])
        for f in dataclasses.fields(Trajectories)
        if f.name in ("group_ids", "x", "x_next", "log_prob", "mean", "final", "images")
    }
    return dataclasses.replace(first, prompts=[q for p in parts for q in p.prompts], **tensors)


def concat_rewards(parts: list[RewardOutput]) -> RewardOutput:
    keys = parts[0].components.keys()
    return RewardOutput(
        score=torch.cat([p.score for p in parts]),
        components={k: torch.cat([p.components[k] for p in parts]) for k in keys},
    )
