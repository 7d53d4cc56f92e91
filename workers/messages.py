"""Messages between the driver and the actors: frozen dataclasses of numpy arrays.

Tensors cross process boundaries as numpy arrays, never as pickled torch tensors: Ray stores numpy buffers
zero-copy in its object store (a 25 MB tensor took ~10x longer through Ray pickled than as numpy on a
2-core machine). :func:`to_wire` / :func:`from_wire` convert the core's torch dataclasses at the boundary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


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


@dataclass(frozen=True)
class Wire:
    """A tensor on the wire: a numpy array (zero-copy in the object store) and, when numpy has no such dtype
    (bfloat16), the torch dtype name."""

    array: np.ndarray
    dtype: str | None = None


def to_wire(obj: Any) -> Any:
    """``obj`` (a message dataclass, or dicts / lists / tuples of them) with every tensor as a :class:`Wire`
    numpy array: Ray moves numpy buffers without pickling them, a torch tensor it would pickle (~10x slower)."""
    if isinstance(obj, torch.Tensor):
        return Wire(*tensor_to_array(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        wire = object.__new__(type(obj))  # no __init__: its checks are for tensors, these are arrays
        for f in dataclasses.fields(obj):
            object.__setattr__(wire, f.name, to_wire(getattr(obj, f.name)))
        return wire
    if isinstance(obj, dict):
        return {k: to_wire(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_wire(v) for v in obj)
    return obj


def from_wire(obj: Any) -> Any:
    """The inverse of :func:`to_wire`; arrays become writable tensors (object-store buffers are read-only)."""
    if isinstance(obj, Wire):
        return array_to_tensor(obj.array, obj.dtype)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: from_wire(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    if isinstance(obj, dict):
        return {k: from_wire(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(from_wire(v) for v in obj)
    return obj
